"""Receipts: a hashed JSON record of one run, and the two checks that make a published number trustworthy.

Every `ikv run` and `ikv bench ...` writes one. RECEIPTS.md documents the schema field by field. `verify_receipt`
says whether a file is well-formed and unedited (`receipt_sha256` is the SHA-256 of the canonical JSON of every other
field); `rerun_receipt` runs the recorded command again and compares the new receipt with the old one field by field:
outputs, gate verdicts and the model fingerprint must match exactly, timings are reported as ratios and never fail.

A receipt never holds environment variables, and paths are written relative to the working directory or with `~`
for the home directory, so receipts can be published as they are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
import shlex
import signal
import stat
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
OPTIONAL_FIELDS = ("gates", "extra", "signature")
MAX_RECEIPT_BYTES = 16 << 20  # receipts are kilobytes; anything this large is refused before it is parsed
MAX_NESTING = 64  # deeper JSON than any receipt holds is refused (and never reaches a recursive walk)
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
    """SHA-256 (hex) of the canonical JSON of every field except `receipt_sha256` itself and the `signature` over
    it (a signature is added after the receipt is written, by whoever vouches for it)."""
    body = {key: value for key, value in receipt.items() if key not in ("receipt_sha256", "signature")}
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
    warnings: list[str] = field(default_factory=list)  # provenance doubts (failures under strict)
    signer: str | None = None  # fingerprint of the key whose valid signature the receipt carries


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
    if "signature" in receipt:
        problem = _signature_problem(receipt["signature"])
        if problem:
            return problem
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


def _read_bounded(path) -> bytes:
    """The file's bytes if it is a regular file of at most MAX_RECEIPT_BYTES; OSError or ValueError otherwise.
    O_NONBLOCK: a FIFO passed as a receipt must not hang verify."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file (a directory, device or pipe), so not a receipt")
        data = os.read(fd, MAX_RECEIPT_BYTES + 1)
        while len(data) <= MAX_RECEIPT_BYTES and (more := os.read(fd, MAX_RECEIPT_BYTES + 1 - len(data))):
            data += more
    finally:
        os.close(fd)
    if len(data) > MAX_RECEIPT_BYTES:
        raise ValueError(f"larger than {MAX_RECEIPT_BYTES >> 20} MiB, so not a receipt (receipts are kilobytes)")
    return data


def _nesting(text: str) -> int:
    """How deep objects and arrays nest, counted without recursion (string contents skipped)."""
    depth = deepest = 0
    for match in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        token = match.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "]}":
            depth -= 1
    return deepest


def _load(path) -> tuple[dict | None, Verdict | None]:
    shown = str(path)
    try:
        text = _read_bounded(path).decode("utf-8")
    except OSError as err:
        return None, Verdict(shown, False, None, f"cannot read the file ({err.strerror or err})")
    except ValueError as err:  # UnicodeDecodeError is a ValueError
        why = "not UTF-8 text, so not a receipt" if isinstance(err, UnicodeDecodeError) else str(err)
        return None, Verdict(shown, False, None, why)
    if _nesting(text) > MAX_NESTING:
        return None, Verdict(shown, False, None, f"JSON nested deeper than {MAX_NESTING} levels, so not a receipt")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates), None
    except _DuplicateKey as err:
        return None, Verdict(shown, False, str(err), f"{err}: appears twice in one object (a receipt names each field once)")
    except json.JSONDecodeError as err:
        return None, Verdict(shown, False, None, f"not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})")
    except (RecursionError, ValueError) as err:  # huge integers, nesting the count above missed
        return None, Verdict(shown, False, None, f"not a receipt ({type(err).__name__}: {str(err)[:80]})")


