"""Receipts: a hashed JSON record of one run, and the two checks that make a published number trustworthy.

Every `ikv run` and `ikv bench ...` writes one. RECEIPTS.md documents the schema field by field. `verify_receipt`
says whether a file is well-formed and unedited (`receipt_sha256` is the SHA-256 of the canonical JSON of every other
field); `rerun_receipt` runs the recorded command again and compares the new receipt with the old one field by field:
outputs, gate verdicts and the model fingerprint must match exactly, timings are reported as ratios and never fail.

A receipt never holds environment variables, and paths are written relative to the working directory or with `~`
for the home directory, so receipts can be published as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from infinitekv import __version__
from infinitekv.errors import IKVError

SCHEMA = "infinitekv.receipt/1"
_SCHEMA_PREFIX = "infinitekv.receipt/"
_SCHEMA_VERSION = 1

# Top-level fields in the order verify checks them (the first failing one is the one reported).
REQUIRED_FIELDS = (
    "schema", "command", "config", "model", "inputs", "outputs", "metrics",
    "environment", "started_at", "duration_s", "receipt_sha256",
)
OPTIONAL_FIELDS = ("gates", "extra")
ENVIRONMENT_FIELDS = (
    "os", "os_release", "kernel", "machine", "cpu_model", "cpu_count", "cpu_available", "ram_bytes", "gpu",
    "python", "torch", "torch_threads", "transformers", "numpy", "numba", "faiss", "infinitekv",
    "git_commit", "git_dirty",
)
TIME_UNITS = frozenset({"ns", "us", "µs", "ms", "s", "sec", "min", "h"})
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


# ---------------------------------------------------------------------------------------------------------- hashing


def canonical_json(obj) -> str:
    """The one serialisation the hash covers: sorted keys, no insignificant whitespace, UTF-8 text, finite numbers."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_sha256(receipt: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of every field except `receipt_sha256` itself."""
    body = {key: value for key, value in receipt.items() if key != "receipt_sha256"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------------------ paths


def portable_path(path) -> str:
    """`path` as a receipt records it: relative to the working directory if inside it, `~/...` if inside the home
    directory, otherwise absolute."""
    absolute = Path(os.path.abspath(Path(path).expanduser()))
    try:
        return absolute.relative_to(os.getcwd()).as_posix()
    except ValueError:
        pass
    home = Path.home()
    if home != Path(home.anchor):
        try:
            return "~/" + absolute.relative_to(home).as_posix()
        except ValueError:
            pass
    return absolute.as_posix()


def portable_text(text: str) -> str:
    """Rewrite absolute paths inside an argument or setting (`--out=/home/me/x`): the working directory prefix is
    dropped (`x`, or `.` for the directory itself) and the home directory becomes `~`."""
    start = r"(?<![\w.~/-])"  # a path starts the string or follows '=', ':', a space, a quote ...
    cwd = os.getcwd()
    if len(cwd) > 1:
        text = re.sub(start + re.escape(cwd) + "/", "", text)
        text = re.sub(start + re.escape(cwd) + r"(?![\w./-])", ".", text)
    home = os.path.expanduser("~")
    if len(home) > 1:
        text = re.sub(start + re.escape(home) + r"(?![\w.-])", "~", text)
    return text


def command_line(argv: list[str] | None = None) -> list[str]:
    """The command as the user would retype it: `ikv` (however it was launched) and portable arguments."""
    argv = list(sys.argv if argv is None else argv)
    return ["ikv", *(portable_text(str(arg)) for arg in argv[1:])]


def _portable(obj):
    if isinstance(obj, str):
        return portable_text(obj)
    if isinstance(obj, dict):
        return {key: _portable(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_portable(value) for value in obj]
    return obj


# ------------------------------------------------------------------------------------------------ building blocks


def utc_now() -> str:
    """The current time as a receipt's `started_at`: UTC ISO-8601 to the second, e.g. 2026-11-22T15:40:00Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_input(path) -> dict:
    """An input read from a file: its SHA-256, size and portable path."""
    path = Path(path).expanduser()
    try:
        return {"sha256": sha256_file(path), "bytes": path.stat().st_size, "path": portable_path(path)}
    except OSError as err:
        raise IKVError(f"cannot read input file {path} ({err.strerror or err}); check the path") from None


def text_input(text: str) -> dict:
    """An input given as text (a question typed on the command line): SHA-256 and size of its UTF-8 bytes."""
    data = text.encode("utf-8")
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _number(value, where: str):
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {value!r} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{where}: {value!r} is not a finite number")
    return value


def metric(value, unit: str) -> dict:
    """A measured number with its unit, e.g. metric(41.7, "ms/token"); refuses NaN, infinity and non-numbers."""
    value = _number(value, "metric value")
    if not isinstance(unit, str) or not unit:
        raise ValueError(f"metric unit must be a non-empty string, got {unit!r}")
    return {"value": value, "unit": unit}


def gate(passed: bool, detail=None) -> dict:
    """A gate's verdict for `build_receipt(gates=...)`: {"verdict": "pass" | "fail", "detail": ...}."""
    return {"verdict": "pass" if passed else "fail", "detail": detail}


def _plain(obj, where: str):
    """`obj` as JSON-native values (numpy/torch scalars unwrapped, tuples as lists, paths portable)."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (int, float)) or (hasattr(obj, "item") and getattr(obj, "shape", None) == ()):
        return _number(obj, where)
    if isinstance(obj, os.PathLike):
        return portable_path(obj)
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string")
        return {key: _plain(value, f"{where}.{key}") for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(value, f"{where}[{i}]") for i, value in enumerate(obj)]
    raise TypeError(f"{where}: {type(obj).__name__} is not JSON data")


# ------------------------------------------------------------------------------------------------------ environment


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            done = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or None


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_state() -> tuple[str | None, bool | None]:
    """(short commit, dirty?) of the checkout infinitekv is imported from; (None, None) for an installed package."""
    repo = Path(__file__).resolve().parent.parent
    top = _git(["rev-parse", "--show-toplevel"], repo)
    if top is None or Path(top).resolve() != repo:  # not a checkout, or infinitekv sits inside someone else's repo
        return None, None
    commit = _git(["rev-parse", "--short=12", "HEAD"], repo)
    status = _git(["status", "--porcelain", "--untracked-files=no"], repo)
    return commit, (None if status is None else bool(status))


def environment_fingerprint() -> dict:
    """Where a receipt was made: OS, CPU, memory, GPU and library versions. Never environment variables."""
    import psutil
    import torch

    try:
        os_release = platform.freedesktop_os_release().get("PRETTY_NAME")
    except (OSError, AttributeError):
        os_release = platform.platform()
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        gpu = "Apple MPS"
    else:
        gpu = None
    commit, dirty = _git_state()
    return {
        "os": platform.system(),
        "os_release": os_release,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "numba": _version("numba"),
        "faiss": _version("faiss-cpu") or _version("faiss-gpu") or _version("faiss"),
        "infinitekv": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
    }


# ---------------------------------------------------------------------------------------------- build and write


def build_receipt(
    *,
    command: list[str],
    config: dict,
    model: dict,
    inputs: dict,
    outputs: dict,
    metrics: dict,
    gates: dict | None = None,
    started_at: str,
    duration_s: float,
    extra: dict | None = None,
) -> dict:
    """A complete receipt: the given fields made JSON-native and portable, plus schema, environment and hash.

    `command` is usually `command_line()`. Outputs are recorded verbatim (store output file paths with
    `portable_path`); every other string has the working directory and home directory rewritten. Raises ValueError
    if the result would not pass `verify_receipt`.
    """
    receipt = {
        "schema": SCHEMA,
        "command": [portable_text(str(arg)) for arg in command],
        "config": _portable(_plain(config, "config")),
        "model": _portable(_plain(model, "model")),
        "inputs": _portable(_plain(inputs, "inputs")),
        "outputs": _plain(outputs, "outputs"),
        "metrics": _plain(metrics, "metrics"),
        "environment": environment_fingerprint(),
        "started_at": started_at,
        "duration_s": _number(duration_s, "duration_s") * 1.0,
        "receipt_sha256": "0" * 64,
    }
    if gates is not None:
        receipt["gates"] = _portable(_plain(gates, "gates"))
    if extra is not None:
        receipt["extra"] = _portable(_plain(extra, "extra"))
    problem = _first_problem(receipt)
    if problem is not None:
        raise ValueError(f"refusing to build an invalid receipt: {problem[0]}: {problem[1]}")
    receipt["receipt_sha256"] = content_sha256(receipt)
    return receipt


def write_receipt(receipt: dict, path) -> Path:
    """Write `receipt` as indented JSON with sorted keys, atomically (a reader never sees half a file)."""
    if not isinstance(receipt.get("receipt_sha256"), str):
        raise ValueError("write_receipt needs a receipt from build_receipt (it has no receipt_sha256)")
    path = Path(path).expanduser()
    text = json.dumps(receipt, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(partial, 0o644)
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise IKVError(f"cannot write receipt {path} ({err.strerror or err}); pass --receipt with a writable path") from None
    return path


def default_receipt_path(kind: str, directory="receipts") -> Path:
    """A fresh path such as receipts/run-20261122T154000Z.json (a -2, -3 ... suffix if that name is taken)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = Path(directory) / f"{kind}-{stamp}"
    path, n = base.with_name(base.name + ".json"), 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}.json")
    return path


# ------------------------------------------------------------------------------------------------------ verify


@dataclass
class Verdict:
    path: str
    ok: bool
    failing_field: str | None  # dotted, e.g. "metrics.decode_ms_per_token.value"; None when the file is not JSON
    message: str  # "<field>: <why>" on failure


def _is_hex64(value) -> bool:
    return isinstance(value, str) and _HEX64.match(value) is not None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_finite(obj, where: str) -> str | None:
    """The dotted path of the first NaN or infinity inside `obj`, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where
    if isinstance(obj, dict):
        items = ((f"{where}.{key}" if where else key, value) for key, value in obj.items())
    elif isinstance(obj, list):
        items = ((f"{where}[{i}]", value) for i, value in enumerate(obj))
    else:
        return None
    for inner, value in items:
        found = _non_finite(value, inner)
        if found:
            return found
    return None


def _check_schema(value) -> str | None:
    if not isinstance(value, str) or not value.startswith(_SCHEMA_PREFIX):
        return f"{value!r} is not an InfiniteKV receipt schema (expected {SCHEMA!r})"
    version = value[len(_SCHEMA_PREFIX):]
    if not version.isdigit():
        return f"{value!r} is not a schema version this infinitekv understands (expected {SCHEMA!r})"
    if int(version) > _SCHEMA_VERSION:
        return (
            f"this receipt is {value}, newer than {SCHEMA} that infinitekv {__version__} reads; "
            f"upgrade infinitekv to verify it"
        )
    if int(version) != _SCHEMA_VERSION:
        return f"{value} is not a schema version this infinitekv reads (it reads {SCHEMA})"
    return None


def _first_problem(receipt) -> tuple[str, str] | None:
    """(dotted field, why) for the first field that breaks the schema, or None. Does not check the hash."""
    if not isinstance(receipt, dict):
        return "(top level)", f"a receipt is a JSON object, this is a JSON {type(receipt).__name__}"
    if "schema" not in receipt:
        return "schema", f"missing (every receipt starts with \"schema\": \"{SCHEMA}\")"
    why = _check_schema(receipt["schema"])
    if why:
        return "schema", why
    for name in REQUIRED_FIELDS:
        if name not in receipt:
            return name, f"missing (required by {SCHEMA})"
    for name in receipt:
        if name not in REQUIRED_FIELDS and name not in OPTIONAL_FIELDS:
            return name, f"not a field of {SCHEMA} (free-form data belongs under \"extra\")"

    command = receipt["command"]
    if not isinstance(command, list) or not command or not all(isinstance(arg, str) for arg in command):
        return "command", "must be a non-empty list of strings (the argv as typed)"
    if command[0] != "ikv":
        return "command[0]", f"must be 'ikv', not {command[0]!r}"
    if not isinstance(receipt["config"], dict):
        return "config", "must be an object (the resolved settings)"

    model = receipt["model"]
    if not isinstance(model, dict):
        return "model", "must be an object with source and weights_sha256"
    for key in ("source", "weights_sha256"):
        if key not in model:
            return f"model.{key}", "missing"
    if model["source"] is not None and not isinstance(model["source"], str):
        return "model.source", "must be a string or null"
    if model["weights_sha256"] is not None and not _is_hex64(model["weights_sha256"]):
        return "model.weights_sha256", "must be 64 lowercase hex digits or null"

    if not isinstance(receipt["inputs"], dict):
        return "inputs", "must be an object mapping each input's name to its sha256 and bytes"
    for name, entry in receipt["inputs"].items():
        where = f"inputs.{name}"
        if not isinstance(entry, dict):
            return where, "must be an object with sha256 and bytes"
        if not _is_hex64(entry.get("sha256")):
            return f"{where}.sha256", "missing or not 64 lowercase hex digits"
        size = entry.get("bytes")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return f"{where}.bytes", "missing or not a non-negative integer"
        if entry.get("path") is not None and not isinstance(entry["path"], str):
            return f"{where}.path", "must be a string or null"

    if not isinstance(receipt["outputs"], dict):
        return "outputs", "must be an object"

    if not isinstance(receipt["metrics"], dict):
        return "metrics", "must be an object mapping each metric's name to {value, unit}"
    for name, entry in receipt["metrics"].items():
        where = f"metrics.{name}"
        if not isinstance(entry, dict):
            return where, "must be an object {value, unit}"
        if "value" not in entry:
            return f"{where}.value", "missing"
        if not _is_number(entry["value"]):
            return f"{where}.value", f"{entry['value']!r} is not a finite number"
        if not isinstance(entry.get("unit"), str) or not entry["unit"]:
            return f"{where}.unit", "missing or not a non-empty string"
        for key in entry:
            if key not in ("value", "unit"):
                return f"{where}.{key}", "not a field of a metric (a metric is exactly {value, unit})"

    if "gates" in receipt:
        if not isinstance(receipt["gates"], dict):
            return "gates", "must be an object mapping each gate's name to {verdict, detail}"
        for name, entry in receipt["gates"].items():
            if not isinstance(entry, dict):
                return f"gates.{name}", "must be an object {verdict, detail}"
            if entry.get("verdict") not in ("pass", "fail"):
                return f"gates.{name}.verdict", f"{entry.get('verdict')!r} is not 'pass' or 'fail'"

    environment = receipt["environment"]
    if not isinstance(environment, dict):
        return "environment", "must be an object"
    for key in ENVIRONMENT_FIELDS:
        if key not in environment:
            return f"environment.{key}", "missing"
    for key, value in environment.items():
        if value is not None and not isinstance(value, (str, int, float, bool)):
            return f"environment.{key}", "must be a string, number, boolean or null"

    started = receipt["started_at"]
    try:
        parsed = datetime.fromisoformat(started) if isinstance(started, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:
        return "started_at", f"{started!r} is not a UTC ISO-8601 time such as 2026-11-22T15:40:00Z"
    if not _is_number(receipt["duration_s"]) or receipt["duration_s"] < 0:
        return "duration_s", f"{receipt['duration_s']!r} is not a finite non-negative number of seconds"
    if "extra" in receipt and not isinstance(receipt["extra"], dict):
        return "extra", "must be an object"
    if not _is_hex64(receipt["receipt_sha256"]):
        return "receipt_sha256", "must be 64 lowercase hex digits"
    where = _non_finite(receipt, "")
    if where:
        return where, "NaN or infinity; a receipt holds only finite numbers"
    return None


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _load(path) -> tuple[dict | None, Verdict | None]:
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        return None, Verdict(shown, False, None, f"cannot read the file ({err.strerror or err})")
    except UnicodeDecodeError:
        return None, Verdict(shown, False, None, "not UTF-8 text, so not a receipt")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates), None
    except _DuplicateKey as err:
        return None, Verdict(shown, False, str(err), f"{err}: appears twice in one object (a receipt names each field once)")
    except json.JSONDecodeError as err:
        return None, Verdict(shown, False, None, f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})")


def verify_receipt(path) -> Verdict:
    """Is the file at `path` a well-formed receipt whose content still matches its `receipt_sha256`?"""
    receipt, verdict = _load(path)
    if verdict is not None:
        return verdict
    problem = _first_problem(receipt)
    if problem is not None:
        return Verdict(str(path), False, problem[0], f"{problem[0]}: {problem[1]}")
    actual = content_sha256(receipt)
    if actual != receipt["receipt_sha256"]:
        return Verdict(
            str(path),
            False,
            "receipt_sha256",
            f"receipt_sha256: does not match the content (edited after writing?): recorded "
            f"{receipt['receipt_sha256'][:12]}..., content hashes to {actual[:12]}...",
        )
    return Verdict(str(path), True, None, "intact and well-formed")


def read_receipt(path) -> dict:
    """The receipt at `path`, after `verify_receipt` passes; IKVError naming the failing field otherwise."""
    verdict = verify_receipt(path)
    if not verdict.ok:
        raise IKVError(f"{path} is not a valid receipt: {verdict.message}")
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------------- rerun


@dataclass
class Check:
    """One compared field. kind: "exact" (must be equal), "tolerance" (within the receipt's metric_rtol),
    "ratio" (a timing, reported as new/old, never fails) or "info" (listed, never fails)."""

    field: str
    kind: str
    ok: bool
    old: object
    new: object
    note: str = ""


@dataclass
class RerunReport:
    path: str
    ok: bool
    message: str  # one line: reproduced, or what failed
    checks: list[Check] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as printed by `ikv verify --rerun`: a summary line, then one line per interesting field."""
        out = [f"{'REPRODUCED' if self.ok else 'NOT REPRODUCED'} {self.path}: {self.message}"]
        for check in self.checks:
            if check.kind == "info" and check.old == check.new:
                continue
            label = {"exact": "same", "tolerance": "within", "ratio": "ratio", "info": "info"}[check.kind]
            if not check.ok:
                label = "DIFFERS"
            text = f"  {label:<8} {check.field}"
            if check.kind != "exact" or not check.ok:
                text += f": {_short(check.old)} -> {_short(check.new)}"
            if check.note:
                text += f" ({check.note})"
            out.append(text)
        return out


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_time_unit(unit: str) -> bool:
    """True for times and rates (s, ms, ms/token, tokens/s, MB/s ...): these depend on the machine."""
    parts = unit.strip().split("/")
    return any(part.strip() in TIME_UNITS for part in parts)


def _rtol(config: dict, name: str) -> float:
    tolerances = config.get("metric_rtol")
    if isinstance(tolerances, dict) and _is_number(tolerances.get(name)):
        return float(tolerances[name])
    return 0.0


def compare_receipts(old: dict, new: dict) -> list[Check]:
    """Field-by-field comparison of a receipt with the receipt of its rerun (both already verified).

    Must reproduce exactly: config, model source and weights, input hashes, every output, every gate verdict, and
    metrics that are not timings (unless config.metric_rtol gives that metric a relative tolerance). Timings and
    rates become new/old ratios; environment, duration and extra differences are listed as information.
    """
    checks: list[Check] = []

    def exact(name: str, a, b, note: str = "") -> None:
        checks.append(Check(name, "exact", a == b, a, b, note))

    config_a, config_b = old["config"], new["config"]
    changed = sorted(k for k in set(config_a) | set(config_b) if config_a.get(k, "<unset>") != config_b.get(k, "<unset>"))
    note = ", ".join(f"{k}: {_short(config_a.get(k, '<unset>'), 20)} -> {_short(config_b.get(k, '<unset>'), 20)}" for k in changed)
    checks.append(Check("config", "exact", not changed, f"{len(config_a)} settings", f"{len(config_b)} settings", note))
    exact("model.source", old["model"].get("source"), new["model"].get("source"))
    exact("model.weights_sha256", old["model"].get("weights_sha256"), new["model"].get("weights_sha256"))
    for name, entry in old["inputs"].items():
        exact(f"inputs.{name}.sha256", entry["sha256"], new["inputs"].get(name, {}).get("sha256"))

    for name in old["outputs"]:
        if name not in new["outputs"]:
            checks.append(Check(f"outputs.{name}", "exact", False, old["outputs"][name], None, "missing in the rerun"))
        else:
            exact(f"outputs.{name}", old["outputs"][name], new["outputs"][name])
    for name in new["outputs"]:
        if name not in old["outputs"]:
            checks.append(Check(f"outputs.{name}", "info", True, None, new["outputs"][name], "new in the rerun"))

    old_gates, new_gates = old.get("gates", {}), new.get("gates", {})
    for name, entry in old_gates.items():
        if name not in new_gates:
            checks.append(Check(f"gates.{name}.verdict", "exact", False, entry["verdict"], None, "missing in the rerun"))
        else:
            exact(f"gates.{name}.verdict", entry["verdict"], new_gates[name]["verdict"])
    for name, entry in new_gates.items():
        if name not in old_gates:
            checks.append(Check(f"gates.{name}.verdict", "info", True, None, entry["verdict"], "new in the rerun"))

    for name, entry in old["metrics"].items():
        where = f"metrics.{name}"
        a = entry["value"]
        if name not in new["metrics"]:
            checks.append(Check(where, "exact", False, a, None, "missing in the rerun"))
            continue
        b, unit = new["metrics"][name]["value"], entry["unit"]
        if new["metrics"][name]["unit"] != unit:
            checks.append(Check(where, "exact", False, a, b, f"unit changed: {unit} -> {new['metrics'][name]['unit']}"))
        elif is_time_unit(unit):
            ratio = b / a if a else None
            note = f"{unit}, x{ratio:.3g} new/old" if ratio is not None else f"{unit}, no ratio: old value is 0"
            checks.append(Check(where, "ratio", True, a, b, note))
        elif (rtol := _rtol(old["config"], name)) > 0:
            ok = math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)
            checks.append(Check(where, "tolerance", ok, a, b, f"{unit}, relative tolerance {rtol:g}"))
        else:
            exact(where, a, b, unit)
    for name, entry in new["metrics"].items():
        if name not in old["metrics"]:
            checks.append(Check(f"metrics.{name}", "info", True, None, entry["value"], f"{entry['unit']}, new in the rerun"))

    a, b = old["duration_s"], new["duration_s"]
    checks.append(Check("duration_s", "ratio", True, a, b, f"x{b / a:.3g} new/old" if a else "no ratio: old value is 0"))
    env_a, env_b = old["environment"], new["environment"]
    for key in sorted(set(env_a) | set(env_b)):
        checks.append(Check(f"environment.{key}", "info", True, env_a.get(key), env_b.get(key)))
    extra_a, extra_b = old.get("extra", {}), new.get("extra", {})
    for key in sorted(set(extra_a) | set(extra_b)):
        checks.append(Check(f"extra.{key}", "info", True, extra_a.get(key), extra_b.get(key)))
    return checks


_IKV = [sys.executable, "-m", "infinitekv"]  # how a recorded "ikv" is launched: this Python, this infinitekv


def _expand_home(arg: str) -> str:
    if arg == "~" or arg.startswith("~/"):
        return os.path.expanduser(arg)
    option, sep, value = arg.partition("=")
    if sep and option.startswith("-") and (value == "~" or value.startswith("~/")):
        return f"{option}={os.path.expanduser(value)}"
    return arg


def rerun_argv(command: list[str], receipt_path) -> list[str]:
    """The argv that reruns a recorded command, writing its receipt to `receipt_path` instead of the original's."""
    if not command or command[0] != "ikv":
        raise IKVError(f"only ikv commands can be rerun; this receipt records {command[:1]!r}")
    args, skip = [], False
    for arg in command[1:]:
        if skip:
            skip = False
        elif arg == "--receipt":
            skip = True
        elif not arg.startswith("--receipt="):
            args.append(_expand_home(arg))
    return [*_IKV, *args, "--receipt", str(receipt_path)]


def _check_input_files(receipt: dict) -> list[Check]:
    """Inputs recorded with a path must exist here with the recorded hash, or the rerun cannot reproduce."""
    failing = []
    for name, entry in receipt["inputs"].items():
        if not entry.get("path"):
            continue
        path = Path(_expand_home(entry["path"]))
        where = f"inputs.{name}"
        if not path.is_file():
            failing.append(Check(f"{where}.path", "exact", False, entry["path"], None,
                                 f"not found from {portable_path('.')}; run from the directory the receipt was made in"))
        elif sha256_file(path) != entry["sha256"]:
            failing.append(Check(f"{where}.sha256", "exact", False, entry["sha256"], sha256_file(path),
                                 f"{entry['path']} here is not the file the receipt used"))
    return failing


def rerun_receipt(path, *, timeout_s: float | None = None) -> RerunReport:
    """Run the recorded command again (in the current directory) and compare its receipt with the recorded one."""
    shown = str(path)
    verdict = verify_receipt(path)
    if not verdict.ok:
        return RerunReport(shown, False, f"not rerun: the receipt fails verification: {verdict.message}")
    old = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = _check_input_files(old)
    if missing:
        return RerunReport(shown, False, f"not rerun: {missing[0].field}: {missing[0].note}", missing)
    with tempfile.TemporaryDirectory(prefix="ikv-rerun-") as tmp:
        new_path = Path(tmp) / "receipt.json"
        argv = rerun_argv(old["command"], new_path)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return RerunReport(shown, False, f"the command did not finish within {timeout_s:g} s")
        if not new_path.exists():
            lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
            return RerunReport(shown, False, f"the command exited {done.returncode} without writing a receipt: {lines[-1]}")
        new_verdict = verify_receipt(new_path)
        if not new_verdict.ok:
            return RerunReport(shown, False, f"the rerun wrote an invalid receipt: {new_verdict.message}")
        new = json.loads(new_path.read_text(encoding="utf-8"))
    checks = compare_receipts(old, new)
    failed = [check for check in checks if not check.ok]
    must = [check for check in checks if check.kind in ("exact", "tolerance")]
    if failed:
        message = f"{len(failed)} of {len(must)} fields that must reproduce differ; first: {failed[0].field}"
    else:
        message = f"all {len(must)} fields that must reproduce did; timings shown as new/old ratios"
    if done.returncode != 0:
        message += f" (the command exited {done.returncode})"
    return RerunReport(shown, not failed, message, checks)
