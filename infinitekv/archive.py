"""The cold tier: every evicted token's records, append-only, in one file per layer, committed atomically with the
engine's state.

FORMAT.md describes every byte on disk. In short, an archive directory holds

    MANIFEST                    the last committed point: layout, fingerprint, token count, one xxh3 per block, state,
                                and the codec's rotation R and per-layer key means mu that the records are coded with
    layer-000.ikv ...           one shard per layer: a 4096-byte header, then records [N, n_kv_heads, record_bytes]
    state-00000007.safetensors  the engine's state at that commit (hot tier, token ids), never pickle
    LOCK                        flock'ed by the one writer; holds its pid

`append` writes records straight into the shard (visible to `records()` at once, through a memory map); `commit`
makes them durable: fsync the shards, write the state file, then atomically replace MANIFEST. Anything past the
last MANIFEST is dropped on the next writable open, so a crash at any instant reopens at the last commit.

The search never touches the shards: `signatures()` and `key_weights()` are a derived index kept in RAM, grown with
capacity doubling on append and rebuilt (while every block checksum is verified) on open. It costs D/8 + 2 bytes per
(layer, kv-head, token), 10 for head_dim 64: under 1/25 of the 4D bytes of fp16 key and value it stands in for.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import mmap
import os
import re
import shutil
import stat
import struct
import tarfile
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash
import zstandard
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from infinitekv import codec
from infinitekv.errors import IKVError

FORMAT_VERSION = 2  # 2: MANIFEST holds the rotation R and key means mu (FORMAT.md, "The codec: R and mu")
HEADER_BYTES = 4096
SHARD_MAGIC = b"IKVSHARD"
MANIFEST_MAGIC = b"IKVMANIF"
MANIFEST_NAME = "MANIFEST"
LOCK_NAME = "LOCK"
PACK_INDEX_NAME = "IKVPACK.json"
PACK_VERSION = 1
DEFAULT_BLOCK_TOKENS = 4096
MAX_FINGERPRINT_BYTES = 1024

# shard header: magic, format version, header bytes, archive uuid, layer, n_layers, n_kv_heads, head_dim,
# record_bytes, block_tokens, fingerprint length; the fingerprint follows; xxh3_64 of bytes [0, 4088) at 4088
_HEADER = struct.Struct("<8sII16sIIIIIIH")
_HEADER_SUM_AT = HEADER_BYTES - 8
# manifest: magic, format version, reserved, body length, xxh3_64(body); the JSON body follows
_MANIFEST_HEAD = struct.Struct("<8sIIQQ")
_MAX_MANIFEST_BYTES = 256 << 20
_GROW_MIN_BYTES = 256 << 10  # shard files grow (sparse) in steps of their size, clamped to these bounds
_GROW_MAX_BYTES = 8 << 20
_STATE_RE = re.compile(r"state-(\d{8})\.safetensors")
_STATE_META_KEY = "ikv_state_meta"
_ORTHOGONAL_TOL = 1e-3  # max |R R^T - I| a stored rotation may show (float32 rounding of an exact one: ~1e-6)


def shard_name(layer: int) -> str:
    return f"layer-{layer:03d}.ikv"


def state_name(generation: int) -> str:
    return f"state-{generation:08d}.safetensors"


def _short(fingerprint: str) -> str:
    return fingerprint if len(fingerprint) <= 16 else fingerprint[:12] + "…"


@dataclass(frozen=True)
class Layout:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    record_bytes: int  # == codec.record_bytes(head_dim)

    def __post_init__(self):
        for name in ("n_layers", "n_kv_heads", "head_dim", "record_bytes"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 < value < 1 << 20:
                raise ValueError(f"Layout.{name} must be a positive integer, got {value!r}")
        expected = codec.record_bytes(self.head_dim)
        if self.record_bytes != expected:
            raise ValueError(f"Layout.record_bytes is {self.record_bytes}; head_dim {self.head_dim} needs {expected}")

    @property
    def token_bytes(self) -> int:
        """Bytes one token takes in one layer's shard: all kv-heads' records."""
        return self.n_kv_heads * self.record_bytes


@dataclass(frozen=True)
class _StateRef:
    file: str
    bytes: int
    xxh3: int


@dataclass(frozen=True)
class _Manifest:
    archive_uuid: str  # 32 hex digits
    model_fingerprint: str
    layout: Layout
    block_tokens: int
    meta: dict
    generation: int
    committed_tokens: int
    block_sums: list  # per layer: list of int xxh3_64, ceil(committed / block_tokens) each
    state: _StateRef | None
    rotation: np.ndarray  # float32 [head_dim, head_dim], orthogonal: the codec's R
    key_means: list  # per layer: float32 [n_kv_heads, head_dim] (the codec's mu), or None until set


# ---------------------------------------------------------------------------------------------------- parsing


_RESTORE = "restore the archive from a backup or a pack"
_REPACK = "copy the pack again, or pack the archive again (ikv archive pack)"


def _corrupt(where: str, what: str, fix: str = _RESTORE) -> IKVError:
    return IKVError(f"{where} is corrupted ({what}); {fix}")


def _wrong_version(where: str, version: int) -> IKVError:
    """The one message for a file of another format version (a checked header: the version is not damage)."""
    fix = ("upgrade infinitekv to open it" if version > FORMAT_VERSION else
           "re-read the document into a new archive (or use the infinitekv release that wrote it)")
    return IKVError(f"{where} has format version {version} but this InfiniteKV reads format version "
                    f"{FORMAT_VERSION} only; {fix}")


def _rotation_problem(rotation: np.ndarray, head_dim: int) -> str | None:
    """What is wrong with a float32 rotation for this head_dim, or None."""
    if rotation.shape != (head_dim, head_dim):
        return f"has shape {list(rotation.shape)}, head_dim {head_dim} needs [{head_dim}, {head_dim}]"
    if not np.isfinite(rotation).all():
        return "holds values that are not finite"
    r = rotation.astype(np.float64)
    off = float(np.abs(r @ r.T - np.eye(head_dim)).max())
    if off > _ORTHOGONAL_TOL:
        return f"is not orthogonal (max |R R^T - I| is {off:.3g}, more than {_ORTHOGONAL_TOL:g})"
    return None


def _key_mean_problem(mean: np.ndarray, layout: Layout) -> str | None:
    """What is wrong with a float32 key mean for this layout, or None."""
    want = (layout.n_kv_heads, layout.head_dim)
    if mean.shape != want:
        return f"has shape {list(mean.shape)}, the layout needs {list(want)} (n_kv_heads, head_dim)"
    if not np.isfinite(mean).all():
        return "holds values that are not finite"
    return None


def _as_float32(value, what: str) -> np.ndarray:
    """A caller's float array -> our own C-contiguous native float32 copy, or ValueError."""
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise ValueError(f"{what} must be a float numpy array, got {got}")
    return np.array(value, dtype=np.float32, order="C")


def _floats_to_text(arr: np.ndarray) -> str:
    """float32 array -> base64 of its little-endian bytes, C order (the manifest's encoding)."""
    return base64.b64encode(np.ascontiguousarray(arr, "<f4").tobytes()).decode("ascii")