def verify_receipt(path, *, trusted: dict[str, str] | None = None, strict: bool = False) -> Verdict:
    """Is the file at `path` a well-formed receipt whose content still matches its `receipt_sha256`?

    That is integrity only: anyone can recompute the hash. A `signature`, if present, must verify; with `trusted`
    ({public key hex: name}, from `load_trusted_keys`) the receipt must be signed by one of those keys. Provenance
    doubts (made on a dirty tree, at a commit this checkout does not have, by another infinitekv version) come back
    as warnings, and fail the receipt when `strict`.
    """
    shown = str(path)
    receipt, verdict = _load(path)
    if verdict is not None:
        return verdict
    problem = _first_problem(receipt)
    if problem is not None:
        return Verdict(shown, False, problem[0], f"{problem[0]}: {problem[1]}")
    actual = content_sha256(receipt)
    if actual != receipt["receipt_sha256"]:
        return Verdict(
            shown,
            False,
            "receipt_sha256",
            f"receipt_sha256: does not match the content (edited after writing?): recorded "
            f"{receipt['receipt_sha256'][:12]}..., content hashes to {actual[:12]}...",
        )
    signer = None
    if "signature" in receipt:
        if not _signature_valid(receipt):
            return Verdict(shown, False, "signature", "signature: does not verify against receipt_sha256 (edited "
                           "after signing, or not signed by the key it names)")
        signer = key_fingerprint(receipt["signature"]["public_key"])
    if trusted is not None:
        key = receipt.get("signature", {}).get("public_key")
        if key is None:
            return Verdict(shown, False, "signature", "signature: missing, and --trust asks for a receipt signed by a "
                           "trusted key")
        if key not in trusted:
            return Verdict(shown, False, "signature", f"signature: signed by key {signer}, which is not among the "
                           "trusted keys")
    warnings = provenance_warnings(receipt)
    if strict and warnings:
        return Verdict(shown, False, "provenance", f"provenance: {warnings[0]} (--strict)", warnings, signer)
    message = "intact and well-formed" + (f"; signed by {signer}" if signer else "")
    return Verdict(shown, True, None, message, warnings, signer)


def read_receipt(path) -> dict:
    """The receipt at `path`, after `verify_receipt` passes; IKVError naming the failing field otherwise."""
    verdict = verify_receipt(path)
    if not verdict.ok:
        raise IKVError(f"{path} is not a valid receipt: {verdict.message}")
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------- provenance


@functools.lru_cache(maxsize=1)
def _this_checkout() -> tuple[Path | None, str | None, bool | None]:
    """(repository root, HEAD commit, dirty?) of the checkout infinitekv is imported from; Nones when installed."""
    repo = Path(__file__).resolve().parent.parent
    commit, dirty = _git_state()
    return (repo if commit else None), commit, dirty


def provenance_warnings(receipt: dict) -> list[str]:
    """What makes a receipt weaker evidence for the code in this checkout: a dirty tree, a commit this checkout's
    history does not contain, another infinitekv version. Empty when none applies."""
    env, out = receipt["environment"], []
    if env.get("git_dirty"):
        out.append(f"made on a tree with uncommitted changes (git_dirty at {env.get('git_commit')}), so no commit "
                   "holds the code it measured")
    commit = env.get("git_commit")
    repo, _, _ = _this_checkout()
    if commit is None:
        out.append("records no git commit (made from an installed package), so the code it measured is unknown")
    elif repo is not None:
        if not re.fullmatch(r"[0-9a-f]{7,40}", str(commit)):
            out.append(f"git_commit {commit!r} is not a commit hash")
        elif _git(["merge-base", "--is-ancestor", str(commit), "HEAD"], repo) is None:
            out.append(f"commit {commit} is not in this checkout's history")
    version = env.get("infinitekv")
    if version != __version__:
        out.append(f"made by infinitekv {version}, this is {__version__}")
    return out


# ------------------------------------------------------------------------------------------------- signatures

SIGNATURE_ALGORITHM = "ed25519"
_PUBLIC_KEY_LINE = re.compile(r"ed25519 ([0-9a-f]{64})(?: (.*))?")


def _signed_bytes(receipt_sha256: str) -> bytes:
    """What a signature covers: the schema and the content hash (which covers every other field)."""
    return f"{SCHEMA} receipt_sha256 {receipt_sha256}".encode("ascii")


def key_fingerprint(public_key_hex: str) -> str:
    """A short name for a public key: ed25519:<first 16 hex digits of its SHA-256>."""
    return "ed25519:" + hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:16]


def _signature_problem(signature) -> tuple[str, str] | None:
    if not isinstance(signature, dict) or set(signature) != {"algorithm", "public_key", "value"}:
        return "signature", "must be an object {algorithm, public_key, value}"
    if signature["algorithm"] != SIGNATURE_ALGORITHM:
        return "signature.algorithm", f"{signature['algorithm']!r} is not {SIGNATURE_ALGORITHM!r}"
    if not _is_hex64(signature["public_key"]):
        return "signature.public_key", "must be 64 lowercase hex digits (a raw ed25519 public key)"
    if not isinstance(signature["value"], str) or not re.fullmatch(r"[0-9a-f]{128}", signature["value"]):
        return "signature.value", "must be 128 lowercase hex digits (a raw ed25519 signature)"
    return None


