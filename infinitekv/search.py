"""First stage of cold-token retrieval: scan the binary signatures, shortlist the top-k tokens per kv-head.

One interface, interchangeable backends (like faiss `index.search`), all equal to the numpy reference bit for bit:

    scores, ids = search(signatures, weights, queries, k)            # [H, k'], [H, k']
    scores, ids = search_many(signatures, weights, queries_qhd, k)   # [Q, H, k'], [Q, H, k']

    signatures  uint8   [N, H, B]   sign bits of the key codes, packed little-endian (codec.signatures_from_records)
    weights     float16 [N, H]      key_mean_abs as the archive's index holds it (archive.key_weights); float32 is
                                    accepted too; finite; unused (may be None) in hamming mode
    queries     float32 [H, D]      D = 8B, one query per kv-head, already in the signature's rotated basis

Scores, higher is better (bit = 1 means the key code is negative, its sign s = 1 - 2*bit):

    "hamming":   score = -popcount(sig XOR qbits), qbits = (q < 0) packed the same way
    "weighted":  score = float32(weights[n, h]) * float32(isum[n, h]), the default; float32(w) of a float16 weight
                 is its exact widening (every backend reads the float16 as is and widens it itself)
                 isum  = sum_d qi[h, d] * s[n, h, d]   (exact int32 arithmetic)
                 qi    = rint(float64(q[h, d]) * 2**16 / max_d |float64(q[h, d])|)   (0 for an all-zero query)
                 an asymmetric estimate of the dot product q . x ~ |x|_mean * (q . sign(x)): it ranks dot products
                 rather than angles. With 2**16 steps, |isum| <= D * 2**16 <= 2**24 for D <= 256, so float32(isum)
                 is exact.
    In both modes a score of -0.0 becomes +0.0, so equal scores have equal bits.

Order: higher score first; equal scores -> lower token index first. Rows n < exclude_before are never returned;
k' = min(k, N - exclude_before) (0 when exclude_before >= N); ids are rows of `signatures` (int64).

Backends: "numpy" (reference: unpacks the bits, obviously correct, slow), "numba" (one task per chunk of tokens
that scores every query row, so each signature is read from memory once: scores of a 1024-token block per row, then a
compare against each row's heap root, which almost every token fails; then a heap merge per row; the weighted scores
and each chunk's best come from cpu_scan's AVX-512 kernel instead where it runs, the same bits), "faiss" (hamming
only: IndexBinaryFlat per head and one range search per row, at a radius sampled to take in ~2k tokens and widened
when short, then the index tie-break; slower than numba, so never chosen by "auto"), "cuda" (csrc/ kernel,
JIT-compiled on first use, then one torch.topk on (score, -index) packed into int64 keys). "auto" = numba for
these functions, which take the index as host arrays: backend="cuda" uploads it on every call (IKV_SEARCH_BACKEND=cuda
makes "auto" do so too). The engine, with the model on a GPU, keeps each layer's index on the device instead
(`ResidentIndex`, appended as tokens spill) and scans it there. The weighted LUTs are always built here in numpy, so
every backend sums the same ints.

`search_and_rerank` is a layer's whole cold selection (this scan, the two-level index's candidates where it has
some, the int8 rerank of the shortlist and the pick) in one numba call for blocks of a few queries; for prefill
blocks of many queries the rerank between is a batched matmul (codec.score_shortlist). The engine's decode step on
the CPU runs the same steps, and the decode of its picks, in token_retrieval.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numba as nb
import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from infinitekv import codec, cpu_scan
from infinitekv.codec import prefetch_cell, rerank_candidates
from infinitekv.threads import numba_threads_for

MODES = ("weighted", "hamming")
BACKENDS = ("auto", "numpy", "numba", "faiss", "cuda")
QUERY_BITS = 16  # qi = rint(q * 2**QUERY_BITS / max|q|)
DENSE_RATIO = 32  # N <= 32 k: score every token, then one top-k (heaps would churn)
SCORE_BLOCK = 1024  # tokens scored per pass of one query row: the block's signatures stay in L1/L2 across rows
FAISS_SAMPLE = 1 << 16  # rows whose distances set the faiss range search's radius
CUDA_PASS_BYTES = 1 << 30  # scores and top-k keys held on the GPU at once
CSRC = Path(__file__).resolve().parent.parent / "csrc"


def search(signatures, weights, queries, k: int, *, mode: str = "weighted", backend: str = "auto",
           exclude_before: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k tokens per kv-head: (scores float32 [H, k'], ids int64 [H, k']), each row best first."""
    queries = np.asarray(queries)
    if queries.ndim != 2:
        raise ValueError(f"queries must be [H, D], got shape {queries.shape}")
    scores, ids = search_many(signatures, weights, queries[None], k, mode=mode, backend=backend,
                              exclude_before=exclude_before)
    return scores[0], ids[0]