def _floats_from_text(text, shape: tuple, where: str, label: str) -> np.ndarray:
    """The manifest's base64 of little-endian float32 -> float32 array of `shape`. The text's length is checked
    against the shape before anything is decoded, so a hostile manifest cannot make it allocate more."""
    count = int(np.prod(shape))
    if not isinstance(text, str) or len(text) != 4 * -(-4 * count // 3):
        raise _corrupt(where, f"{label} is not base64 of {count} float32 values")
    try:
        raw = base64.b64decode(text, validate=True)  # binascii.Error is a ValueError
    except ValueError:
        raise _corrupt(where, f"{label} is not valid base64") from None
    if len(raw) != 4 * count:
        raise _corrupt(where, f"{label} decodes to {len(raw)} bytes, not {4 * count}")
    return np.frombuffer(raw, "<f4").astype(np.float32).reshape(shape)


def _parse_manifest(raw: bytes, where: str) -> _Manifest:
    """MANIFEST bytes -> _Manifest, or IKVError saying what is wrong. Trusts nothing."""
    if len(raw) < _MANIFEST_HEAD.size:
        raise _corrupt(where, f"truncated: {len(raw)} bytes, the header alone is {_MANIFEST_HEAD.size}")
    magic, version, _reserved, body_len, body_sum = _MANIFEST_HEAD.unpack_from(raw)
    if magic != MANIFEST_MAGIC:
        raise _corrupt(where, "bad magic, not an InfiniteKV manifest")
    if version > FORMAT_VERSION:  # checked before the rest: a newer version may lay out the rest differently
        raise _wrong_version(where, version)
    if version < 1 or _reserved != 0:
        raise _corrupt(where, f"header fields out of range (version {version}, reserved {_reserved})")
    body = raw[_MANIFEST_HEAD.size :]
    if body_len != len(body):
        raise _corrupt(where, f"body is {len(body)} bytes, header says {body_len}")
    if xxhash.xxh3_64_intdigest(body) != body_sum:
        raise _corrupt(where, "checksum mismatch")
    if version != FORMAT_VERSION:  # an older version, intact (a damaged version field fails the checksum above)
        raise _wrong_version(where, version)
    try:
        obj = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _corrupt(where, f"body is not JSON: {err}") from None
    return _manifest_from_json(obj, where)


def _manifest_from_json(obj, where: str) -> _Manifest:
    """The checked-and-decoded MANIFEST body -> _Manifest; every field type and range is validated."""

    def field(container, key, kind, label=None):
        value = container.get(key) if isinstance(container, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _corrupt(where, f"field {label or key!r} is missing or has the wrong type")
        if kind is int and not 0 <= value < 1 << 62:
            raise _corrupt(where, f"field {label or key!r} is out of range")
        return value

    if not isinstance(obj, dict):
        raise _corrupt(where, "body is not a JSON object")
    version = field(obj, "format_version", int)
    if version < 1:
        raise _corrupt(where, f"format version {version}")
    if version != FORMAT_VERSION:
        raise _wrong_version(where, version)
    archive_uuid = field(obj, "archive_uuid", str)
    if not re.fullmatch(r"[0-9a-f]{32}", archive_uuid):
        raise _corrupt(where, "archive_uuid is not 32 hex digits")
    fingerprint = field(obj, "model_fingerprint", str)
    if not fingerprint or len(fingerprint.encode("utf-8", "surrogatepass")) > MAX_FINGERPRINT_BYTES:
        raise _corrupt(where, "model_fingerprint is empty or too long")
    raw_layout = field(obj, "layout", dict)
    dims = [field(raw_layout, k, int, f"layout.{k}") for k in ("n_layers", "n_kv_heads", "head_dim", "record_bytes")]
    try:
        layout = Layout(*dims)
    except ValueError as err:
        raise _corrupt(where, f"layout: {err}") from None
    block_tokens = field(obj, "block_tokens", int)
    if not 0 < block_tokens <= 1 << 24:
        raise _corrupt(where, f"block_tokens {block_tokens}")
    meta = field(obj, "meta", dict)
    generation = field(obj, "generation", int)
    committed = field(obj, "committed_tokens", int)
    shards = field(obj, "shards", list)
    if len(shards) != layout.n_layers:
        raise _corrupt(where, f"{len(shards)} shards listed for {layout.n_layers} layers")
    rotation = _floats_from_text(obj.get("rotation"), (layout.head_dim, layout.head_dim), where, "rotation")
    if problem := _rotation_problem(rotation, layout.head_dim):
        raise _corrupt(where, f"rotation {problem}")
    n_blocks = -(-committed // block_tokens)
    block_sums, key_means = [], []
    for layer, shard in enumerate(shards):
        if field(shard, "file", str, f"shards[{layer}].file") != shard_name(layer):
            raise _corrupt(where, f"shards[{layer}] names {shard.get('file')!r}, expected {shard_name(layer)!r}")
        sums = field(shard, "block_xxh3", str, f"shards[{layer}].block_xxh3")
        if len(sums) != 16 * n_blocks or not re.fullmatch(r"[0-9a-f]*", sums):
            raise _corrupt(where, f"shards[{layer}] has a block checksum list that does not cover {committed} tokens")
        block_sums.append([int(sums[i : i + 16], 16) for i in range(0, len(sums), 16)])
        if "key_mean" not in shard:
            raise _corrupt(where, f"field 'shards[{layer}].key_mean' is missing")
        mean = shard["key_mean"]
        if mean is None and committed:
            raise _corrupt(where, f"shards[{layer}] holds records but no key_mean to decode them")
        if mean is not None:
            mean = _floats_from_text(mean, (layout.n_kv_heads, layout.head_dim), where, f"shards[{layer}].key_mean")
            if problem := _key_mean_problem(mean, layout):
                raise _corrupt(where, f"shards[{layer}].key_mean {problem}")
        key_means.append(mean)
    state = None
    if obj.get("state") is not None:
        raw_state = field(obj, "state", dict)
        name = field(raw_state, "file", str, "state.file")
        if not _STATE_RE.fullmatch(name):
            raise _corrupt(where, f"state file name {name!r}")
        checksum = field(raw_state, "xxh3", str, "state.xxh3")
        if not re.fullmatch(r"[0-9a-f]{16}", checksum):
            raise _corrupt(where, "state.xxh3 is not 16 hex digits")
        state = _StateRef(name, field(raw_state, "bytes", int, "state.bytes"), int(checksum, 16))
    return _Manifest(archive_uuid, fingerprint, layout, block_tokens, meta, generation, committed, block_sums, state,
                     rotation, key_means)


def _manifest_bytes(m: _Manifest) -> bytes:
    body = {
        "format_version": FORMAT_VERSION,
        "archive_uuid": m.archive_uuid,
        "model_fingerprint": m.model_fingerprint,
        "layout": {
            "n_layers": m.layout.n_layers,
            "n_kv_heads": m.layout.n_kv_heads,
            "head_dim": m.layout.head_dim,
            "record_bytes": m.layout.record_bytes,
        },
        "block_tokens": m.block_tokens,
        "meta": m.meta,
        "generation": m.generation,
        "committed_tokens": m.committed_tokens,
        "rotation": _floats_to_text(m.rotation),
        "shards": [
            {"file": shard_name(i), "block_xxh3": "".join(f"{s:016x}" for s in sums),
             "key_mean": None if mean is None else _floats_to_text(mean)}
            for i, (sums, mean) in enumerate(zip(m.block_sums, m.key_means))
        ],
        "state": None
        if m.state is None
        else {"file": m.state.file, "bytes": m.state.bytes, "xxh3": f"{m.state.xxh3:016x}"},
    }
    data = json.dumps(body, indent=1).encode("utf-8")
    return _MANIFEST_HEAD.pack(MANIFEST_MAGIC, FORMAT_VERSION, 0, len(data), xxhash.xxh3_64_intdigest(data)) + data


def _header_bytes(layout: Layout, archive_uuid: str, layer: int, block_tokens: int, fingerprint: str) -> bytes:
    fp = fingerprint.encode("utf-8")
    head = _HEADER.pack(
        SHARD_MAGIC, FORMAT_VERSION, HEADER_BYTES, bytes.fromhex(archive_uuid), layer, layout.n_layers,
        layout.n_kv_heads, layout.head_dim, layout.record_bytes, block_tokens, len(fp),
    )
    raw = (head + fp).ljust(_HEADER_SUM_AT, b"\0")
    return raw + struct.pack("<Q", xxhash.xxh3_64_intdigest(raw))


@dataclass(frozen=True)
class _Header:
    archive_uuid: str
    layer: int
    layout: Layout
    block_tokens: int
    model_fingerprint: str


def _check_fingerprint(path: Path, m: _Manifest, model_fingerprint: str | None) -> None:
    if model_fingerprint is not None and m.model_fingerprint != model_fingerprint:
        raise IKVError(
            f"archive {path} was written by another model (fingerprint {_short(m.model_fingerprint)}, "
            f"this model is {_short(model_fingerprint)}); use the model that wrote it or a new archive"
        )


def _parse_header(raw: bytes, where: str) -> _Header:
    """The first HEADER_BYTES of a shard -> _Header, or IKVError. Trusts nothing."""
    if len(raw) < HEADER_BYTES:
        raise IKVError(
            f"{where} has a truncated header ({len(raw)} of {HEADER_BYTES} bytes); "
            "the archive is damaged, restore it from a backup or a pack"
        )
    magic, version, header_bytes, raw_uuid, layer, *dims, block_tokens, fp_len = _HEADER.unpack_from(raw)
    if magic != SHARD_MAGIC:
        raise _corrupt(where, "bad magic, not an InfiniteKV shard")
    if version > FORMAT_VERSION:
        raise _wrong_version(where, version)
    (stored_sum,) = struct.unpack_from("<Q", raw, _HEADER_SUM_AT)
    if xxhash.xxh3_64_intdigest(raw[:_HEADER_SUM_AT]) != stored_sum:
        raise _corrupt(where, "header checksum mismatch")
    if version < 1 or header_bytes != HEADER_BYTES or not 0 < fp_len <= MAX_FINGERPRINT_BYTES or block_tokens < 1:
        raise _corrupt(where, "header fields out of range")
    if version != FORMAT_VERSION:
        raise _wrong_version(where, version)
    try:
        layout = Layout(*dims)
        fingerprint = raw[_HEADER.size : _HEADER.size + fp_len].decode("utf-8")
    except ValueError as err:
        raise _corrupt(where, f"header: {err}") from None
    return _Header(raw_uuid.hex(), layer, layout, block_tokens, fingerprint)


# ---------------------------------------------------------------------------------------------------- file I/O


def _io_error(err: OSError, doing: str) -> IKVError:
    """An OSError from the filesystem -> one line naming the problem and the fix."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return IKVError(f"disk full while {doing}; free some space and try again")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return IKVError(
            f"cannot write while {doing}: {err.strerror} (read-only media or no permission); "
            "use a writable directory or open the archive read-only"
        )
    return IKVError(f"I/O error while {doing}: {err.strerror or err}; check the disk")


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]
        offset += written


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = os.pread(fd, min(n - got, 64 << 20), offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _fdatasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


def _json_or_raise(obj, what: str) -> str:
    try:
        return json.dumps(obj)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-able: {err}") from None


def _open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that never follows a symbolic link and accepts only a regular file: an archive directory may come
    from someone else, and a LOCK or shard that is a link to another file must not get that file truncated or read.
    O_NONBLOCK keeps a FIFO planted under an archive name from hanging the open; regular files ignore it."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise IKVError(f"{path} is a symbolic link; an archive's files must be regular files, remove the link "
                           "or restore the archive from a pack") from None
        if err.errno == errno.EISDIR:
            raise _not_regular(path) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _not_regular(path)
    if flags & (os.O_WRONLY | os.O_RDWR) and info.st_nlink != 1:  # writing would change the other name's file too
        os.close(fd)
        raise IKVError(f"{path} is a hard link shared with another file; copy the archive instead of linking it, "
                       "or open it read-only")
    return fd


def _not_regular(path: Path) -> IKVError:
    return IKVError(f"{path} is not a regular file (a directory, device or pipe); an archive's files must be regular "
                    "files, restore the archive from a backup or a pack")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file_durably(path: Path, data: bytes) -> None:
    """Write a whole new file and fsync it; the file is removed again if anything fails. Whatever had the name
    before (a leftover, or a link planted there) is unlinked first, never written through."""
    _remove_quietly(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        _pwrite_all(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _remove_quietly(path)
        raise
    os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _end_of_data(fd: int, start: int, end: int) -> int:
    """Offset just past the last non-zero byte in [start, end) (start if all zero): how far real data reaches in a
    shard whose tail may be sparse preallocation."""
    pos = end
    while pos > start:
        lo = max(start, pos - (1 << 20))
        nonzero = np.flatnonzero(np.frombuffer(_pread_exact(fd, pos - lo, lo), np.uint8))
        if nonzero.size:
            return lo + int(nonzero[-1]) + 1
        pos = lo
    return start


def _acquire_lock(path: Path) -> int:
    """flock LOCK exclusively (non-blocking) and write our pid into it; the fd holds the lock until closed."""
    try:
        fd = _open_regular(path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    except OSError as err:
        raise _io_error(err, f"taking the writer lock of archive {path}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) and holder == str(os.getpid()):
            raise IKVError(f"archive {path} is already open for writing in this process; close it before opening "
                           "it again, or open it read-only") from None
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise IKVError(
                f"archive {path} is in use by another process (pid {holder}); "
                "stop that process first, or open the archive read-only"
            ) from None
        raise _io_error(err, f"taking the writer lock of archive {path}") from None
    try:
        os.ftruncate(fd, 0)
        _pwrite_all(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the pid is informational; the flock is what excludes other writers
    return fd


# ---------------------------------------------------------------------------------------------------- archive


def _grown(arr: np.ndarray, need: int, keep: int) -> np.ndarray:
    """arr itself when it holds `need` rows, else a copy with doubled capacity and the first `keep` rows."""
    if need <= arr.shape[0]:
        return arr
    new = np.empty((max(need, 2 * arr.shape[0], 64),) + arr.shape[1:], arr.dtype)
    new[:keep] = arr[:keep]
    return new


def _key_weights(records: np.ndarray, head_dim: int) -> np.ndarray:
    """The signature score's weight, float16 [...]: the record's key_mean_abs field as stored (codec.key_mean_abs
    widens it; the index keeps the float16 bits, 2 bytes instead of 4)."""
    return codec.record_fields(records, head_dim)[2][..., 1]


def _read_only(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view


class _Layer:
    """One layer's records (a file or a RAM array), key mean, derived index and running block checksums."""

    def __init__(self, layout: Layout):
        h, d = layout.n_kv_heads, layout.head_dim
        self.n = 0
        self.sigs = np.empty((0, h, d // 8), np.uint8)
        self.weights = np.empty((0, h), np.float16)
        self.ram = np.empty((0, h, layout.record_bytes), np.uint8)  # ram mode only
        self.fd = -1  # disk mode only, from here on
        self.capacity = 0  # tokens the file has room for (sparse past n)
        self.view = None  # [capacity, H, record_bytes] over an mmap of the file
        self.dirty = False
        self.high = 0  # the most tokens this layer has held since open: views handed out reach this far
        self.hasher = xxhash.xxh3_64()  # over the current, unfinished block
        self.sums: list[int] = []  # xxh3 of every finished block
        self.key_mean: np.ndarray | None = None  # float32 [H, D], the codec's mu: set once, before the first append
        self.saved = (0, self.hasher.copy(), 0, None)  # (n, hasher, len(sums), key_mean) at the last commit

    def index(self, records: np.ndarray, at: int, head_dim: int) -> None:
        k = records.shape[0]
        self.sigs = _grown(self.sigs, at + k, at)
        self.weights = _grown(self.weights, at + k, at)
        self.sigs[at : at + k] = codec.signatures_from_records(records, head_dim)
        self.weights[at : at + k] = _key_weights(records, head_dim)

    def hash(self, records: np.ndarray, at: int, block_tokens: int) -> None:
        flat = records.reshape(records.shape[0], -1)
        pos = 0
        while pos < len(flat):
            take = min(block_tokens - (at + pos) % block_tokens, len(flat) - pos)
            self.hasher.update(flat[pos : pos + take])
            pos += take
            if (at + pos) % block_tokens == 0:
                self.sums.append(self.hasher.intdigest())
                self.hasher.reset()

    def block_sums(self, block_tokens: int) -> list[int]:
        return self.sums + ([self.hasher.intdigest()] if self.n % block_tokens else [])

    def save(self) -> None:
        self.saved = (self.n, self.hasher.copy(), len(self.sums), self.key_mean)

    def rollback(self) -> None:
        n, hasher, n_sums, self.key_mean = self.saved  # a key mean set since the last commit is forgotten too
        self.n, self.hasher = n, hasher.copy()
        del self.sums[n_sums:]

    @property
    def committed_key_mean(self) -> np.ndarray | None:
        return self.saved[3]


class Archive:
    """An archive of cold-tier records, one shard per layer; see the module docstring and FORMAT.md."""

    def __init__(self, *, path, layout, model_fingerprint, meta, mode, writable, block_tokens, archive_uuid, rotation):
        self.path = None if path is None else Path(path)
        self.layout: Layout = layout
        self.model_fingerprint: str = model_fingerprint
        self.meta: dict = meta
        self.mode: str = mode
        self.writable = writable
        self.block_tokens = block_tokens
        self.archive_uuid = archive_uuid
        self._rotation: np.ndarray = rotation  # float32 [D, D], checked orthogonal
        self.committed_tokens = 0
        self.recovered: str | None = None
        self.generation = 0
        self.rollbacks = 0  # counts rollbacks: what was derived from records past the committed point may be stale
        self._layers = [_Layer(layout) for _ in range(layout.n_layers)]
        self._lock_fd = -1
        self._state: _StateRef | None = None
        self._state_fd = -1
        self._ram_state: tuple[dict, dict] = ({}, {})
        self._manifest_raw = b""
        self._closed = False

    # ----------------------------------------------------------------------------------------------- create/open

    @classmethod
    def create(
        cls, path, layout: Layout, model_fingerprint: str, *, mode: str = "disk", meta: dict | None = None,
        block_tokens: int = DEFAULT_BLOCK_TOKENS, rotation: np.ndarray | None = None,
    ) -> Archive:
        """A new, empty archive. disk: `path` is created (or must be an empty directory); ram: nothing touches disk.

        rotation: the codec's orthogonal R, float [head_dim, head_dim], stored as float32 (default
        codec.rotation_matrix(head_dim, 0)). Each layer's key mean is set later, before its first append.
        """
        if not isinstance(layout, Layout):
            raise ValueError(f"layout must be a Layout, got {type(layout).__name__}")
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError("model_fingerprint must be a non-empty string")
        if len(model_fingerprint.encode("utf-8")) > MAX_FINGERPRINT_BYTES:
            raise ValueError(f"model_fingerprint is longer than {MAX_FINGERPRINT_BYTES} bytes")
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise ValueError("meta must be a dict")
        meta = json.loads(_json_or_raise(meta, "meta"))  # JSON-able, and our own copy
        if not isinstance(block_tokens, int) or not 0 < block_tokens <= 1 << 24:
            raise ValueError(f"block_tokens must be in [1, 2**24], got {block_tokens!r}")
        if mode not in ("disk", "ram"):
            raise ValueError(f"mode must be 'disk' or 'ram', got {mode!r}")
        if rotation is None:
            rotation = codec.rotation_matrix(layout.head_dim, 0)
        rotation = _as_float32(rotation, "rotation")
        if problem := _rotation_problem(rotation, layout.head_dim):
            raise ValueError(f"rotation {problem}")
        args = dict(layout=layout, model_fingerprint=model_fingerprint, meta=meta, mode=mode, writable=True,
                    block_tokens=block_tokens, archive_uuid=uuidlib.uuid4().hex, rotation=rotation)
        if mode == "ram":
            return cls(path=None, **args)
        path = Path(path)
        made_dir = False
        if path.exists():
            cls._check_empty_dir(path)
        else:
            try:
                os.makedirs(path)
            except OSError as err:
                raise _io_error(err, f"creating archive directory {path}") from None
            made_dir = True
        arc = cls(path=path, **args)
        created = []
        try:
            arc._lock_fd = _acquire_lock(path)
            cls._check_empty_dir(path)  # again, now that we hold the lock
            for entry in os.scandir(path):  # what a create killed midway left behind (only our own file names)
                if entry.name != LOCK_NAME:
                    _remove_quietly(Path(entry.path))
            for layer in range(layout.n_layers):
                file = path / shard_name(layer)
                fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                created.append(file)
                arc._layers[layer].fd = fd
                _pwrite_all(fd, _header_bytes(layout, arc.archive_uuid, layer, block_tokens, model_fingerprint), 0)
                os.fsync(fd)
            arc._write_manifest(arc._manifest(committed=0, generation=0, state=None))
        except BaseException as err:
            locked = arc._lock_fd >= 0
            arc._close_fds()
            for file in created:
                _remove_quietly(file)
            if locked:  # never another creator's lock file
                _remove_quietly(path / LOCK_NAME)
            if made_dir:
                try:
                    os.rmdir(path)
                except OSError:
                    pass
            if isinstance(err, OSError):
                raise _io_error(err, f"creating archive {path}") from None
            raise
        return arc

    @staticmethod
    def _check_empty_dir(path: Path) -> None:
        if not path.is_dir():
            raise IKVError(f"{path} exists and is not a directory; choose a new or empty directory for the archive")
        if _never_committed(path):
            return  # a first run killed before anything was committed: taken over (its files are replaced)
        if os.path.lexists(path / MANIFEST_NAME):
            raise IKVError(f"{path} already holds an archive; open it (ikv run --resume) or choose a new directory")
        if not _interrupted_create(path) and any(os.scandir(path)):
            raise IKVError(f"{path} is not empty; choose a new or empty directory for the archive")

    @classmethod
    def open(cls, path, *, model_fingerprint: str | None = None, writable: bool = True) -> Archive:
        """Open an existing archive after validating every header, manifest field and block checksum.

        writable: take the writer lock and drop (truncate) anything past the last commit; read-only: no lock, the
        uncommitted tail is ignored.
        """
        path = Path(path)
        # validate before any write: a missing, foreign or damaged archive is refused before a LOCK is made there
        first = _parse_manifest(_read_manifest_file(path), f"manifest {path / MANIFEST_NAME}")
        _check_fingerprint(path, first, model_fingerprint)
        lock_fd = _acquire_lock(path) if writable else -1
        try:
            for _ in range(3):
                raw = _read_manifest_file(path)
                m = _parse_manifest(raw, f"manifest {path / MANIFEST_NAME}")
                _check_fingerprint(path, m, model_fingerprint)
                arc = cls(path=path, layout=m.layout, model_fingerprint=m.model_fingerprint, meta=m.meta,
                          mode="disk", writable=writable, block_tokens=m.block_tokens, archive_uuid=m.archive_uuid,
                          rotation=m.rotation)
                arc._lock_fd = lock_fd
                try:
                    arc._load(m, raw)
                    return arc
                except _Superseded:
                    arc._lock_fd = -1
                    arc._close_fds()  # a writer committed while we read; read the new manifest
                except BaseException:
                    arc._lock_fd = -1
                    arc._close_fds()
                    raise
            raise IKVError(f"archive {path} changed three times while being opened; open it when the writer is idle")
        except BaseException:
            if lock_fd >= 0:
                os.close(lock_fd)
            raise

    def _load(self, m: _Manifest, raw: bytes) -> None:
        path, layout, writable = self.path, self.layout, self.writable
        tb, committed = layout.token_bytes, m.committed_tokens
        dropped = 0
        for layer, sums in enumerate(m.block_sums):
            file = path / shard_name(layer)
            lay = self._layers[layer]
            lay.key_mean = m.key_means[layer]
            try:
                lay.fd = _open_regular(file, os.O_RDWR if writable else os.O_RDONLY)
            except FileNotFoundError:
                self._raise_or_superseded(m, IKVError(
                    f"archive {path} is missing its shard {file.name}; restore it from a backup or a pack"))
            except OSError as err:
                raise _io_error(err, f"opening {file}") from None
            header = _parse_header(_pread_exact(lay.fd, HEADER_BYTES, 0), f"shard {file}")
            if header.archive_uuid != m.archive_uuid:
                raise IKVError(
                    f"shard {file} belongs to another archive (uuid {header.archive_uuid[:8]}…, this archive is "
                    f"{m.archive_uuid[:8]}…); put back this archive's own {file.name} or restore from a pack"
                )
            if (header.layer, header.layout, header.block_tokens, header.model_fingerprint) != (
                layer, m.layout, m.block_tokens, m.model_fingerprint
            ):
                raise _corrupt(f"shard {file}", "its header does not match the manifest")
            size = os.fstat(lay.fd).st_size
            need = HEADER_BYTES + committed * tb
            if size < need:
                raise IKVError(
                    f"shard {file} is truncated: it holds {max(size - HEADER_BYTES, 0) // tb:,} of the "
                    f"{committed:,} committed tokens; restore the archive from a backup or a pack"
                )
            lay.n = lay.capacity = lay.high = committed
            self._verify_and_index(lay, sums, file)
            end = _end_of_data(lay.fd, need, size) if size > need else need
            dropped = max(dropped, -(-(end - need) // tb))
            if writable and size > need:
                try:
                    os.ftruncate(lay.fd, need)
                except OSError as err:
                    raise _io_error(err, f"dropping the uncommitted tail of {file}") from None
            lay.save()
        if m.state is not None:
            file = path / m.state.file
            try:
                self._state_fd = _open_regular(file, os.O_RDONLY)
            except FileNotFoundError:
                self._raise_or_superseded(m, IKVError(
                    f"archive {path} is missing its state file {file.name}; restore it from a backup or a pack"))
            except OSError as err:
                raise _io_error(err, f"opening {file}") from None
            self._state = m.state
            self._read_state_bytes()  # verifies size and checksum
        self.committed_tokens, self.generation, self._manifest_raw = committed, m.generation, raw
        if dropped and writable:
            self.recovered = f"recovered {committed:,} committed tokens; dropped {dropped:,} uncommitted"
        elif dropped:
            self.recovered = f"read-only: ignored {dropped:,} uncommitted tokens past the last commit"
        if writable:
            self._remove_orphans()

    def _raise_or_superseded(self, m: _Manifest, err: IKVError):
        """A file the manifest names is gone: corruption, unless (read-only) a writer committed meanwhile."""
        if not self.writable:
            try:
                now = _parse_manifest(_read_manifest_file(self.path), "manifest")
            except IKVError:
                now = None
            if now is not None and now.generation != m.generation:
                raise _Superseded()
        raise err

    def _verify_and_index(self, lay: _Layer, sums: list[int], file: Path) -> None:
        """Check every committed block against its manifest checksum and rebuild the derived index from it."""
        n, bt = lay.n, self.block_tokens
        lay.sigs = np.empty((n, self.layout.n_kv_heads, self.layout.head_dim // 8), np.uint8)
        lay.weights = np.empty((n, self.layout.n_kv_heads), np.float16)
        if n == 0:
            return
        records = self._map(lay)
        for block, expected in enumerate(sums):
            lo, hi = block * bt, min((block + 1) * bt, n)
            chunk = records[lo:hi]
            hasher = xxhash.xxh3_64(chunk)
            if hasher.intdigest() != expected:
                raise IKVError(
                    f"checksum mismatch in {file} block {block} (tokens {lo:,}-{hi - 1:,}): the archive is "
                    "corrupted; restore it from a backup or a pack"
                )
            lay.sigs[lo:hi] = codec.signatures_from_records(chunk, self.layout.head_dim)
            lay.weights[lo:hi] = _key_weights(chunk, self.layout.head_dim)
            if hi - lo == bt:
                lay.sums.append(expected)
            else:
                lay.hasher = hasher  # the unfinished last block keeps growing on append

    def _remove_orphans(self) -> None:
        """Leftovers of a crash: a half-written MANIFEST.tmp, state files no manifest references."""
        keep = self._state.file if self._state else None
        for entry in os.scandir(self.path):
            if entry.name == MANIFEST_NAME + ".tmp" or (_STATE_RE.fullmatch(entry.name) and entry.name != keep):
                _remove_quietly(Path(entry.path))

    # ----------------------------------------------------------------------------------------------- reading

    @property
    def n_tokens(self) -> int:
        """Tokens every layer holds (committed + appended since); a layer mid-step may hold more."""
        return min(lay.n for lay in self._layers)

    def layer_tokens(self, layer: int) -> int:
        return self._layer(layer).n

    def records(self, layer: int) -> np.ndarray:
        """uint8 [n, n_kv_heads, record_bytes], read-only; in disk mode a view of the memory-mapped shard."""
        lay = self._layer(layer)
        if self.mode == "ram":
            return _read_only(lay.ram[: lay.n])
        if lay.view is None or lay.view.shape[0] < lay.n:
            self._map(lay)
        return lay.view[: lay.n]

    def signatures(self, layer: int) -> np.ndarray:
        """uint8 [n, n_kv_heads, head_dim // 8], C-contiguous, read-only: codec.signatures_from_records(records)."""
        lay = self._layer(layer)
        return _read_only(lay.sigs[: lay.n])

    def key_weights(self, layer: int) -> np.ndarray:
        """float16 [n, n_kv_heads], read-only: the records' key_mean_abs field, bit for bit (search.py widens it)."""
        lay = self._layer(layer)
        return _read_only(lay.weights[: lay.n])

    @property
    def rotation(self) -> np.ndarray:
        """The codec's R, float32 [head_dim, head_dim], read-only: records hold codes of R (k - mu)."""
        return _read_only(self._rotation)

    def key_mean(self, layer: int) -> np.ndarray | None:
        """The codec's mu for one layer, float32 [n_kv_heads, head_dim], read-only; None until set_key_mean."""
        mean = self._layer(layer).key_mean
        return None if mean is None else _read_only(mean)

    def _map(self, lay: _Layer) -> np.ndarray:
        """(Re)map a shard's whole capacity; old views stay valid (they keep their own mapping alive)."""
        shape = (lay.capacity, self.layout.n_kv_heads, self.layout.record_bytes)
        if lay.capacity == 0:
            lay.view = np.empty(shape, np.uint8)
        else:
            mm = mmap.mmap(lay.fd, HEADER_BYTES + lay.capacity * self.layout.token_bytes, access=mmap.ACCESS_READ)
            lay.view = np.frombuffer(mm, np.uint8, lay.capacity * self.layout.token_bytes, HEADER_BYTES).reshape(shape)
        return lay.view

    def load_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """The engine state of the last commit: ({name: array}, meta); ({}, {}) before the first commit."""
        self._check_open()
        if self.mode == "ram":
            arrays, meta = self._ram_state
            return {k: v.copy() for k, v in arrays.items()}, json.loads(json.dumps(meta))
        if self._state is None:
            return {}, {}
        raw = self._read_state_bytes()
        where = f"state file {self.path / self._state.file}"
        try:
            (header_len,) = struct.unpack_from("<Q", raw)
            header = json.loads(raw[8 : 8 + header_len])
            meta = json.loads(header.get("__metadata__", {}).get(_STATE_META_KEY, "{}"))
            arrays = st_load(raw)
        except Exception as err:  # checksum passed, so only a writer bug gets here; still never a traceback
            raise _corrupt(where, f"not a valid safetensors file: {err}") from None
        return arrays, meta

    def _read_state_bytes(self) -> bytes:
        ref = self._state
        raw = _pread_exact(self._state_fd, ref.bytes + 1, 0)
        where = f"state file {self.path / ref.file}"
        if len(raw) != ref.bytes:
            raise _corrupt(where, f"{len(raw)} bytes, the manifest says {ref.bytes}")
        if xxhash.xxh3_64_intdigest(raw) != ref.xxh3:
            raise _corrupt(where, "checksum mismatch")
        return raw

    def ram_copy(self) -> Archive:
        """A writable in-RAM archive holding this one's committed records and state: a conversation continued on it
        never writes to this archive's directory (`ikv run --resume --read-only`)."""
        self._check_open()
        copy = Archive.create(None, self.layout, self.model_fingerprint, mode="ram", meta=self.meta,
                              block_tokens=self.block_tokens, rotation=self._rotation)
        for layer, lay in enumerate(self._layers):
            if lay.committed_key_mean is not None:
                copy.set_key_mean(layer, lay.committed_key_mean)
            if self.committed_tokens:
                copy.append(layer, np.array(self.records(layer)[: self.committed_tokens]))
        copy.commit(*self.load_state())
        return copy

    # ----------------------------------------------------------------------------------------------- writing

    def set_key_mean(self, layer: int, mean: np.ndarray) -> None:
        """Fix one layer's key centre mu (float [n_kv_heads, head_dim], stored as float32); once per layer, before its
        first append. Setting the same value again does nothing; another value is refused (records depend on it).

        Like an append, it is visible at once and durable at the next commit; a rollback to a commit that did not
        hold it forgets it.
        """
        self._check_writable()
        lay = self._layer(layer)
        mean = _as_float32(mean, "key mean")
        if problem := _key_mean_problem(mean, self.layout):
            raise ValueError(f"key mean of layer {layer} {problem}")
        if lay.key_mean is None:
            lay.key_mean = mean
        elif not np.array_equal(lay.key_mean, mean):
            raise ValueError(f"layer {layer} already has another key mean, and records are coded against it; "
                             "a key mean is fixed for the life of an archive (start a new archive for a new one)")

    def append(self, layer: int, records: np.ndarray) -> None:
        """Append records (uint8 [n, n_kv_heads, record_bytes]) for the next n tokens of one layer; the layer's key
        mean must be set first (set_key_mean).

        Visible to records()/signatures() at once; durable only after commit(). On a disk error the archive rolls
        back to its last commit (n_tokens == committed_tokens) and raises IKVError.
        """
        self._check_writable()
        lay = self._layer(layer)
        if lay.key_mean is None:
            raise ValueError(f"layer {layer} has no key mean: call set_key_mean({layer}, mu) before its first append "
                             "(its records are codes of R (k - mu))")
        h, rb = self.layout.n_kv_heads, self.layout.record_bytes
        ok = isinstance(records, np.ndarray) and records.dtype == np.uint8 and records.shape[1:] == (h, rb)
        if not ok or records.ndim != 3:
            got = f"{records.dtype} {records.shape}" if isinstance(records, np.ndarray) else type(records).__name__
            raise ValueError(f"records must be uint8 [n, {h}, {rb}], got {got}")
        records = np.ascontiguousarray(records)
        k, at = records.shape[0], lay.n
        if k == 0:
            return
        if self.mode == "ram":
            lay.ram = _grown(lay.ram, at + k, at)
            lay.ram[at : at + k] = records
        else:
            try:
                self._reserve(lay, at + k)
                _pwrite_all(lay.fd, records, HEADER_BYTES + at * self.layout.token_bytes)
            except OSError as err:
                self._rollback()
                raise self._rolled_back(err, f"appending to archive {self.path} (layer {layer})") from None
            lay.hash(records, at, self.block_tokens)
            lay.dirty = True
        lay.index(records, at, self.layout.head_dim)
        lay.n = at + k
        lay.high = max(lay.high, lay.n)

    def _reserve(self, lay: _Layer, need: int) -> None:
        """Grow the shard file (sparse) so `need` tokens fit; amortised, so the memory map is rarely redone."""
        if need <= lay.capacity:
            return
        tb = self.layout.token_bytes
        step = min(max(lay.capacity * tb, _GROW_MIN_BYTES), _GROW_MAX_BYTES) // tb
        capacity = max(need, lay.capacity + max(step, 1))
        os.ftruncate(lay.fd, HEADER_BYTES + capacity * tb)
        lay.capacity = capacity

    def commit(self, state_arrays: dict[str, np.ndarray], state_meta: dict) -> None:
        """Make everything appended so far, plus the engine's state, the archive's last consistent point, atomically.

        Cost: fsync of each shard appended to, one write + fsync of the whole state file (its size), one manifest
        write (16 bytes per block per layer) + rename + directory fsync.
        """
        self._check_writable()
        counts = {lay.n for lay in self._layers}
        if len(counts) != 1:
            per_layer = ", ".join(f"layer {i}: {lay.n}" for i, lay in enumerate(self._layers) if lay.n != self.n_tokens)
            raise ValueError(f"commit needs every layer at the same token count; min is {self.n_tokens}, {per_layer}")
        (n,) = counts
        if not isinstance(state_arrays, dict) or not all(isinstance(k, str) for k in state_arrays):
            raise ValueError("state_arrays must be a dict of str -> numpy array")
        for name, arr in state_arrays.items():
            if not isinstance(arr, np.ndarray):
                raise ValueError(f"state_arrays[{name!r}] is a {type(arr).__name__}, not a numpy array")
        if not isinstance(state_meta, dict):
            raise ValueError("state_meta must be a dict")
        meta_json = _json_or_raise(state_meta, "state_meta")
        if self.mode == "ram":
            self._ram_state = ({k: v.copy() for k, v in state_arrays.items()}, json.loads(meta_json))
            self.committed_tokens, self.generation = n, self.generation + 1
            for lay in self._layers:
                lay.save()  # the point rollback() returns to
            return
        arrays = {k: np.ascontiguousarray(v, v.dtype.newbyteorder("<") if v.dtype.byteorder == ">" else None)
                  .reshape(v.shape) for k, v in state_arrays.items()}  # (ascontiguousarray makes 0-d arrays 1-d)
        try:
            blob = st_save(arrays, metadata={_STATE_META_KEY: meta_json, "ikv_archive_uuid": self.archive_uuid})
        except Exception as err:
            raise ValueError(f"state_arrays cannot be stored with safetensors: {err}") from None
        generation = self.generation + 1
        state = _StateRef(state_name(generation), len(blob), xxhash.xxh3_64_intdigest(blob))
        state_file = self.path / state.file
        raw = _manifest_bytes(self._manifest(committed=n, generation=generation, state=state))
        tmp = self.path / (MANIFEST_NAME + ".tmp")
        try:  # the order is the durability argument: records, then state, then the manifest that names them
            for lay in self._layers:
                if lay.dirty:
                    _fdatasync(lay.fd)
            _write_file_durably(state_file, blob)
            _write_file_durably(tmp, raw)
            _fsync_dir(self.path)  # the state file's directory entry is durable before the manifest names it
            os.replace(tmp, self.path / MANIFEST_NAME)
        except OSError as err:
            _remove_quietly(tmp)
            _remove_quietly(state_file)
            self._rollback()
            raise self._rolled_back(err, f"committing archive {self.path}") from None
        old_state, old_fd = self._state, self._state_fd
        self._state_fd = _open_regular(state_file, os.O_RDONLY)
        self._state, self.committed_tokens, self.generation, self._manifest_raw = state, n, generation, raw
        for lay in self._layers:
            lay.dirty = False
            lay.save()
        if old_fd >= 0:
            os.close(old_fd)
        if old_state is not None:
            _remove_quietly(self.path / old_state.file)
        try:
            _fsync_dir(self.path)
        except OSError as err:
            raise IKVError(f"{_io_error(err, f'committing archive {self.path}')} (the commit of {n:,} tokens is "
                           "in place but may not survive a power loss)") from None

    def _manifest(self, *, committed: int, generation: int, state: _StateRef | None) -> _Manifest:
        return _Manifest(self.archive_uuid, self.model_fingerprint, self.layout, self.block_tokens, self.meta,
                         generation, committed, [lay.block_sums(self.block_tokens) for lay in self._layers], state,
                         self._rotation, [lay.key_mean for lay in self._layers])

    def _write_manifest(self, m: _Manifest) -> bytes:
        """Atomically replace MANIFEST: write a temp file, fsync it, rename it over, fsync the directory."""
        raw = _manifest_bytes(m)
        tmp = self.path / (MANIFEST_NAME + ".tmp")
        _write_file_durably(tmp, raw)
        _fsync_dir(self.path)
        os.replace(tmp, self.path / MANIFEST_NAME)
        _fsync_dir(self.path)
        return raw

    def rollback(self) -> None:
        """Drop every record appended since the last commit (an uncommitted branch given up, see cache.py)."""
        self._check_writable()
        self._rollback()

    def _rollback(self) -> None:
        """Back to the last commit in memory; the file bytes past it are garbage that later appends overwrite."""
        for lay in self._layers:
            lay.rollback()
        self.rollbacks += 1

    def _rolled_back(self, err: OSError, doing: str) -> IKVError:
        base = str(_io_error(err, doing))
        return IKVError(f"{base} (the archive is back at its last commit, {self.committed_tokens:,} tokens)")

    # ----------------------------------------------------------------------------------------------- plumbing

    def _layer(self, layer: int) -> _Layer:
        self._check_open()
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.layout.n_layers:
            raise ValueError(f"layer must be in [0, {self.layout.n_layers}), got {layer!r}")
        return self._layers[layer]

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("archive is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise ValueError("archive was opened read-only")

    def _close_fds(self) -> None:
        for lay in self._layers:
            if lay.fd >= 0:
                os.close(lay.fd)
                lay.fd = -1
            lay.view = None
        for name in ("_state_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def close(self) -> None:
        """Release files and the writer lock. Uncommitted appends stay in the files until the next open drops them."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "disk" and self.writable:
            for lay in self._layers:
                if lay.fd >= 0:
                    try:  # give back the sparse preallocation; views the caller holds reach at most lay.high
                        os.ftruncate(lay.fd, HEADER_BYTES + max(lay.n, lay.high) * self.layout.token_bytes)
                    except OSError:
                        pass
        self._close_fds()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.path if self.mode == "disk" else "ram"
        return f"Archive({where}, {self.n_tokens:,} tokens, {self.committed_tokens:,} committed, {self.layout})"


class _Superseded(Exception):
    """A read-only open raced a commit; read the new manifest."""


_OWN_FILE_RE = re.compile(rf"{LOCK_NAME}|{MANIFEST_NAME}\.tmp|layer-\d{{3,}}\.ikv|{_STATE_RE.pattern}")


def _own_names(path: Path) -> list[str] | None:
    """The directory's entry names if every one is a name an archive writes (MANIFEST included), else None."""
    names = [entry.name for entry in os.scandir(path)]
    ok = all(name == MANIFEST_NAME or _OWN_FILE_RE.fullmatch(name) for name in names)
    return names if ok else None


def _interrupted_create(path: Path) -> bool:
    """A directory with no MANIFEST and nothing but files an archive writes: a create that was killed midway."""
    names = _own_names(path)
    return bool(names) and MANIFEST_NAME not in names


def _never_committed(path: Path) -> bool:
    """An archive created but never committed to (a first run killed before its first checkpoint): nothing in it
    is worth keeping, so a new run may take the directory."""
    names = _own_names(path)
    if not names or MANIFEST_NAME not in names:
        return False
    try:
        m = _parse_manifest(_read_manifest_file(path), "manifest")
    except IKVError:
        return False
    return m.committed_tokens == 0 and m.state is None and not any(_STATE_RE.fullmatch(n) for n in names)


def never_committed(path) -> bool:
    """True if `path` holds an archive nothing was ever committed to (a plain run may take the directory over)."""
    path = Path(path)
    return path.is_dir() and _never_committed(path)


def _holds_committed_data(path: Path) -> bool:
    """Without a MANIFEST: is there a state file or a shard with records, i.e. more than a killed create?"""
    for entry in os.scandir(path):
        if _STATE_RE.fullmatch(entry.name):
            return True
        if entry.name.startswith("layer-") and entry.stat(follow_symlinks=False).st_size > HEADER_BYTES:
            return True
    return False


def _read_manifest_file(path: Path) -> bytes:
    if not path.exists():
        raise IKVError(f"archive directory {path} does not exist; check the path, or create an archive there first")
    if not path.is_dir():
        raise IKVError(f"{path} is not a directory; an archive is a directory (with a MANIFEST file)")
    try:
        fd = _open_regular(path / MANIFEST_NAME, os.O_RDONLY)
        try:
            raw = _pread_exact(fd, _MAX_MANIFEST_BYTES + 1, 0)
        finally:
            os.close(fd)
    except FileNotFoundError:
        if not any(os.scandir(path)):
            raise IKVError(f"{path} is empty, not an archive; create one there first (ikv run --archive {path})") \
                from None
        if _interrupted_create(path) and not _holds_committed_data(path):
            raise IKVError(f"{path} holds an archive whose creation was interrupted (no {MANIFEST_NAME}, nothing "
                           "committed); create it again") from None
        if _interrupted_create(path):
            raise IKVError(f"{path} has lost its {MANIFEST_NAME}: its shards and state are there, but nothing can be "
                           "trusted without it; restore the archive from a backup or a pack") from None
        raise IKVError(
            f"{path} is not an InfiniteKV archive (no {MANIFEST_NAME}); check the path, or choose an empty directory"
        ) from None
    except OSError as err:
        raise _io_error(err, f"reading {path / MANIFEST_NAME}") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise _corrupt(f"manifest {path / MANIFEST_NAME}", "larger than any manifest this version writes")
    return raw


# ---------------------------------------------------------------------------------------------------- tools


def inspect_archive(path) -> dict:
    """What an archive holds, read-only; verifies every checksum (a failure is reported in "integrity")."""
    path = Path(path)
    raw = _read_manifest_file(path)
    m = _parse_manifest(raw, f"manifest {path / MANIFEST_NAME}")
    layout, n = m.layout, m.committed_tokens
    files = {e.name: e.stat(follow_symlinks=False).st_size for e in sorted(os.scandir(path), key=lambda e: e.name)
             if e.is_file(follow_symlinks=False)}
    integrity, recovered = "ok", None
    try:
        with Archive.open(path, writable=False) as arc:
            recovered = arc.recovered
            n, state = arc.committed_tokens, arc._state
    except IKVError as err:
        integrity, state = str(err), m.state
    return {
        "path": str(path),
        "format_version": FORMAT_VERSION,
        "archive_uuid": m.archive_uuid,
        "model_fingerprint": m.model_fingerprint,
        "layout": {"n_layers": layout.n_layers, "n_kv_heads": layout.n_kv_heads, "head_dim": layout.head_dim,
                   "record_bytes": layout.record_bytes},
        "block_tokens": m.block_tokens,
        "committed_tokens": n,
        "commits": m.generation,
        "meta": m.meta,
        "codec": {"rotation": [layout.head_dim, layout.head_dim],  # float32 R; mu per layer, set or not yet
                  "key_mean_set": [mean is not None for mean in m.key_means]},
        "bytes_per_token": layout.n_layers * layout.token_bytes,
        "tiers": {
            "cold_records": n * layout.n_layers * layout.token_bytes,
            "hot_state": state.bytes if state else 0,
            "signature_index_ram": n * layout.n_layers * layout.n_kv_heads * (layout.head_dim // 8 + 2),  # float16 weight
        },
        "files": files,
        "integrity": integrity,
        "recovered": recovered,
    }


class _FdReader:
    """A file-like over [start, start + length) of an fd, for tarfile to copy from."""

    def __init__(self, fd: int, length: int, start: int = 0):
        self.fd, self.pos, self.end = fd, start, start + length

    def read(self, size: int = -1) -> bytes:
        size = self.end - self.pos if size < 0 else min(size, self.end - self.pos)
        data = os.pread(self.fd, size, self.pos)
        self.pos += len(data)
        return data


def _xxh3_fd(fd: int, length: int, start: int = 0) -> int:
    hasher, reader = xxhash.xxh3_64(), _FdReader(fd, length, start)
    while chunk := reader.read(8 << 20):
        hasher.update(chunk)
    return hasher.intdigest()


def pack(src_dir, dst_file) -> dict:
    """Write an archive's committed data as one zstd-compressed tar (readable with `tar --zstd`) with its own checksums.

    Members: IKVPACK.json (pack version, each file's size and xxh3), MANIFEST, the shards cut at the committed point,
    the state file. The source is fully verified first.
    """
    dst = Path(dst_file)
    if dst.exists():
        raise IKVError(f"{dst} already exists; choose a new file name or remove it")
    with Archive.open(src_dir, writable=False) as arc:
        tb, n = arc.layout.token_bytes, arc.committed_tokens
        sources = [(MANIFEST_NAME, None, len(arc._manifest_raw))]  # (name, fd, bytes); fd None: manifest bytes
        sources += [(shard_name(i), lay.fd, HEADER_BYTES + n * tb) for i, lay in enumerate(arc._layers)]
        if arc._state is not None:
            sources.append((arc._state.file, arc._state_fd, arc._state.bytes))
        index = {"pack_version": PACK_VERSION, "format_version": FORMAT_VERSION, "committed_tokens": n, "files": [
            {"name": name, "bytes": size,
             "xxh3": f"{xxhash.xxh3_64_intdigest(arc._manifest_raw) if fd is None else _xxh3_fd(fd, size):016x}"}
            for name, fd, size in sources
        ]}
        tmp = dst.with_name(dst.name + ".partial")
        try:
            with open(tmp, "wb") as f:
                with zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(f, closefd=False) as zf:
                    with tarfile.open(fileobj=zf, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                        _tar_add(tar, PACK_INDEX_NAME, json.dumps(index, indent=1).encode())
                        for name, fd, size in sources:
                            if fd is None:
                                _tar_add(tar, name, arc._manifest_raw)
                            else:
                                info = tarfile.TarInfo(name)
                                info.size, info.mode = size, 0o644
                                tar.addfile(info, _FdReader(fd, size))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        except OSError as err:
            _remove_quietly(tmp)
            raise _io_error(err, f"writing pack {dst}") from None
    size_in = sum(size for _, _, size in sources)
    size_out = dst.stat().st_size
    return {"committed_tokens": n, "files": len(sources), "bytes": size_in, "packed_bytes": size_out,
            "ratio": size_in / max(size_out, 1)}


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, _BytesReader(data))


class _BytesReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, size: int = -1) -> bytes:
        size = len(self.data) - self.pos if size < 0 else size
        chunk = self.data[self.pos : self.pos + size]
        self.pos += len(chunk)
        return chunk


_PACK_NAME_RE = re.compile(rf"{MANIFEST_NAME}|layer-\d{{3,}}\.ikv|{_STATE_RE.pattern}")
UNPACK_MAX_BYTES = 1 << 40  # the most one unpack writes unless the caller allows more (also capped by free space)
_MAX_INDEX_BYTES = 1 << 20  # an index lists a few hundred files at most
_MAX_WINDOW_BYTES = 1 << 27  # zstd window a pack may ask for; ours use 2 MiB (level 3)
_TAR_SLACK = 1 << 20  # tar headers and end-of-archive padding around the declared member bytes


def unpack(src_file, dst_dir, *, max_bytes: int = UNPACK_MAX_BYTES) -> dict:
    """Restore a pack into a new or empty directory, verifying the pack's checksums and then the archive's own.

    A pack is hostile until verified: nothing larger than its index declares is ever decompressed, the index must
    agree with the MANIFEST it carries (every shard and the state file at exactly the size the manifest implies), the
    total must fit in `max_bytes` and in the free space of dst_dir, and memory stays within a few small buffers.
    On any failure nothing is left behind in dst_dir.
    """
    src, dst = Path(src_file), Path(dst_dir)
    if not src.is_file():
        raise IKVError(f"pack {src} does not exist or is not a file; check the path")
    if dst.exists() and (not dst.is_dir() or any(os.scandir(dst))):
        raise IKVError(f"{dst} exists and is not an empty directory; unpack into a new or empty directory")
    made_dir = not dst.exists()
    written: list[Path] = []
    where = f"pack {src}"
    try:
        if made_dir:
            os.makedirs(dst)
        with open(src, "rb") as f:
            zf = _ZstdReader(f, limit=_MAX_INDEX_BYTES + _TAR_SLACK, where=where)
            with tarfile.open(fileobj=zf, mode="r|") as tar:
                expected = None
                for member in tar:
                    if expected is None:
                        expected = _pack_index(tar, member, where)
                        declared = sum(size for _, size, _ in expected)
                        _check_room(dst, declared, max_bytes, where)
                        zf.limit = zf.total + declared + 512 * (2 * len(expected) + 2) + _TAR_SLACK
                        continue
                    if not expected:
                        raise _corrupt(where, f"unexpected member {member.name!r}", _REPACK)
                    name, size, checksum = expected.pop(0)
                    if member.name != name or not member.isfile() or member.size != size:
                        raise _corrupt(where, f"member {member.name!r} does not match the index ({name!r})", _REPACK)
                    out = dst / name
                    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                    written.append(out)
                    hasher, offset, source = xxhash.xxh3_64(), 0, tar.extractfile(member)
                    try:
                        while offset < size and (chunk := source.read(min(1 << 20, size - offset))):
                            hasher.update(chunk)
                            _pwrite_all(fd, chunk, offset)
                            offset += len(chunk)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    if offset != size or hasher.intdigest() != checksum:
                        raise _corrupt(where, f"checksum mismatch in {name}", _REPACK)
                    if name == MANIFEST_NAME:  # the rest of the index must be exactly what this manifest implies
                        _check_index_against_manifest(out, expected, where)
                if expected is None or expected:
                    raise _corrupt(where, "truncated: members are missing", _REPACK)
            zf.finish()
        _fsync_dir(dst)
        try:
            with Archive.open(dst, writable=False) as arc:  # the archive's own header, block and state checksums
                info = {"committed_tokens": arc.committed_tokens, "files": len(written),
                        "bytes": sum(p.stat().st_size for p in written)}
        except IKVError as err:
            raise _corrupt(where, f"what it holds does not verify: {err}", _REPACK) from None
    except BaseException as err:
        for path in written:
            _remove_quietly(path)
        if made_dir:
            try:
                os.rmdir(dst)
            except OSError:
                pass
        if isinstance(err, IKVError):
            raise
        if isinstance(err, OSError) and not isinstance(err, (tarfile.TarError, zstandard.ZstdError)):
            raise _io_error(err, f"unpacking {src} into {dst}") from None
        if isinstance(err, (tarfile.TarError, zstandard.ZstdError, EOFError, ValueError, OverflowError)):
            raise _corrupt(where, f"{type(err).__name__}: {err}", _REPACK) from None
        raise
    return info


def _check_room(dst: Path, declared: int, max_bytes: int, where: str) -> None:
    if declared > max_bytes:
        raise IKVError(f"{where} declares {declared:,} bytes, more than the {max_bytes:,} allowed; "
                       "pass a larger --max-bytes if you trust it")
    free = shutil.disk_usage(dst).free
    if declared > free:
        raise IKVError(f"{where} needs {declared:,} bytes but {dst} has {free:,} free; free some space or unpack "
                       "elsewhere")


def _check_index_against_manifest(manifest_file: Path, rest: list, where: str) -> None:
    """The files after MANIFEST must be its shards cut at the committed point, then its state file, nothing else."""
    m = _parse_manifest(manifest_file.read_bytes(), f"{where}: {MANIFEST_NAME}")
    want = [(shard_name(i), HEADER_BYTES + m.committed_tokens * m.layout.token_bytes) for i in range(m.layout.n_layers)]
    if m.state is not None:
        want.append((m.state.file, m.state.bytes))
    got = [(name, size) for name, size, _ in rest]
    if got != want:
        raise _corrupt(where, f"its {PACK_INDEX_NAME} does not list the files its {MANIFEST_NAME} implies", _REPACK)


class _ZstdReader:
    """A file-like over one zstd frame for tarfile, bounded twice: one decompress call gets at most 512 input bytes
    (zstd expands a byte at most ~32k-fold, so a call yields at most ~16 MiB), and the total handed out may not pass
    `limit` (the pack's declared size). `finish` tells whether the frame really ended, checksum included."""

    def __init__(self, f, *, limit: int, where: str):
        self.f, self.limit, self.where, self.total = f, limit, where, 0
        self.dobj = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW_BYTES).decompressobj()
        self.buf, self.pending, self.at = bytearray(), b"", 0

    def _feed(self) -> bool:
        if self.at >= len(self.pending):
            self.pending, self.at = self.f.read(1 << 16), 0
            if not self.pending:
                return False
        piece = self.pending[self.at : self.at + 512]
        self.at += len(piece)
        self.buf += self.dobj.decompress(piece)
        if self.total + len(self.buf) > self.limit:
            raise _corrupt(self.where, "it decompresses to more than its index declares", _REPACK)
        return True

    def read(self, size: int = -1) -> bytes:
        want = self.limit + 1 if size < 0 else size
        while len(self.buf) < want and not self.dobj.eof and self._feed():
            pass
        out = bytes(self.buf[:want])
        del self.buf[:want]
        self.total += len(out)
        return out

    def finish(self) -> None:
        while self.read(1 << 20):
            pass
        if not self.dobj.eof:
            raise _corrupt(self.where, "truncated: the zstd stream ends early", _REPACK)
        if self.dobj.unused_data or self.at < len(self.pending) or self.f.read(1):
            raise _corrupt(self.where, "unexpected bytes after the zstd stream", _REPACK)


def _pack_index(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> list:
    if member.name != PACK_INDEX_NAME or not member.isfile() or member.size > _MAX_INDEX_BYTES:
        raise _corrupt(where, f"first member is {member.name!r}, not {PACK_INDEX_NAME}", _REPACK)
    try:
        index = json.loads(tar.extractfile(member).read())
        if not isinstance(index, dict) or not isinstance(index.get("pack_version"), int):
            raise ValueError("no pack_version")
        if index["pack_version"] > PACK_VERSION:
            raise IKVError(f"{where} has pack version {index['pack_version']} but this InfiniteKV reads "
                           f"{PACK_VERSION} or older; upgrade infinitekv")
        version = index.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError("no format_version")
        if version != FORMAT_VERSION:  # refused before anything is written (its MANIFEST would be refused anyway)
            raise _wrong_version(where, version)
        entries = [(e["name"], e["bytes"], int(e["xxh3"], 16)) for e in index["files"]]
    except IKVError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError, AttributeError) as err:
        raise _corrupt(where, f"unreadable {PACK_INDEX_NAME}: {err}", _REPACK) from None
    names = [name for name, _, _ in entries]
    if (
        not all(isinstance(n, str) and _PACK_NAME_RE.fullmatch(n) for n in names)
        or not all(isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 1 << 50
                   for _, size, _ in entries)
        or len(set(names)) != len(names)
        or not names
        or names[0] != MANIFEST_NAME
    ):
        raise _corrupt(where, f"{PACK_INDEX_NAME} lists unexpected files", _REPACK)
    return entries