def _signature_valid(receipt: dict) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signature = receipt["signature"]
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(signature["public_key"]))
        key.verify(bytes.fromhex(signature["value"]), _signed_bytes(receipt["receipt_sha256"]))
    except (InvalidSignature, ValueError):
        return False
    return True


def generate_key(path) -> tuple[Path, Path]:
    """A new ed25519 key pair: the private key at `path` (PEM, mode 0600, never overwritten) and the public key at
    `path`.pub (one line, `ed25519 <hex> <name>`), which is what others pass to `ikv verify --trust`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(path).expanduser(), Path(str(Path(path).expanduser()) + ".pub")
    for target in (private_path, public_path):
        if os.path.lexists(target):
            raise IKVError(f"{target} already exists; choose a new key file name (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(f"ed25519 {public} {private_path.name}\n")
    except OSError as err:
        raise IKVError(f"cannot write key {private_path} ({err.strerror or err}); choose a writable path") from None
    return private_path, public_path


def _load_private_key(path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = _read_bounded(Path(path).expanduser())
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as err:
        raise IKVError(f"cannot read private key {path} ({getattr(err, 'strerror', None) or err}); pass the file "
                       "`ikv keygen` wrote (not the .pub)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IKVError(f"{path} is not an ed25519 private key; make one with ikv keygen")
    return key


def load_trusted_keys(paths) -> dict[str, str]:
    """{public key hex: where it came from} from files of `ed25519 <hex> [name]` lines (what ikv keygen writes)."""
    trusted = {}
    for path in paths:
        try:
            lines = _read_bounded(Path(path).expanduser()).decode("utf-8").splitlines()
        except (OSError, ValueError) as err:
            raise IKVError(f"cannot read trusted key file {path} ({getattr(err, 'strerror', None) or err}); pass a "
                           ".pub file written by ikv keygen") from None
        keys = [m.group(1) for line in lines if (m := _PUBLIC_KEY_LINE.fullmatch(line.strip()))]
        if not keys or len(keys) != len([line for line in lines if line.strip()]):
            raise IKVError(f"{path} is not a public key file (each line must be `ed25519 <64 hex digits> [name]`); "
                           "pass a .pub file written by ikv keygen")
        trusted.update({key: str(path) for key in keys})
    return trusted


def sign_receipt_file(path, key_path) -> str:
    """Add (or replace) the signature of a receipt that verifies; returns the signer's fingerprint."""
    from cryptography.hazmat.primitives import serialization

    key = _load_private_key(key_path)
    verdict = verify_receipt(path)
    if not verdict.ok and verdict.failing_field != "signature":
        raise IKVError(f"{path} is not a valid receipt ({verdict.message}); only intact receipts are signed")
    receipt = json.loads(_read_bounded(path).decode("utf-8"))
    if content_sha256(receipt) != receipt["receipt_sha256"]:
        raise IKVError(f"{path} does not match its receipt_sha256; only intact receipts are signed")
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    receipt["signature"] = {"algorithm": SIGNATURE_ALGORITHM, "public_key": public,
                            "value": key.sign(_signed_bytes(receipt["receipt_sha256"])).hex()}
    write_receipt(receipt, path)
    return key_fingerprint(public)


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


# How a recorded "ikv" is launched: this Python in isolated mode (-I: no current directory, PYTHONPATH or user site on
# sys.path), with the infinitekv package that is running verify loaded from its own directory by file location. So a
# numpy.py or infinitekv/ lying in a downloaded results folder is never imported.
_LAUNCHER = (
    "import importlib.util, sys\n"
    "package = sys.argv.pop(1)\n"
    "spec = importlib.util.spec_from_file_location('infinitekv', package + '/__init__.py',"
    " submodule_search_locations=[package])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules['infinitekv'] = module\n"
    "spec.loader.exec_module(module)\n"
    "sys.argv[0] = 'ikv'\n"
    "from infinitekv.cli import main\n"
    "main()\n"
)