def search_many(signatures, weights, queries, k: int, *, mode: str = "weighted", backend: str = "auto",
                exclude_before: int = 0, by_index: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Q queries per kv-head at once (a prefill block): queries [Q, H, D] -> scores, ids [Q, H, k'].

    by_index: the same k' tokens, listed by ascending id instead of best first (a caller that reranks them wants
    token order, and the dense path then skips its sort)."""
    sigs, weights, queries, k_out, start = _check(signatures, weights, queries, k, mode, backend, exclude_before)
    n_queries, n_heads, _ = queries.shape
    backend = resolve_backend(backend)
    if k_out == 0:
        return (np.empty((n_queries, n_heads, 0), np.float32), np.empty((n_queries, n_heads, 0), np.int64))
    if backend == "numba":  # lists them by index itself when asked
        scores, ids = _search_numba(sigs, weights, queries.reshape(-1, queries.shape[-1]), k_out, mode, start,
                                    by_index=by_index)
        return scores.reshape(n_queries, n_heads, k_out), ids.reshape(n_queries, n_heads, k_out)
    if backend == "numpy":
        pairs = [_search_numpy(sigs, weights, q, k_out, mode, start) for q in queries]
        scores, ids = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    elif backend == "faiss":
        scores, ids = _search_faiss(sigs, queries, k_out, start)
    else:
        scores, ids = _search_cuda(sigs, weights, queries.reshape(-1, queries.shape[-1]), k_out, mode, start)
    if by_index:
        scores, ids = _by_index(scores, ids)
    return scores.reshape(n_queries, n_heads, k_out), ids.reshape(n_queries, n_heads, k_out)


def resolve_backend(backend: str) -> str:
    """The backend "auto" stands for here: numba, or cuda where IKV_SEARCH_BACKEND=cuda asks for it and it runs."""
    if backend == "auto":
        return "cuda" if os.environ.get("IKV_SEARCH_BACKEND") == "cuda" and _cuda_available() else "numba"
    return backend


def kernel_weights(weights, mode: str) -> np.ndarray:
    """The weights array the numba kernels read: float16 as its bits (uint16, widened per token inside the kernel,
    so the index is never copied), float32 as is; a placeholder in hamming mode, which has none."""
    if mode != "weighted":
        return np.zeros((1, 1), np.float32)
    return weights.view(np.uint16) if weights.dtype == np.float16 else weights


def _by_index(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best-first rows of (scores, ids) reordered by ascending id."""
    order = np.argsort(ids, axis=-1)  # ids in a row are distinct
    return np.take_along_axis(scores, order, axis=-1), np.take_along_axis(ids, order, axis=-1)


def score_ids(signatures, weights, queries, ids) -> np.ndarray:
    """Weighted first-stage scores of chosen tokens: queries float32 [Q, H, D], ids int64 [Q, H, M] (rows of
    `signatures`) -> float32 [Q, H, M], each the score the weighted scan gives that token for that query row."""
    sigs, weights, queries, _, _ = _check(signatures, weights, queries, 0, "weighted", "numba", 0)
    rows = queries.reshape(-1, queries.shape[-1])  # row g: query g // H for head g % H
    out = np.empty(ids.shape, np.float32)
    per_row = (len(rows), ids.shape[-1])
    _score_ids(sigs, kernel_weights(weights, "weighted"), score_luts(rows, "weighted").reshape(len(rows), -1),
               np.ascontiguousarray(ids, np.int64).reshape(per_row), out.reshape(per_row))
    return out


@nb.njit(cache=True)
def _score_ids(sigs, weights, luts, ids, out):
    n_heads = sigs.shape[1]
    for g in range(ids.shape[0]):
        _id_scores(sigs, weights, luts[g], g % n_heads, ids[g], out[g])


@nb.njit(inline="always")
def _id_scores(sigs, weights, lut, h, ids, out):
    # out[j] = the weighted scan's score of token ids[j] of head h against one LUT
    n_words = _lut_words(sigs.shape[2])
    for j in range(ids.shape[0]):  # the ids are scattered through the index (a probe's cluster members)
        prefetch_cell(sigs, ids[j], h, sigs.shape[2])
        prefetch_cell(weights, ids[j], h, weights.itemsize)
    for j in range(ids.shape[0]):
        i = ids[j]
        out[j] = _weight_as_float32(weights[i, h]) * np.float32(_lut_sum(sigs[i, h], lut, n_words)) + np.float32(0.0)


def top_k_rows(scores: np.ndarray, k: int, by_index: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each row of float32 scores [..., n], best first, ties to the lower index: (scores, indices).
    by_index: the same k, by ascending index."""
    flat = np.ascontiguousarray(scores, dtype=np.float32).reshape(math.prod(scores.shape[:-1]), scores.shape[-1])
    flat = np.where(flat == 0, np.float32(0.0), flat)  # -0.0 and +0.0 must tie
    k = min(k, flat.shape[1])
    out_s = np.empty((flat.shape[0], k), np.float32)
    out_i = np.empty((flat.shape[0], k), np.int64)
    if k:
        with numba_threads_for(flat.size):
            _select_dense(flat, k, 0, out_s, out_i, by_index)
    return out_s.reshape(scores.shape[:-1] + (k,)), out_i.reshape(scores.shape[:-1] + (k,))


def _check(signatures, weights, queries, k, mode, backend, exclude_before):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and mode != "hamming":
        raise ValueError("the faiss backend supports mode='hamming' only")
    if backend == "cuda" and not _cuda_available():
        raise ValueError("backend='cuda' needs torch with a CUDA device; use backend='numba' on this machine")
    sigs = np.asarray(signatures)
    if sigs.dtype != np.uint8 or sigs.ndim != 3:
        raise ValueError(f"signatures must be uint8 [N, H, B], got {sigs.dtype} {sigs.shape}")
    sigs = np.ascontiguousarray(sigs)  # a no-op for archive memmaps and fresh arrays
    n, n_heads, n_bytes = sigs.shape
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 3 or queries.shape[1:] != (n_heads, 8 * n_bytes):
        raise ValueError(f"queries must be [Q, {n_heads}, {8 * n_bytes}] for signatures {sigs.shape}, "
                         f"got {queries.shape}")
    if not np.isfinite(queries).all():
        raise ValueError("queries must be finite")
    if mode == "weighted":
        weights = np.asarray(weights)  # float16 stays float16 (no copy of the index); anything else -> float32
        weights = np.ascontiguousarray(weights, dtype=np.float16 if weights.dtype == np.float16 else np.float32)
        if weights.shape != (n, n_heads):
            raise ValueError(f"weights must be [{n}, {n_heads}], got {weights.shape}")
    if int(k) < 0 or int(exclude_before) < 0:
        raise ValueError(f"k and exclude_before must be >= 0, got k={k}, exclude_before={exclude_before}")
    start = int(exclude_before)
    return sigs, weights, queries, max(0, min(int(k), n - start)), start


# ---------------------------------------------------------------------------------------------------- query encoding

def quantise_queries(queries: np.ndarray) -> np.ndarray:
    """float [..., D] -> int32 qi = rint(q * 2**16 / max|q|) per row (0 for an all-zero row)."""
    q = np.asarray(queries, dtype=np.float64)
    peak = np.abs(q).max(axis=-1, keepdims=True)
    step = np.divide(float(2**QUERY_BITS), peak, out=np.zeros_like(peak), where=peak > 0)
    return np.rint(q * step).astype(np.int32)


def query_bits(queries: np.ndarray) -> np.ndarray:
    """float [..., D] -> uint8 [..., D/8]: (q < 0) packed like the signatures."""
    return np.packbits(np.asarray(queries) < 0, axis=-1, bitorder="little")


_BYTE_SIGNS = 1 - 2 * ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1)  # [256, 8]: +1 bit 0, -1 bit 1
_BYTE_SIGNS_T = np.ascontiguousarray(_BYTE_SIGNS.T, np.float64)  # [8, 256], for BLAS
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)  # [256]


def score_luts(queries: np.ndarray, mode: str) -> np.ndarray:
    """float [G, D] -> int32 [G, B, 256]: isum(sig) = sum_b LUT[g, b, sig[b]] for either mode."""
    g, d = queries.shape
    if mode == "weighted":
        # sums of 8 integers below 2**17 are exact in float64, and BLAS does this product ~3x faster than numpy's
        # integer matmul (it runs once per layer and step)
        qi = quantise_queries(queries).astype(np.float64).reshape(g, d // 8, 8)
        return (qi @ _BYTE_SIGNS_T).astype(np.int32)
    qbits = query_bits(queries)  # [G, B]
    return -_POPCOUNT[qbits[:, :, None] ^ np.arange(256, dtype=np.uint8)].astype(np.int32)


# ---------------------------------------------------------------------------------------------------- numpy reference

def _search_numpy(sigs, weights, queries, k, mode, start):
    # queries: [H, D] -> scores, ids [H, k]; straight from the definition, one head and one block of rows at a time
    n, n_heads, _ = sigs.shape
    scores = np.empty((n_heads, n - start), np.float32)
    qi = quantise_queries(queries).astype(np.float64)  # integers < 2**17: float64 sums of them are exact
    qbits = query_bits(queries)
    for h in range(n_heads):
        for lo in range(start, n, 65536):
            hi = min(n, lo + 65536)
            block = sigs[lo:hi, h]
            if mode == "weighted":
                signs = 1.0 - 2.0 * np.unpackbits(block, axis=-1, bitorder="little")
                isum = (signs @ qi[h]).astype(np.int64)
                s = weights[lo:hi, h].astype(np.float32) * isum.astype(np.float32)
            else:
                s = -np.unpackbits(block ^ qbits[h], axis=-1).sum(axis=-1).astype(np.float32)
            scores[h, lo - start : hi - start] = s
    scores[scores == 0] = 0.0  # -0.0 -> +0.0
    index = np.arange(start, n, dtype=np.int64)
    order = np.stack([np.lexsort((index, -row))[:k] for row in scores])
    return np.take_along_axis(scores, order, axis=1), index[order]


# ---------------------------------------------------------------------------------------------------- numba

@nb.njit(inline="always")
def _worse(s1, i1, s2, i2):
    return s1 < s2 or (s1 == s2 and i1 > i2)


@nb.njit(cache=True)
def _sift_down(hs, hi, size, pos):
    # min-heap by _worse: the worst kept entry sits at the root
    while True:
        child = 2 * pos + 1
        if child >= size:
            return
        if child + 1 < size and _worse(hs[child + 1], hi[child + 1], hs[child], hi[child]):
            child += 1
        if not _worse(hs[child], hi[child], hs[pos], hi[pos]):
            return
        hs[pos], hs[child] = hs[child], hs[pos]
        hi[pos], hi[child] = hi[child], hi[pos]
        pos = child


@nb.njit(cache=True)
def _offer(hs, hi, size, s, i):
    # keep the best len(hs) of everything offered; returns the new size
    if size < hs.shape[0]:
        pos = size
        hs[pos] = s
        hi[pos] = i
        while pos > 0:
            parent = (pos - 1) // 2
            if not _worse(hs[pos], hi[pos], hs[parent], hi[parent]):
                break
            hs[pos], hs[parent] = hs[parent], hs[pos]
            hi[pos], hi[parent] = hi[parent], hi[pos]
            pos = parent
        return size + 1
    if _worse(hs[0], hi[0], s, i):
        hs[0] = s
        hi[0] = i
        _sift_down(hs, hi, size, 0)
    return size


@intrinsic
def _popcount64(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


# every float16's float32 value, by its bits (numpy's widening is exact): one load per weight where the bit
# arithmetic took a tenth of the scan's time
_HALF_AS_FLOAT32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _weight_as_float32(w):
    """A weight read from the kernel's weights array -> float32: float16 bits (uint16) widened, float32 as is."""


@overload(_weight_as_float32, inline="always")
def _weight_as_float32_impl(w):
    if w == types.uint16:
        return lambda w: _HALF_AS_FLOAT32[np.uint32(w)]
    if w == types.float32:
        return lambda w: w
    return None


@nb.njit(inline="always")
def _lut_sum(sig, lut, n_words):
    # isum of one signature sig [B] (B = 8 * n_words, or n_words = 0 and any B): its bytes read one by one, eight
    # per word with the offsets written out, unsigned. A runtime-length byte loop, or bytes shifted out of a
    # uint64, cost about 1.5x as long (index arithmetic and sign checks per byte, not loads, bound this loop)
    acc = np.int32(0)
    for j in range(n_words):
        o = np.uint32(2048 * j)
        t = sig[8 * j : 8 * j + 8]
        acc += (lut[o + t[0]] + lut[o + np.uint32(256) + t[1]] + lut[o + np.uint32(512) + t[2]]
                + lut[o + np.uint32(768) + t[3]] + lut[o + np.uint32(1024) + t[4]]
                + lut[o + np.uint32(1280) + t[5]] + lut[o + np.uint32(1536) + t[6]]
                + lut[o + np.uint32(1792) + t[7]])
    if n_words == 0:
        for b in range(sig.shape[0]):
            acc += lut[np.uint32(256 * b) + sig[b]]
    return acc


@nb.njit(inline="always")
def _lut_words(n_bytes):
    # _lut_sum's n_words for signatures of n_bytes: eight bytes at a time where B allows, else byte by byte
    return n_bytes // 8 if n_bytes % 8 == 0 else 0


@nb.njit(cache=True)
def _score_block(sigs, words, weights, luts, qwords, kind, use_weights, lo, hi, out):
    # scores of tokens [lo, hi) for every query row into out [G, >= hi - lo]; row g scores head g % H.
    # kind 0: LUT (either mode), 1: popcount on uint64 words (hamming). One row at a time over the block (the head
    # and its LUT stay in registers and L1 for the whole pass; the caller keeps blocks small enough that the block's
    # rows are still in L2 when the next head reads them).
    n_heads = sigs.shape[1]
    for g in range(out.shape[0]):
        h = g % n_heads
        row = out[g]
        if kind == 1:
            for i in range(lo, hi):
                acc = np.int32(0)
                for j in range(words.shape[2]):
                    acc -= np.int32(_popcount64(words[i, h, j] ^ qwords[g, j]))
                row[i - lo] = np.float32(acc) + np.float32(0.0)
        else:
            _lut_scores(sigs, weights, luts[g], h, use_weights, lo, hi, row)


@nb.njit(inline="always")
def _lut_scores(sigs, weights, lut, h, use_weights, lo, hi, out):
    # out[i - lo] = the score of token i of head h against one LUT, for i in [lo, hi). The signature's word count
    # is a constant where it is 1 or 2 (head_dim 64 or 128), so _lut_sum's loop unrolls: 1.25x faster on 1M x 3
    # heads than with the count known only at run time
    n_words = _lut_words(sigs.shape[2])
    if n_words == 1:
        _lut_scores_of(sigs, weights, lut, h, use_weights, lo, hi, out, 1)
    elif n_words == 2:
        _lut_scores_of(sigs, weights, lut, h, use_weights, lo, hi, out, 2)
    else:
        _lut_scores_of(sigs, weights, lut, h, use_weights, lo, hi, out, n_words)


@nb.njit(inline="always")
def _lut_scores_of(sigs, weights, lut, h, use_weights, lo, hi, out, n_words):
    for i in range(lo, hi):
        s = np.float32(_lut_sum(sigs[i, h], lut, n_words))
        if use_weights:
            s = _weight_as_float32(weights[i, h]) * s
        out[i - lo] = s + np.float32(0.0)  # -0.0 + 0.0 = +0.0: equal scores get equal bits


@nb.njit(cache=True)
def _keep_best(scores, first, hs, hi, size):
    # offer scores[j] (token first + j) to the heap (hs, hi) of current size; returns the new size. Tokens arrive
    # in index order, so a score equal to the root loses the tie: only a strictly greater one can enter, and on
    # random data almost none do, so this is a compare per token
    k = hs.shape[0]
    root = hs[0] if size == k else np.float32(-np.inf)
    for j in range(scores.shape[0]):
        s = scores[j]
        if s > root:
            size = _offer(hs, hi, size, s, first + j)
            if size == k:
                root = hs[0]
    return size


@nb.njit(parallel=True, cache=True)
def _chunk_topk(sigs, words, weights, luts, qwords, kind, use_weights, start, chunk, out_s, out_i):
    # one task per chunk of tokens, all query rows in it, so every signature byte is read from memory once:
    # out_s, out_i: [C, G, k] one heap per (chunk, row); unfilled slots keep (-inf, int64 max)
    n = sigs.shape[0]
    n_chunks, n_rows, k = out_s.shape
    for c in nb.prange(n_chunks):
        buf = np.empty((n_rows, SCORE_BLOCK), np.float32)
        sizes = np.zeros(n_rows, np.int64)
        for lo in range(start + c * chunk, min(n, start + (c + 1) * chunk), SCORE_BLOCK):
            hi = min(n, start + (c + 1) * chunk, lo + SCORE_BLOCK)
            _score_block(sigs, words, weights, luts, qwords, kind, use_weights, lo, hi, buf)
            for g in range(n_rows):
                sizes[g] = _keep_best(buf[g, : hi - lo], lo, out_s[c, g], out_i[c, g], sizes[g])


@nb.njit(parallel=True, cache=True)
def _dense_scores(sigs, words, weights, luts, qwords, kind, use_weights, start, out):
    # every score into out [G, N - start]; used when k is a large fraction of
    # N, where heap upkeep would cost more than one partition over all scores
    n = sigs.shape[0]
    n_blocks = (n - start + SCORE_BLOCK - 1) // SCORE_BLOCK
    for c in nb.prange(n_blocks):
        lo = start + c * SCORE_BLOCK
        hi = min(n, lo + SCORE_BLOCK)
        _score_block(sigs, words, weights, luts, qwords, kind, use_weights, lo, hi, out[:, lo - start : hi - start])


SELECT_BUCKET_BITS = 12  # _select_dense's histogram: the top 12 bits of each order key, 4,096 buckets
_SELECT_SHIFT = 32 - SELECT_BUCKET_BITS


@nb.njit(inline="always")
def order_key(bits):
    # float32 bits (as int32) -> uint32 with the same order as the floats: negative floats flip every bit,
    # non-negative ones only the sign bit; branch-free so the loop over a row vectorises
    flip = (bits >> np.int32(31)) | np.int32(-(2**31))  # -1 for negatives, 0x80000000 otherwise
    return np.uint32(bits ^ flip)


@nb.njit(parallel=True, cache=True)
def _select_dense(scores, k, offset, out_s, out_i, by_index):
    # scores [G, n] (no -0.0, no NaN) -> the best k of each row, best first (by_index: by ascending index), ties
    # to the lower index
    if k == 0:
        return
    for g in nb.prange(scores.shape[0]):
        _select_row(scores[g], k, offset, out_s[g], out_i[g], by_index)


@nb.njit(cache=True)
def _select_row(scores, k, offset, out_s, out_i, by_index):
    # one row of _select_dense: scores [n] -> out_s, out_i [k].
    # A radix select: a histogram of the top bits of each score's order key finds the bucket holding the k-th
    # best; sorting that bucket alone gives the k-th key T. Then one pass keeps every key above T and the first
    # (lowest-index) keys equal to T, meeting them in index order (by_index: done); otherwise only those k are
    # sorted, packed with their index into unique uint64s.
    n = scores.shape[0]
    bits = scores.view(np.int32)
    keys = np.empty(n, np.uint32)
    counts = np.zeros(1 << SELECT_BUCKET_BITS, np.int64)
    for i in range(n):
        keys[i] = order_key(bits[i])
    for i in range(n):
        counts[keys[i] >> np.uint32(_SELECT_SHIFT)] += 1
    need = k  # how many of the best k are still to be found, from the top bucket down
    bucket = len(counts) - 1
    while counts[bucket] < need:
        need -= counts[bucket]
        bucket -= 1
    in_bucket = np.empty(counts[bucket], np.uint32)
    m = 0
    for i in range(n):
        if keys[i] >> np.uint32(_SELECT_SHIFT) == bucket:
            in_bucket[m] = keys[i]
            m += 1
    in_bucket.sort()
    threshold = in_bucket[m - need]
    equal_wanted = 0  # of the best k, how many have key == threshold: those with the lowest indices win
    for j in range(m - need, m):
        if in_bucket[j] == threshold:
            equal_wanted += 1
    best = np.empty(k, np.uint64)
    found = 0
    for i in range(n):
        key = keys[i]
        if key > threshold or (key == threshold and equal_wanted > 0):
            if key == threshold:
                equal_wanted -= 1
            if by_index:  # this pass already meets them in index order
                out_i[found] = i + offset
                out_s[found] = scores[i]
            else:
                best[found] = (np.uint64(key) << np.uint64(32)) | np.uint64(0xFFFFFFFF - i)
            found += 1
    if by_index:
        return
    best.sort()
    for j in range(k):
        packed = best[k - 1 - j]
        index = np.int64(0xFFFFFFFF - (packed & np.uint64(0xFFFFFFFF)))
        out_i[j] = index + offset
        out_s[j] = scores[index]


@nb.njit(cache=True)
def _merge_topk(cand_s, cand_i, out_s, out_i):
    # cand_*: [G, M] candidates; out_*: [G, k] the best k of each row, best first
    n_rows, m = cand_s.shape
    for g in range(n_rows):
        hs = out_s[g]
        hi = out_i[g]
        size = 0
        for j in range(m):
            size = _offer(hs, hi, size, cand_s[g, j], cand_i[g, j])
        while size > 1:  # heap sort: the worst goes to the back
            size -= 1
            hs[0], hs[size] = hs[size], hs[0]
            hi[0], hi[size] = hi[size], hi[0]
            _sift_down(hs, hi, size, 0)


def _search_numba(sigs, weights, queries, k, mode, start, chunk=None, dense=None, by_index=False):
    # queries: [G, D], row g for head g % H -> scores, ids [G, k]; chunk: tokens per task (tests shorten it);
    # dense: force (True) or forbid (False) the all-scores path, None = choose by N / k
    n = sigs.shape[0]
    n_rows = len(queries)
    luts = score_luts(queries, mode).reshape(n_rows, -1)
    threads = nb.get_num_threads()
    if chunk is None:
        chunk = max(8 * SCORE_BLOCK, -(-(n - start) // threads))  # one task per thread: few heaps to merge
    n_chunks = -(-(n - start) // chunk)
    use_weights = mode == "weighted"
    words, qwords = np.zeros((1, 1, 1), np.uint64), np.zeros((1, 1), np.uint64)
    kind = 0  # the LUT
    if not use_weights and sigs.shape[2] % 8 == 0 and sigs.flags.aligned:  # popcount on uint64 words
        words = sigs.view(np.uint64)
        kind = 1
        qwords = query_bits(queries).view(np.uint64)
    weights = kernel_weights(weights, mode)
    scores = np.empty((n_rows, k), np.float32)
    ids = np.empty((n_rows, k), np.int64)
    with numba_threads_for(n_rows * (n - start)):  # a short scan: waking the pool costs more than it saves
        # the weighted scores from the CPU's vector kernel where it runs them (the same bits; it says False where
        # it does not), else numba's loop
        if dense if dense is not None else (n - start) <= DENSE_RATIO * k:
            all_scores = np.empty((n_rows, n - start), np.float32)
            if not (use_weights and cpu_scan.weighted_scores(sigs, weights, luts, start, nb.get_num_threads(),
                                                        all_scores)):
                _dense_scores(sigs, words, weights, luts, qwords, kind, use_weights, start, all_scores)
            _select_dense(all_scores, k, start, scores, ids, by_index)
            return scores, ids
        cand_s = np.full((n_chunks, n_rows, k), -np.inf, np.float32)
        cand_i = np.full((n_chunks, n_rows, k), np.iinfo(np.int64).max, np.int64)
        if not (use_weights and cpu_scan.weighted_chunk_topk(sigs, weights, luts, start, chunk, nb.get_num_threads(),
                                                        cand_s, cand_i)):
            _chunk_topk(sigs, words, weights, luts, qwords, kind, use_weights, start, chunk, cand_s, cand_i)
    _merge_topk(np.ascontiguousarray(cand_s.transpose(1, 0, 2)).reshape(n_rows, -1),
                np.ascontiguousarray(cand_i.transpose(1, 0, 2)).reshape(n_rows, -1), scores, ids)
    return _by_index(scores, ids) if by_index else (scores, ids)  # the heap merge lists them best first


# ---------------------------------------------------------------------------------------------------- fused

@dataclass(frozen=True)
class ClusterCandidates:
    """The two-level index's share of a selection: `ids` int64 [n_blocks, H, M], each row ascending, are candidates
    among the first `covered` tokens (the members of the row's best clusters); the `keep` best of each row by their
    weighted signature scores (`score_ids`) join the shortlist, and only the tokens from `covered` on are scanned."""

    ids: np.ndarray
    covered: int
    keep: int


def search_and_rerank(signatures, weights, records, block_queries, queries, block_starts, shortlist: int,
                      keep: int, mode: str = "weighted", clustered: ClusterCandidates | None = None) -> np.ndarray:
    """One layer's cold selection in one call: for each block b and kv-head h, the first stage's `shortlist` best
    tokens for block_queries[b, h] (`search_many`; with `clustered`, of the tokens from clustered.covered on, joined
    by the clustered candidates' best), reranked by their int8 keys against the block's queries
    (`codec.score_shortlist`: the max over queries[h, c, g] for c in block b), and the `keep` best of those (ties
    to the lower token id): ids int64 [H, n_blocks, keep'], ascending, keep' = min(keep, the shortlist's length).

    The same tokens as those calls composed (tested). A decode step makes one numba call per layer, with no return
    to Python between the steps; blocks of many queries (prefill) get their shortlists from one numba call and the
    rerank from codec.score_shortlist's matmul.
    records [N, H, record_bytes]; block_queries [n_blocks, H, D] float32 (the first stage's, in the signatures'
    basis); queries [H, C, G, D] float32 (the rerank's); block_starts [n_blocks + 1]."""
    start = clustered.covered if clustered is not None else 0
    # clustered candidates are scored by the weighted scan whatever the tail's mode, so they need the weights
    sigs, weights, block_queries, n_tail, _ = _check(signatures, weights, block_queries, shortlist,
                                                     "weighted" if clustered is not None else mode, "numba", start)
    n_blocks, n_heads, _ = block_queries.shape
    probed, n_probe = probed_candidates(clustered, n_blocks, n_heads)
    keep = min(keep, n_tail + n_probe)
    out = np.empty((n_heads, n_blocks, keep), np.int64)
    if keep == 0:
        return out
    rows = block_queries.reshape(-1, block_queries.shape[-1])  # row b * H + h, as search_many lays them out
    luts = score_luts(rows, mode).reshape(len(rows), -1)
    probe_luts = luts if mode == "weighted" or not n_probe else score_luts(rows, "weighted").reshape(len(rows), -1)
    kernel_args = (sigs, kernel_weights(weights, "weighted" if n_probe else mode), (luts, probe_luts), probed)
    sizes = (start, n_tail, n_probe, mode == "weighted")
    block_starts = np.ascontiguousarray(block_starts, dtype=np.int64)
    scanned = n_blocks * n_heads * (len(sigs) - start + probed.shape[2])
    if codec.reranks_by_matmul(block_starts, queries.shape[2]):  # many queries: the rerank's matmul
        shortlist = np.empty((n_blocks, n_heads, n_tail + n_probe), np.int64)
        with numba_threads_for(scanned):
            _shortlists(*kernel_args, sizes, shortlist)
        _, best = top_k_rows(codec.score_shortlist(records, shortlist, queries, block_starts), keep, by_index=True)
        return np.take_along_axis(shortlist.transpose(1, 0, 2), best, axis=-1)
    group_work = queries.shape[1] // n_blocks * queries.shape[2] * queries.shape[3]  # rerank work per candidate
    with numba_threads_for(scanned + n_blocks * n_heads * (n_tail + n_probe) * group_work):
        _search_and_rerank(*kernel_args, records, np.ascontiguousarray(queries, dtype=np.float32), block_starts,
                           sizes, out)
    return out


def probed_candidates(clustered: ClusterCandidates | None, n_blocks: int, n_heads: int) -> tuple[np.ndarray, int]:
    """The two-level index's candidates as the kernels take them: (ids int64 [n_blocks, H, M], how many of each
    row's join the shortlist); none without `clustered`. Refused in one line unless every id is below
    clustered.covered."""
    if clustered is None:
        return np.zeros((n_blocks, n_heads, 0), np.int64), 0
    probed, start = np.ascontiguousarray(clustered.ids, dtype=np.int64), clustered.covered
    if probed.shape[:2] != (n_blocks, n_heads) or (probed.size and not 0 <= probed.min() <= probed.max() < start):
        raise ValueError(f"clustered ids must be [{n_blocks}, {n_heads}, M] tokens below {start}")
    return probed, max(0, min(clustered.keep, probed.shape[2]))


@nb.njit(parallel=True, cache=True)
def _search_and_rerank(sigs, weights, luts, probed, records, queries, block_starts, sizes, out):
    # one task per (block, kv-head): pick_of
    keep = out.shape[2]
    n_heads = sigs.shape[1]
    for task in nb.prange(out.shape[1] * n_heads):
        b = task // n_heads
        h = task % n_heads
        out[h, b] = pick_of((sigs, weights, luts, probed), sizes, records, queries[h],
                            (block_starts[b], block_starts[b + 1]), (b, h), keep)


@nb.njit(inline="always")
def pick_of(index, sizes, records, queries, span, task, keep):
    """Kernel helper (numba): block b, kv-head h's `keep` best tokens, ascending: its shortlist (_shortlist_of),
    the rerank of their records against queries[c, g] for c in span (codec.rerank_candidates), the select of the
    best `keep` by index; what _shortlist_of, rerank_candidates and top_k_rows compute, in that order.
    index = (sigs, weights, (scan LUTs, probe LUTs), probed); task = (b, h)."""
    sigs, weights, luts, probed = index
    b, h = task
    short_i = _shortlist_of(sigs, weights, luts, probed, sizes, b, h)
    rerank = np.empty(len(short_i), np.float32)
    rerank_candidates(records, short_i, queries, span, h, rerank)
    for j in range(len(rerank)):
        rerank[j] = rerank[j] + np.float32(0.0)  # -0.0 and +0.0 must tie, as top_k_rows makes them
    keep_s = np.empty(keep, np.float32)
    keep_i = np.empty(keep, np.int64)
    _select_row(rerank, keep, 0, keep_s, keep_i, True)
    picked = np.empty(keep, np.int64)
    for j in range(keep):
        picked[j] = short_i[keep_i[j]]
    return picked


@nb.njit(parallel=True, cache=True)
def _shortlists(sigs, weights, luts, probed, sizes, out):
    # out [n_blocks, H, L]: every (block, kv-head)'s shortlist, for a rerank done outside numba
    n_heads = sigs.shape[1]
    for task in nb.prange(out.shape[0] * n_heads):
        out[task // n_heads, task % n_heads] = _shortlist_of(sigs, weights, luts, probed, sizes, task // n_heads,
                                                             task % n_heads)


@nb.njit(inline="always")
def _shortlist_of(sigs, weights, luts, probed, sizes, b, h):
    # block b, kv-head h: the clustered candidates' best n_probe by their weighted score (as score_ids and
    # top_k_rows pick them), then the tail's best n_tail (as the scan picks them), each by ascending id
    n, n_heads = sigs.shape[0], sigs.shape[1]
    start, n_tail, n_probe, use_weights = sizes
    scan_luts, probe_luts = luts
    task = b * n_heads + h  # the LUT row of (b, h), as search_many lays out its query rows
    short_i = np.empty(n_probe + n_tail, np.int64)
    if n_probe > 0:
        members = probed[b, h]
        probe_s = np.empty(len(members), np.float32)
        _id_scores(sigs, weights, probe_luts[task], h, members, probe_s)
        best_s = np.empty(n_probe, np.float32)
        best_j = np.empty(n_probe, np.int64)
        _select_row(probe_s, n_probe, 0, best_s, best_j, True)
        for j in range(n_probe):
            short_i[j] = members[best_j[j]]
    if n_tail > 0:
        scores = np.empty(n - start, np.float32)
        _lut_scores(sigs, weights, scan_luts[task], h, use_weights, start, n, scores)
        tail_s = np.empty(n_tail, np.float32)
        _select_row(scores, n_tail, start, tail_s, short_i[n_probe:], True)
    return short_i


# ---------------------------------------------------------------------------------------------------- faiss

def _search_faiss(sigs, queries, k, start):
    # queries: [Q, H, D] -> scores, ids [Q*H, k]. faiss breaks distance ties in no fixed order, and its k-NN search
    # for a few queries costs several times its range search, so there is no k-NN call: a range search collects
    # every token within a radius that takes in about 2k tokens (the radius is read off the distances of a sample
    # of rows), and the index tie-break is a sort of what it returns. A row that got fewer than k tokens is asked
    # again with a wider radius, so the result is exact whatever the sample said.
    import faiss

    n_queries, n_heads, d = queries.shape
    n_eff = sigs.shape[0] - start
    qbits = query_bits(queries)  # [Q, H, B]
    sample = sigs[start :: max(1, n_eff // FAISS_SAMPLE)]  # evenly spaced rows
    scores = np.empty((n_queries, n_heads, k), np.float32)
    ids = np.empty((n_queries, n_heads, k), np.int64)
    for h in range(n_heads):
        index = faiss.IndexBinaryFlat(d)
        index.add(np.ascontiguousarray(sigs[start:, h]))
        xq = np.ascontiguousarray(qbits[:, h])
        sample_dist = _POPCOUNT[sample[None, :, h] ^ xq[:, None]].sum(axis=-1)  # [Q, m]
        radius = np.quantile(sample_dist, min(1.0, 2 * k / n_eff), axis=1, method="higher").astype(np.int64)
        pending = np.arange(n_queries)
        while len(pending):
            lims, r_dist, r_ids = index.range_search(xq[pending], int(radius[pending].max()) + 1)  # distance < arg
            short = []
            for j, row in enumerate(pending):
                dist, found = r_dist[lims[j] : lims[j + 1]], r_ids[lims[j] : lims[j + 1]]
                inside = dist <= radius[row]
                if inside.sum() < k:
                    short.append(row)
                    continue
                dist, found = dist[inside].astype(np.int64), found[inside].astype(np.int64)
                order = np.lexsort((found, dist))[:k]  # distance, then token index
                scores[row, h] = -dist[order].astype(np.float32)
                ids[row, h] = found[order] + start
            pending = np.array(short, np.int64)
            radius[pending] += 2
    scores[scores == 0] = 0.0
    return scores.reshape(-1, k), ids.reshape(-1, k)


# ---------------------------------------------------------------------------------------------------- cuda

@functools.cache
def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _cuda_extension():
    from torch.utils.cpp_extension import load

    sources = [str(CSRC / "hamming_topk.cu"), str(CSRC / "hamming_topk_binding.cpp")]
    return load(name="ikv_signature_scan", sources=sources, extra_include_paths=[str(CSRC)],
                extra_cuda_cflags=["-O3"], verbose=False)


@functools.cache
def cuda_scan_ready() -> str | None:
    """None when the CUDA scan kernel is built and loaded (once per process, JIT: needs nvcc and a C++ compiler),
    else why not, in one line."""
    if not _cuda_available():
        return "torch sees no CUDA device"
    try:
        _cuda_extension()
    except Exception as err:  # noqa: BLE001 - a missing nvcc, ninja or compiler surfaces in many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:160]
        return f"the CUDA scan kernel did not build ({type(err).__name__}: {first})"
    return None


def topk_rows(scores, k: int, offset: int = 0):
    """torch float32 [G, n] scores (-0.0 already +0.0) -> numpy (scores, ids + offset) [G, k], index tie-break."""
    best, local = topk_rows_on_device(scores, k)
    return best.cpu().numpy(), local.cpu().numpy() + offset


def topk_rows_on_device(scores, k: int):
    """torch float32 [G, n] scores (-0.0 already +0.0) -> (scores, positions) [G, k] on their device, best first,
    equal scores to the lower position.

    Packs each score with its position into one int64 key, order-preserving float bits in the high half and
    0xFFFFFFFF - position in the low half, so torch.topk's unspecified tie order cannot matter: keys are unique.
    Runs on any torch device (the tests check it on the CPU).
    """
    import torch

    bits = scores.view(torch.int32).to(torch.int64)
    monotone = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order == int order (no -0.0, no NaN)
    low = 0xFFFFFFFF - torch.arange(scores.shape[1], device=scores.device, dtype=torch.int64)
    keys = torch.topk((monotone << 32) | low, k, dim=1, largest=True, sorted=True).values
    local = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    return torch.gather(scores, 1, local), local


def _search_cuda(sigs, weights, queries, k, mode, start, device="cuda", ext=None):
    # queries: [G, D], row g for head g % H -> scores, ids [G, k]; the index is uploaded for this call, head-major
    # (device and ext let the tests drive this glue on the CPU with a stand-in for the kernel)
    import torch

    head_major = lambda a: torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 0, 1))).to(device)  # noqa: E731
    sigs_t = head_major(sigs)
    weights_t = head_major(weights) if mode == "weighted" else None
    return _scan_rows(ext or _cuda_extension(), sigs_t, weights_t, len(sigs), queries, k, mode, start)


def _scan_rows(ext, sigs_t, weights_t, n_tokens: int, queries, k: int, mode: str, start: int):
    """The kernel over a head-major device index (tokens 0..n_tokens-1 valid) for numpy queries [G, D] -> numpy
    scores, ids [G, k]."""
    import torch

    table = torch.from_numpy(score_luts(queries, mode) if mode == "weighted" else query_bits(queries))
    scores, ids = scan_on_device(ext, sigs_t, weights_t, n_tokens, table.to(sigs_t.device), k, mode, start)
    return scores.cpu().numpy(), ids.cpu().numpy()


def scan_on_device(ext, sigs_t, weights_t, n_tokens: int, table, k: int, mode: str, start: int = 0):
    """The kernel over a head-major device index, then the top-k of each row on the device, in passes of
    <= CUDA_PASS_BYTES of scores: table (on the device) is the rows' LUTs int32 [G, B, 256] (weighted) or query bits
    uint8 [G, B] (hamming) -> (scores float32, ids int64) [G, k] on the device, best first, ties to the lower id."""
    import torch

    n_eff = n_tokens - start
    rows_per_pass = min(65535, max(1, CUDA_PASS_BYTES // (12 * n_eff)))  # float32 score + int64 key per cell
    out_s, out_i = [], []
    for lo in range(0, len(table), rows_per_pass):
        part = table[lo : lo + rows_per_pass]
        if mode == "weighted":
            scores = ext.weighted_scores(sigs_t, weights_t, part, n_tokens, start, lo)
        else:
            scores = ext.hamming_scores(sigs_t, part, n_tokens, start, lo)
        best, local = topk_rows_on_device(scores, k)
        out_s.append(best)
        out_i.append(local + start)
    return torch.cat(out_s), torch.cat(out_i)


class ResidentIndex:
    """One layer's first-stage index kept on the model's CUDA device: signatures [H, capacity, B] and weights
    [H, capacity], head-major, appended as tokens spill (capacity doubles) and never uploaded again, so a step's
    scan moves only its queries' LUTs to the device and the shortlist back.

    Records past the archive's committed point can be rolled back and rewritten (cache.crop, a fork taking over
    the tail): after a rollback the rows past the committed point are copied again from what the archive holds.
    """

    def __init__(self, device, ext=None, with_records: bool = False):
        self.device, self.ext = device, ext  # ext: the kernel module (tests pass a CPU build of the same code)
        self.with_records = with_records  # records [H, capacity, record_bytes] too (device_retrieval reranks them)
        self.n_tokens = 0
        self.sigs = self.weights = self.records = None
        self._rollbacks = 0
        self._staging = {}  # array name -> page-locked host buffer (CUDA only), see _staged
        self._copied = None  # CUDA event: the last appended rows have reached the device

    def kernel(self):
        return self.ext or _cuda_extension()

    def sync(self, archive, layer: int) -> None:
        if archive.rollbacks != self._rollbacks:
            self._rollbacks = archive.rollbacks
            self.n_tokens = min(self.n_tokens, archive.committed_tokens)
        self.append(archive.signatures(layer), archive.key_weights(layer),
                    archive.records(layer) if self.with_records else None)

    def append(self, signatures: np.ndarray, weights: np.ndarray, records: np.ndarray | None = None) -> None:
        """Copy rows n_tokens.. of the host index ([N, H, B] signatures, [N, H] weights, and [N, H, record_bytes]
        records when kept) to the device."""
        import torch

        n = len(signatures)
        if n <= self.n_tokens:
            self.n_tokens = n
            return
        host = {"sigs": signatures, "weights": weights, **({"records": records} if self.with_records else {})}
        capacity = 0 if self.sigs is None else self.sigs.shape[1]
        if n > capacity:
            grown = max(n, 2 * capacity, 1024)
            for name, array in host.items():
                dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
                bigger = torch.empty((array.shape[1], grown, *array.shape[2:]), dtype=dtype, device=self.device)
                if self.n_tokens:
                    bigger[:, : self.n_tokens] = getattr(self, name)[:, : self.n_tokens]
                setattr(self, name, bigger)
        new = slice(self.n_tokens, n)
        for name, array in host.items():
            rows = np.ascontiguousarray(np.swapaxes(array[new], 0, 1))
            getattr(self, name)[:, new].copy_(self._staged(name, rows), non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.n_tokens = n

    def _staged(self, name: str, rows: np.ndarray):
        """rows as a tensor the copy to the device can read without the host waiting on it.

        A copy from ordinary host memory makes the host wait until the device has run everything queued before it,
        and a decode step appends a token to every layer: the host would stall ~30 times a step. So on a CUDA device
        rows go through a page-locked buffer per array, reused once the copy that last read it is done (an event:
        that copy was queued a step ago, so the wait is normally nothing)."""
        import torch

        if torch.device(self.device).type != "cuda":
            return torch.from_numpy(rows)
        if self._copied is None:
            self._copied = torch.cuda.Event()
        else:
            self._copied.synchronize()
        buffer = self._staging.get(name)
        if buffer is None or buffer.numel() < rows.nbytes:
            buffer = self._staging[name] = torch.empty(max(rows.nbytes, 2 * (0 if buffer is None else buffer.numel())),
                                                      dtype=torch.uint8, pin_memory=True)
        staged = buffer[: rows.nbytes]
        staged.numpy()[:] = rows.reshape(-1).view(np.uint8)
        return staged.view(torch.from_numpy(rows[:0]).dtype).view(rows.shape)

    def search_many(self, queries, k: int, *, mode: str = "weighted", exclude_before: int = 0,
                    by_index: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`search_many` over the rows appended so far: queries [Q, H, D] -> scores, ids [Q, H, k']."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n_queries, n_heads, head_dim = queries.shape
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.sigs is not None and (n_heads, head_dim) != (self.sigs.shape[0], 8 * self.sigs.shape[2]):
            raise ValueError(f"queries [Q, H, D] = {queries.shape} do not match the index "
                             f"(H={self.sigs.shape[0]}, D={8 * self.sigs.shape[2]})")
        start = min(max(0, exclude_before), self.n_tokens)
        k_out = min(k, self.n_tokens - start)
        if k_out <= 0:
            return (np.empty((n_queries, n_heads, 0), np.float32), np.empty((n_queries, n_heads, 0), np.int64))
        scores, ids = _scan_rows(self.kernel(), self.sigs, self.weights, self.n_tokens,
                                 queries.reshape(-1, head_dim), k_out, mode, start)
        if by_index:
            scores, ids = _by_index(scores, ids)
        return scores.reshape(n_queries, n_heads, k_out), ids.reshape(n_queries, n_heads, k_out)
