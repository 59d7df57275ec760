"""The weighted signature scan's vector kernel for the CPU (csrc/cpu_scan.cpp): AVX-512 VBMI byte lookups, 64 tokens
at a time, with the same scores bit for bit as search.py's numba loop, which is bound by one scalar table load per
signature byte.

Built on first use with the system's C++ compiler (`CXX`, else c++, g++ or clang++) into the user cache
(models.cache_dir()/kernels, keyed by the source's hash) and loaded with ctypes; the numba kernels run instead where
this CPU lacks the instructions, no compiler is found, the shapes are outside what the kernel handles (signature
bytes a multiple of 8 up to 32, at most 16 words of 8 bytes per token across the kv-heads, float16 weights), or
`IKV_CPU_SCAN=numba` asks for them. `unavailable()` says which, in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "cpu_scan.cpp"
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off"]
MAX_WORDS = 16  # H * B / 8, as csrc/cpu_scan.cpp's kMaxWords
BUILD_TIMEOUT_S = 300
_switched_off = False


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    return None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(the library, None), or (None, why not)."""
    if os.environ.get("IKV_CPU_SCAN") == "numba":
        return None, "IKV_CPU_SCAN=numba asks for the numba kernels"
    if not SOURCE.is_file():
        return None, f"its source {SOURCE} is not in this installation"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (set CXX)"
    from infinitekv.models import cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"cpu_scan-{digest}.so"
    if not library.is_file():
        try:
            failure = _build(compiler, library)
        except OSError as err:  # a cache directory that cannot be written: numba's loop still runs
            failure = f"the kernel could not be written to {library.parent} ({err.strerror or type(err).__name__})"
        if failure:
            return None, failure
    try:
        lib = ctypes.CDLL(str(library))
    except OSError as err:
        return None, f"the built library did not load ({err})"
    if not lib.ikv_cpu_scan_supported():
        return None, "this CPU lacks AVX-512 VBMI"
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ikv_cpu_weighted_scores.argtypes = [ptr, ptr, i64, i32, i32, ptr, i32, i64, i32, ptr]
    lib.ikv_cpu_weighted_chunk_topk.argtypes = [ptr, ptr, i64, i32, i32, ptr, i32, i64, i64, i64, i32, ptr, ptr]
    return lib, None


def _build(compiler: str, library: Path) -> str | None:
    """Compile SOURCE to `library`; None when built, else why not, in one line."""
    library.parent.mkdir(parents=True, exist_ok=True)
    # built under a temporary name and renamed: another process never loads a half-written file
    with tempfile.TemporaryDirectory(dir=library.parent) as work:
        built = Path(work) / library.name
        try:
            result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True,
                                    text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"the build failed to run ({type(err).__name__})"
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no message"])[0][:160]
            return f"the build failed ({first})"
        os.replace(built, library)
    return None


def unavailable() -> str | None:
    """None when the kernel is built, loaded and runs on this CPU, else why not, in one line."""
    return _load()[1]


@contextlib.contextmanager
def switched_off():
    """The numba kernels inside, where this kernel would run (`ikv bench scan` times both side by side)."""
    global _switched_off
    before, _switched_off = _switched_off, True
    try:
        yield
    finally:
        _switched_off = before


def handles(sigs: np.ndarray, weights: np.ndarray) -> bool:
    """Whether the kernel runs on this index: signatures [N, H, B] uint8 and float16 weights as the kernels take them
    (search.kernel_weights: uint16 bits), contiguous, B a multiple of 8 up to 32, H * B / 8 words at most 16."""
    n_heads, n_bytes = sigs.shape[1], sigs.shape[2]
    return (not _switched_off and unavailable() is None and weights.dtype == np.uint16 and sigs.flags.c_contiguous
            and weights.flags.c_contiguous and n_bytes % 8 == 0 and 8 <= n_bytes <= 32
            and n_heads * n_bytes // 8 <= MAX_WORDS)


def _index_args(sigs, weights, luts):
    return (sigs.ctypes.data, weights.ctypes.data, sigs.shape[0], sigs.shape[1], sigs.shape[2],
            luts.ctypes.data, len(luts))


def weighted_scores(sigs, weights, luts, start: int, threads: int, out: np.ndarray) -> bool:
    """out [G, N - start] float32 = every weighted score of tokens start.. for LUT rows luts [G, B * 256] (row g for
    kv-head g % H), as search._dense_scores writes them. False (out untouched) where the kernel cannot run them."""
    luts = np.ascontiguousarray(luts, np.int32)
    assert out.shape == (len(luts), sigs.shape[0] - start) and out.dtype == np.float32 and out.flags.c_contiguous
    if not handles(sigs, weights):
        return False
    lib, _ = _load()
    return lib.ikv_cpu_weighted_scores(*_index_args(sigs, weights, luts), start, threads, out.ctypes.data) == 0


def weighted_chunk_topk(sigs, weights, luts, start: int, chunk: int, threads: int, out_s: np.ndarray,
                        out_i: np.ndarray) -> bool:
    """out_s, out_i [C, G, k]: each chunk of `chunk` tokens from `start`, each LUT row's best k (ties to the lower
    token) in no particular order, the set search._chunk_topk keeps; slots a chunk does not fill keep what the caller
    put there. False where the kernel cannot run them."""
    luts = np.ascontiguousarray(luts, np.int32)
    n_chunks, n_rows, k = out_s.shape
    assert out_i.shape == out_s.shape and n_rows == len(luts) and n_chunks == -(-(sigs.shape[0] - start) // chunk)
    assert out_s.dtype == np.float32 and out_i.dtype == np.int64 and out_s.flags.c_contiguous and out_i.flags.c_contiguous
    if not handles(sigs, weights):
        return False
    lib, _ = _load()
    return lib.ikv_cpu_weighted_chunk_topk(*_index_args(sigs, weights, luts), start, chunk, k, threads,
                                           out_s.ctypes.data, out_i.ctypes.data) == 0