def launch_prefix() -> list[str]:
    """argv that runs `ikv` from this installed infinitekv, isolated from the current directory and environment."""
    return [sys.executable, "-I", "-c", _LAUNCHER, str(Path(__file__).resolve().parent)]


# Options of `ikv run` / `ikv bench ...` that name a path: written (confined to the rerun's fresh directory) or read.
_WRITES = ("archive", "receipt", "heatmap")
_READS = ("prompt_file", "model")


@dataclass
class RerunPlan:
    """What `--rerun` will execute: `argv` (shown to the user as `shown`) in the fresh directory `workdir`."""

    argv: list[str]
    shown: list[str]
    workdir: Path
    receipt: Path  # where the rerun's receipt appears
    notes: list[str] = field(default_factory=list)  # each rewrite made to keep the command inside workdir
    links: dict[str, Path] = field(default_factory=dict)  # workdir-relative name -> input it points at


def _safe_relative(value: str) -> bool:
    parts = Path(value).parts
    return bool(value) and not Path(value).is_absolute() and not value.startswith("~") and ".." not in parts \
        and "\0" not in value


def _click():
    """The click that typer runs on (recent typer versions carry their own copy)."""
    import typer.core

    return getattr(typer.core, "_click", None) or typer.core.click


def _takes_path(param) -> bool:
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return annotation is Path or type(getattr(param, "type", None)).__name__ == "Path"


def _parsed(args: list[str]):
    """Parse `args` with the real `ikv` command line (nothing runs): (click command, context) or IKVError."""
    import typer

    from infinitekv import cli

    click = _click()

    if any(arg in ("--help", "-h") for arg in args):
        raise IKVError("it asks for --help, which is not a run or a bench")
    group = typer.main.get_command(cli.app)
    if not args or args[0] not in ("run", "bench"):
        raise IKVError(f"only `ikv run` and `ikv bench ...` commands are rerun; this receipt records "
                       f"`ikv {' '.join(args[:2])}`")
    name, rest, command = args[0], args[1:], group.get_command(None, args[0])
    if name == "bench":
        if not rest or command.get_command(None, rest[0]) is None:
            raise IKVError(f"`ikv bench {rest[0] if rest else ''}` is not a bench this infinitekv has")
        name, command, rest = f"bench {rest[0]}", command.get_command(None, rest[0]), rest[1:]
    try:
        return command, command.make_context(name, list(rest))
    except click.exceptions.ClickException as err:
        raise IKVError(f"`ikv {name}` refuses its arguments: {err.format_message()}") from None
    except click.exceptions.Exit:
        raise IKVError(f"`ikv {name}` would exit before running") from None


def plan_rerun(command: list[str], workdir: Path) -> RerunPlan:
    """The argv that reruns a recorded command safely, or IKVError saying why it will not be run.

    Only `ikv run` and `ikv bench ...` are rerun, never a --resume (it would continue an existing archive). The
    command's arguments are parsed by the real command line first, so an option this plan does not know can not
    slip through. Paths it writes are kept inside `workdir` (a relative path as is, anything else renamed there);
    paths it reads are reached from there through symbolic links, so receipts record the same relative names.
    """
    if not command or command[0] != "ikv":
        raise IKVError(f"only ikv commands can be rerun; this receipt records {command[:1]!r}")
    args = list(command[1:])
    click_command, ctx = _parsed(args)
    if ctx.params.get("resume"):
        raise IKVError("it is a --resume, which continues (and writes to) an existing archive; rerun the receipt of "
                       "the run that created the archive instead")
    by_flag = {}
    for param in click_command.params:
        if getattr(param, "param_type_name", None) == "option":
            for flag in param.opts:
                by_flag[flag] = param.name
            if _takes_path(param) and param.name not in _WRITES + _READS:
                if ctx.get_parameter_source(param.name) == _click().core.ParameterSource.COMMANDLINE:
                    raise IKVError(f"its option {param.opts[0]} names a path this infinitekv cannot tell is safe to "
                                   "rerun")
    plan = RerunPlan([], [], workdir, workdir / "receipt.json")
    out, i, taken = [], 0, 0
    sub = args[:2] if args[0] == "bench" else args[:1]
    i = len(sub)
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        name = by_flag.get(flag) if flag.startswith("--") else None
        if name not in _WRITES + _READS:
            out.append(arg)
            i += 1
            continue
        if not eq:
            value, i = args[i + 1], i + 1
        i += 1
        if name == "receipt":
            if _safe_relative(value):
                plan.receipt = workdir / value
            continue  # the rerun's own --receipt is appended below
        if name in _WRITES:
            if not _safe_relative(value):
                taken += 1
                plan.notes.append(f"{flag} {value} is written as {flag} out-{taken} inside the rerun directory")
                value = f"out-{taken}"
        else:
            value = _reachable_input(name, value, plan)
        out += [flag, value]
    receipt_name = plan.receipt.relative_to(workdir).as_posix()
    plan.shown = ["ikv", *sub, *out, "--receipt", receipt_name]
    plan.argv = [*launch_prefix(), *plan.shown[1:]]
    return plan


