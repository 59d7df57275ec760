"""`ikv bench fuzz`: random and mutated packs, archives and receipts thrown at unpack, inspect/open and verify.

The promise under test is the one every reader of someone else's files makes: a hostile input gets an IKVError (one
line in the CLI) or a clean verdict, never another exception, never a hang, never a write outside the directory the
command was given. Each case runs in a fresh directory; a sentinel directory beside it (with files that case inputs
link to) must be byte-identical afterwards, and nothing else may appear in the work root.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

from infinitekv import codec, receipts
from infinitekv.archive import MANIFEST_NAME, PACK_INDEX_NAME, Archive, Layout, inspect_archive, pack, unpack
from infinitekv.errors import IKVError

# a case is a hang when it spins for CASE_SECONDS of CPU time, or blocks for CASE_WALL_SECONDS of wall clock: on a
# busy machine a niced run gets little CPU, and wall clock alone would call a slow scheduler a hang
CASE_SECONDS = 60
CASE_WALL_SECONDS = 600
HEAD_DIM = 16
LAYOUT = Layout(n_layers=2, n_kv_heads=2, head_dim=HEAD_DIM, record_bytes=codec.record_bytes(HEAD_DIM))


class Hang(Exception):
    pass


@dataclass
class Finding:
    target: str
    mutation: str
    problem: str  # the exception (type and message) or the escaped write, one line
    where: str = ""  # last frame of the traceback

    def as_dict(self) -> dict:
        return {"target": self.target, "mutation": self.mutation, "problem": self.problem, "where": self.where}


@dataclass
class Tally:
    cases: dict = field(default_factory=lambda: {"unpack": 0, "inspect": 0, "verify": 0})
    refused: dict = field(default_factory=lambda: {"unpack": 0, "inspect": 0, "verify": 0})
    findings: list = field(default_factory=list)
    slowest_case_s: float = 0.0


# ---------------------------------------------------------------------------------------------------- seeds


def _seed_archive(path: Path, rng: np.random.Generator, tokens: int) -> None:
    with Archive.create(path, LAYOUT, "fuzz-model", block_tokens=16) as arc:
        for layer in range(LAYOUT.n_layers):
            arc.set_key_mean(layer, rng.standard_normal((LAYOUT.n_kv_heads, HEAD_DIM)).astype(np.float32))
        done = 0
        while done < tokens:
            step = int(rng.integers(1, 30))
            for layer in range(LAYOUT.n_layers):
                arc.append(layer, rng.integers(0, 256, (step, LAYOUT.n_kv_heads, LAYOUT.record_bytes), np.uint8))
            done += step
            arc.commit({"token_ids": np.arange(done), "hot": rng.standard_normal((2, 3)).astype(np.float32)},
                       {"n": done})


def _seed_receipt() -> dict:
    return receipts.build_receipt(
        command=["ikv", "run", "--archive", "mem", "--prompt-file", "book.txt", "--question", "Who?"],
        config={"hot_window": 1024, "sinks": 4, "metric_rtol": {"kl": 0.01}},
        model={"source": "smollm2-135m", "weights_sha256": "ab" * 32},
        inputs={"question": receipts.text_input("Who?")},
        outputs={"answer": "the narrator", "nested": {"a": [1, 2, {"b": None}]}},
        metrics={"decode_ms_per_token": receipts.metric(41.7, "ms/token"), "kl": receipts.metric(0.01, "nats")},
        gates={"g": receipts.gate(True, "ok")},
        started_at="2026-11-22T15:40:00Z",
        duration_s=1.5,
    )


# ------------------------------------------------------------------------------------------------ mutations


def _mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(data)
    kind = rng.choice(["flip", "flip", "truncate", "insert", "duplicate", "zero", "random", "splice_int"])
    if not data or kind == "random":
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 64, 512, 4096]))), "random"
    at = rng.randrange(len(data))
    if kind == "flip":
        for _ in range(rng.choice([1, 1, 2, 8])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[at:]
    elif kind == "insert":
        data[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 8, 512])))
    elif kind == "duplicate":
        end = min(len(data), at + rng.choice([8, 512, 4096]))
        data[at:at] = data[at:end]
    elif kind == "zero":
        end = min(len(data), at + rng.choice([1, 16, 4096]))
        data[at:end] = bytes(end - at)
    else:  # an 8-byte little-endian integer (a size or count) written somewhere
        value = rng.choice([0, 1, 2**31 - 1, 2**32, 2**62, 2**64 - 1])
        data[at:at + 8] = value.to_bytes(8, "little")
    return bytes(data), kind


_JSON_VALUES = [None, True, 0, -1, 2**63, 2**70, 1e308, "", "x" * 5000, [], {}, [[[[[]]]]], "../../etc/passwd",
                "/etc/passwd", "~", "layer-000.ikv", "MANIFEST", "nan", 0.5]


_DEEP = "__ikv_fuzz_nesting__"


def _dumps(obj, **kwargs) -> str:
    """json.dumps, with the deep-nesting markers _mutate_json leaves expanded into real nesting (which json.dumps
    itself could not write)."""
    import re

    text = json.dumps(obj, **kwargs)
    return re.sub(f'"{_DEEP}(\\d+)"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text)


def _mutate_json(obj, rng: random.Random):
    """Replace, delete or deepen one randomly chosen value anywhere inside `obj` (in place when possible)."""
    paths = []

    def walk(node, trail):
        paths.append(trail)
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, trail + [key])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, trail + [i])

    walk(obj, [])
    trail = rng.choice(paths)
    if not trail:
        return rng.choice(_JSON_VALUES), "replace the whole document"
    parent = obj
    for step in trail[:-1]:
        parent = parent[step]
    last = trail[-1]
    action = rng.choice(["replace", "replace", "delete", "deepen", "add"])
    if action == "delete":
        del parent[last]
    elif action == "deepen":
        depth = rng.choice([10, 100, 5000, 200000])
        value = []
        for _ in range(min(depth, 100)):
            value = [value]
        parent[last] = value if depth <= 100 else f"{_DEEP}{depth}"
    elif action == "add" and isinstance(parent, dict):
        parent[rng.choice(["extra_field", "__proto__", "signature", "schema"])] = rng.choice(_JSON_VALUES)
    else:
        parent[last] = rng.choice(_JSON_VALUES)
    return obj, f"{action} {'.'.join(map(str, trail))[:60]}"


def _tar_members(pack_bytes: bytes) -> list[tuple[str, bytes]]:
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(pack_bytes)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _build_pack(members: list[tuple[str, bytes]], sizes: dict | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(raw.getvalue())


def _mutated_pack(seed_pack: bytes, rng: random.Random, sentinel: Path) -> tuple[bytes, str]:
    kind = rng.choice(["bytes", "member", "index", "bomb", "names", "links"])
    if kind == "bytes":
        data, how = _mutate_bytes(seed_pack, rng)
        return data, f"pack bytes: {how}"
    members = _tar_members(seed_pack)
    if kind == "member":  # damage one member, recompressed so the zstd checksum passes
        i = rng.randrange(len(members))
        data, how = _mutate_bytes(members[i][1], rng)
        members[i] = (members[i][0], data)
        return _build_pack(members), f"member {members[i][0]}: {how}"
    if kind == "index":
        index = json.loads(members[0][1])
        index, how = _mutate_json(index, rng)
        members[0] = (PACK_INDEX_NAME, _dumps(index).encode())
        return _build_pack(members), f"index: {how}"
    if kind == "bomb":  # a member far larger than declared, made of zeros (compresses ~1000x)
        i = rng.randrange(1, len(members))
        members[i] = (members[i][0], bytes(rng.choice([1 << 20, 16 << 20, 64 << 20])))
        return _build_pack(members), f"bomb in {members[i][0]}"
    if kind == "names":
        i = rng.randrange(len(members))
        name = rng.choice(["../escape", "/tmp/abs", str(sentinel / "victim"), "a/../../b", "MANIFEST/x", "", "."])
        members[i] = (name, members[i][1])
        return _build_pack(members), f"member renamed {name!r}"
    # links: tar members that are symlinks or hard links pointing at the sentinel
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for j, (name, data) in enumerate(members):
            info = tarfile.TarInfo(name)
            if j == 1:
                info.type = rng.choice([tarfile.SYMTYPE, tarfile.LNKTYPE])
                info.linkname = str(sentinel / "victim")
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return zstandard.ZstdCompressor(level=1).compress(raw.getvalue()), "member is a link to the sentinel"


def _mutate_archive(path: Path, rng: random.Random, sentinel: Path) -> str:
    """Damage an archive directory in place: bytes of one file, a file replaced by a link, directory or FIFO, a
    manifest whose checksum is recomputed over a changed body."""
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.is_symlink() and p.stat().st_nlink == 1)
    if not files:
        return "nothing left to damage"
    target = rng.choice(files)
    kind = rng.choice(["bytes", "bytes", "manifest_json", "symlink", "hardlink", "directory", "fifo", "remove",
                       "extend"])
    if kind == "bytes":
        data, how = _mutate_bytes(target.read_bytes(), rng)
        target.write_bytes(data)
        return f"{target.name}: {how}"
    manifest = path / MANIFEST_NAME
    if kind == "manifest_json" and manifest.is_file() and not manifest.is_symlink():
        import struct

        import xxhash

        raw = manifest.read_bytes()
        head = struct.Struct("<8sIIQQ")
        try:
            magic, version, reserved, _, _ = head.unpack_from(raw)
            body, how = _mutate_json(json.loads(raw[head.size:]), rng)
        except (ValueError, struct.error, RecursionError):  # an earlier mutation already broke (or deepened) it
            return "manifest: already damaged"
        text = _dumps(body).encode()
        (path / MANIFEST_NAME).write_bytes(head.pack(magic, version, reserved, len(text), xxhash.xxh3_64_intdigest(text))
                                           + text)
        return f"manifest (valid checksum): {how}"
    if kind == "manifest_json":
        kind = "remove"
    target.unlink()
    if kind == "symlink":
        target.symlink_to(sentinel / "victim")
    elif kind == "hardlink":
        os.link(sentinel / "victim", target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "extend":
        target.write_bytes(bytes(rng.choice([1, 4096, 1 << 20])))
    return f"{target.name}: {kind}"


# ---------------------------------------------------------------------------------------------------- running


def _tree_state(root: Path) -> dict:
    state = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        state[str(p.relative_to(root))] = (st.st_mode, st.st_size,
                                           hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not
                                           p.is_symlink() else os.readlink(p) if p.is_symlink() else "")
    return state


def _alarm(signum, frame):
    raise Hang()


def _one_case(target: str, run, mutation: str, tally: Tally, root: Path, own: tuple, sentinel: Path,
              before: dict) -> None:
    tally.cases[target] += 1
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_PROF, CASE_SECONDS)
    signal.alarm(CASE_WALL_SECONDS)
    try:
        if run():
            tally.refused[target] += 1
    except IKVError:
        tally.refused[target] += 1
    except Hang:
        tally.findings.append(Finding(target, mutation, f"hang: no answer within {CASE_SECONDS} s of CPU time "
                                                        f"or {CASE_WALL_SECONDS} s of wall clock"))
    except Exception as err:  # noqa: BLE001 - anything but IKVError is exactly what the fuzz run looks for
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        tally.findings.append(Finding(target, mutation, f"{type(err).__name__}: {str(err)[:160]}", where))
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.alarm(0)
    tally.slowest_case_s = max(tally.slowest_case_s, time.perf_counter() - start)
    if _tree_state(sentinel) != before:
        tally.findings.append(Finding(target, mutation, "the sentinel beside the case directory changed"))
        shutil.rmtree(sentinel)
        _make_sentinel(sentinel)
    strays = sorted(p.name for p in root.iterdir() if p not in (*own, sentinel))
    if strays:
        tally.findings.append(Finding(target, mutation, f"wrote outside its directory: {strays[:3]}"))
        for name in strays:
            stray = root / name
            shutil.rmtree(stray) if stray.is_dir() and not stray.is_symlink() else stray.unlink()


def _make_sentinel(sentinel: Path) -> None:
    sentinel.mkdir()
    (sentinel / "victim").write_bytes(b"the sentinel must never change\n" * 100)


def fuzz(minutes: float, seed: int = 0, work_root: Path | None = None) -> dict:
    """Run for `minutes`, cycling unpack, inspect/open and verify over mutated seeds; returns receipt parts."""
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    root = Path(tempfile.mkdtemp(prefix="ikv-fuzz-", dir=work_root))
    sentinel = root / "sentinel"
    _make_sentinel(sentinel)
    before = _tree_state(sentinel)
    seeds = root / "seeds"
    _seed_archive(seeds / "mem", nprng, tokens=40)
    pack(seeds / "mem", seeds / "mem.zst")
    seed_pack = (seeds / "mem.zst").read_bytes()
    seed_receipt = _seed_receipt()
    tally = Tally()
    deadline = time.monotonic() + 60 * minutes
    case_index = 0
    old_handlers = {sig: signal.signal(sig, _alarm) for sig in (signal.SIGALRM, signal.SIGPROF)}
    try:
        while time.monotonic() < deadline:
            case_index += 1
            case = root / f"case-{case_index}"
            case.mkdir()
            target = ("unpack", "inspect", "verify")[case_index % 3]
            try:
                run, mutation = _prepare(target, case, rng, sentinel, seeds, seed_pack, seed_receipt)
            except (ValueError, RecursionError, OSError):  # the mutator broke its own input: not a case, skip it
                shutil.rmtree(case, ignore_errors=True)
                continue
            _one_case(target, run, mutation, tally, root, (case, seeds), sentinel, before)
            shutil.rmtree(case, ignore_errors=True)
            if case.exists():
                os.system(f"chmod -R u+rwx {case}")  # noqa: S605 - our own directory, a fixed name
                shutil.rmtree(case, ignore_errors=True)
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        shutil.rmtree(root, ignore_errors=True)
    return _parts(minutes, seed, tally)


def _prepare(target, case, rng, sentinel, seeds, seed_pack, seed_receipt):
    """The case's hostile input, written under `case`, and the call that reads it: (run, mutation)."""
    if target == "unpack":
        data, mutation = _mutated_pack(seed_pack, rng, sentinel)
        (case / "in.zst").write_bytes(data)
        run = lambda: unpack(case / "in.zst", case / "out") and False  # noqa: E731
    elif target == "inspect":
        shutil.copytree(seeds / "mem", case / "mem", symlinks=True)
        mutation = "; ".join(_mutate_archive(case / "mem", rng, sentinel) for _ in range(rng.choice([1, 1, 2])))
        writable = rng.random() < 0.5
        mutation += " (opened for writing)" if writable else " (inspected)"

        def run(case=case, writable=writable):
            if writable:
                Archive.open(case / "mem", writable=True).close()
                return False
            return inspect_archive(case / "mem")["integrity"] != "ok"
    else:
        receipt = json.loads(json.dumps(seed_receipt))
        mutation = "receipt: "
        if rng.random() < 0.5:
            receipt, how = _mutate_json(receipt, rng)
            if rng.random() < 0.5 and isinstance(receipt, dict):  # re-hashed: gets past the hash check
                try:
                    receipt["receipt_sha256"] = receipts.content_sha256(receipt)
                    how += ", re-hashed"
                except (TypeError, ValueError, RecursionError, AttributeError):
                    pass
            text = _dumps(receipt).encode()
        else:
            text, how = _mutate_bytes(_dumps(receipt, indent=2).encode(), rng)
        mutation += how
        (case / "r.json").write_bytes(text)

        def run(case=case):
            verdict = receipts.verify_receipt(case / "r.json", strict=rng.random() < 0.3)
            try:  # the rerun planner reads the command of a hostile receipt too (never runs it here)
                loaded = json.loads((case / "r.json").read_text())
                if isinstance(loaded, dict) and isinstance(loaded.get("command"), list) and \
                        all(isinstance(a, str) for a in loaded["command"]):
                    receipts.plan_rerun(loaded["command"], case / "rerun")
            except (IKVError, ValueError, RecursionError):
                pass
            return not verdict.ok
    return run, mutation