def _reachable_input(name: str, value: str, plan: RerunPlan) -> str:
    """An input path as the rerun (running in plan.workdir) reaches it: the same relative name through a link."""
    expanded = os.path.expanduser(value)
    if name == "model" and not os.path.exists(expanded):
        return value  # a hub id or the built-in default, not a path
    absolute = Path(os.path.abspath(expanded))
    if _safe_relative(value):
        plan.links[value] = absolute
        return value
    return str(absolute)


def _check_input_files(receipt: dict) -> list[Check]:
    """Inputs recorded with a path must exist here with the recorded hash, or the rerun cannot reproduce."""
    failing = []
    for name, entry in receipt["inputs"].items():
        if not entry.get("path"):
            continue
        path = Path(os.path.expanduser(entry["path"]))
        where = f"inputs.{name}"
        if not path.is_file():
            failing.append(Check(f"{where}.path", "exact", False, entry["path"], None,
                                 f"not found from {portable_path('.')}; run from the directory the receipt was made in"))
        elif sha256_file(path) != entry["sha256"]:
            failing.append(Check(f"{where}.sha256", "exact", False, entry["sha256"], sha256_file(path),
                                 f"{entry['path']} here is not the file the receipt used"))
    return failing


def _run_confined(plan: RerunPlan, timeout_s: float | None) -> subprocess.CompletedProcess | None:
    """Run the plan in its own process group, so a timeout (or Ctrl-C) ends the command and everything it
    started; None on timeout."""
    try:
        for name, target in plan.links.items():
            link = plan.workdir / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)
        plan.receipt.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # two recorded paths that cannot both be laid out (a file where a directory must go)
        raise IKVError(f"its paths cannot be laid out in the rerun directory ({err.strerror or err})") from None
    env = {**os.environ, "TMPDIR": str(plan.workdir)}  # temporary files of the command land in workdir too
    proc = subprocess.Popen(plan.argv, cwd=plan.workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(plan.argv, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def rerun_receipt(path, *, timeout_s: float | None = None, confirm=None) -> RerunReport:
    """Run the recorded command again in a fresh temporary directory and compare its receipt with the recorded one.

    `confirm(plan) -> bool` is asked before anything runs (the CLI shows the argv and asks, unless --yes); a plan
    that is refused, or a receipt whose command is not safe to rerun, gives a report saying why.
    """
    shown = str(path)
    verdict = verify_receipt(path)
    if not verdict.ok:
        return RerunReport(shown, False, f"not rerun: the receipt fails verification: {verdict.message}")
    old = json.loads(_read_bounded(path).decode("utf-8"))
    missing = _check_input_files(old)
    if missing:
        return RerunReport(shown, False, f"not rerun: {missing[0].field}: {missing[0].note}", missing)
    with tempfile.TemporaryDirectory(prefix="ikv-rerun-") as tmp:
        try:
            plan = plan_rerun(old["command"], Path(tmp))
        except IKVError as err:
            return RerunReport(shown, False, f"not rerun: {err}")
        if confirm is not None and not confirm(plan):
            return RerunReport(shown, False, "not rerun: declined")
        try:
            done = _run_confined(plan, timeout_s)
        except IKVError as err:
            return RerunReport(shown, False, f"not rerun: {err}")
        if done is None:
            return RerunReport(shown, False, f"the command did not finish within {timeout_s:g} s (it and every "
                               "process it started were killed)")
        new_path = plan.receipt
        if not new_path.is_file():
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


def shown_command(plan: RerunPlan) -> str:
    return shlex.join(plan.shown)