def _parts(minutes: float, seed: int, tally: Tally) -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cases = sum(tally.cases.values())
    distinct = {}
    for finding in tally.findings:
        distinct.setdefault((finding.target, finding.problem.split(":")[0], finding.where), finding)
    return {
        # case counts depend on the machine's speed (the run is bounded in time), so a rerun matches them loosely
        "config": {"minutes": minutes, "seed": seed, "case_cpu_seconds": CASE_SECONDS,
                   "case_wall_seconds": CASE_WALL_SECONDS,
                   "metric_rtol": {name: 1.0 for name in ("unpack_cases", "inspect_cases", "verify_cases",
                                                          "unpack_refused", "inspect_refused", "verify_refused",
                                                          "peak_rss_bytes")}},
        "outputs": {"findings": [f.as_dict() for f in list(distinct.values())[:50]]},
        "metrics": {
            **{f"{t}_cases": receipts.metric(n, "cases") for t, n in tally.cases.items()},
            **{f"{t}_refused": receipts.metric(n, "cases") for t, n in tally.refused.items()},
            "findings": receipts.metric(len(tally.findings), "cases"),
            "slowest_case_s": receipts.metric(round(tally.slowest_case_s, 3), "s"),
            "peak_rss_bytes": receipts.metric(peak, "bytes"),
        },
        "gates": {"no_traceback_hang_or_escape": receipts.gate(
            not tally.findings and cases > 0,
            f"{cases:,} cases, {len(tally.findings)} findings ({len(distinct)} distinct)")},
    }
