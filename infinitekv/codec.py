"""The cold-tier record: one fixed-size record per (layer, kv-head, token), 1.5*D + 8 bytes for head_dim D (104 for
D = 64): int8 key codes of R (k - mu), 4-bit value codes, then four float16 scales.

The byte-by-byte layout, and why it is split this way, is in FORMAT.md ("The record"), the one place it is kept.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import binding as llvm, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from infinitekv.threads import numba_threads_for


def record_bytes(head_dim: int) -> int:
    """Bytes per (layer, kv-head, token) record: D key bytes + D/2 value bytes + 4 float16 scales."""
    if head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8, got {head_dim}")
    return head_dim + head_dim // 2 + 8


def signature_bytes(head_dim: int) -> int:
    return head_dim // 8


def rotation_matrix(head_dim: int, seed: int) -> np.ndarray:
    """A fixed random orthogonal matrix R (float32, [D, D]); archives store R itself, not just the seed."""
    gaussian = np.random.default_rng(seed).standard_normal((head_dim, head_dim))
    q, r = np.linalg.qr(gaussian)
    q *= np.sign(np.diag(r))[None, :]
    return q.astype(np.float32)


@nb.njit(parallel=True, cache=True)
def _encode_codes(x, values, scales, out):
    # x, values: [N, D] float32 (x already centred and rotated); scales: [N, 4] float32 already rounded to
    # float16, so codes are chosen against exactly what decode will use; out: [N, record_bytes] uint8
    n, d = x.shape
    half = d // 2
    for i in nb.prange(n):
        key_scale = scales[i, 0]
        for j in range(d):
            c = int(np.rint(x[i, j] / key_scale))
            out[i, j] = np.uint8(min(127, max(-127, c)) & 0xFF)
        value_scale = scales[i, 2]
        value_min = scales[i, 3]
        for j in range(half):
            lo = int(np.rint((values[i, 2 * j] - value_min) / value_scale))
            hi = int(np.rint((values[i, 2 * j + 1] - value_min) / value_scale))
            out[i, d + j] = np.uint8(min(15, max(0, lo)) | (min(15, max(0, hi)) << 4))


def encode_records(keys_centred_rotated: np.ndarray, values: np.ndarray) -> np.ndarray:
    """[N, D] float keys (already R(k - mu)) and values -> [N, record_bytes] uint8 records."""
    x = np.ascontiguousarray(keys_centred_rotated, dtype=np.float32)
    v = np.ascontiguousarray(values, dtype=np.float32)
    n, d = x.shape
    out = np.empty((n, record_bytes(d)), dtype=np.uint8)
    if n == 0:
        return out
    scales = np.empty((n, 4), dtype=np.float16)
    abs_x = np.abs(x)
    key_scale = (abs_x.max(axis=1) / 127.0).astype(np.float16)
    scales[:, 0] = np.where(key_scale > 0, key_scale, np.float16(1.0))
    scales[:, 1] = abs_x.mean(axis=1)
    value_min = v.min(axis=1).astype(np.float16)
    value_scale = ((v.max(axis=1) - value_min.astype(np.float32)) / 15.0).astype(np.float16)
    scales[:, 2] = np.where(value_scale > 0, value_scale, np.float16(1.0))
    scales[:, 3] = value_min
    _encode_codes(x, v, scales.astype(np.float32), out)
    out[:, d + d // 2 :] = scales.view(np.uint8)
    return out


def record_fields(records: np.ndarray, head_dim: int):
    """Views of a [..., record_bytes] uint8 array: (key codes int8, value codes uint8, scales float16[..., 4])."""
    d = head_dim
    key_codes = records[..., :d].view(np.int8)
    value_codes = records[..., d : d + d // 2]
    scales = np.ascontiguousarray(records[..., d + d // 2 : d + d // 2 + 8]).view(np.float16)
    return key_codes, value_codes, scales


def decode_keys_rotated(records: np.ndarray, head_dim: int) -> np.ndarray:
    """Records [..., record_bytes] -> dequantised x = R (k - mu), float32 [..., D]."""
    key_codes, _, scales = record_fields(records, head_dim)
    return key_codes.astype(np.float32) * scales[..., 0:1].astype(np.float32)


def decode_values(records: np.ndarray, head_dim: int) -> np.ndarray:
    """Records [..., record_bytes] -> dequantised values, float32 [..., D]."""
    _, value_codes, scales = record_fields(records, head_dim)
    codes = np.empty(value_codes.shape[:-1] + (head_dim,), dtype=np.float32)
    codes[..., 0::2] = value_codes & 0x0F
    codes[..., 1::2] = value_codes >> 4
    return scales[..., 3:4].astype(np.float32) + codes * scales[..., 2:3].astype(np.float32)


@nb.njit(parallel=True, cache=True)
def _decode_rows(records, ids, keys, values):
    # ids [H, M]: head h's tokens -> keys, values [H, M, D] float32, computed as decode_keys_rotated and
    # decode_values compute them (float32 products and sums, no fused multiply-add), so both give the same bits
    n_heads, m = ids.shape
    for task in nb.prange(n_heads * m):
        h = task // m
        j = task % m
        decode_record(records[ids[h, j], h], keys[h, j], values[h, j])


@nb.njit(inline="always")
def decode_record(row, key, value):
    """Kernel helper (numba): one record row [record_bytes] -> its dequantised rotated key x = R (k - mu) and its
    value, written into key and value [D] float32."""
    d = key.shape[0]
    half = d // 2
    at = d + half
    key_scale = np.float32(_half_to_float(np.int32(row[at]), np.int32(row[at + 1])))
    value_scale = np.float32(_half_to_float(np.int32(row[at + 4]), np.int32(row[at + 5])))
    value_min = np.float32(_half_to_float(np.int32(row[at + 6]), np.int32(row[at + 7])))
    for e in range(d):
        key[e] = np.float32(_int8(row[e])) * key_scale
    for e in range(half):
        packed = np.int32(row[d + e])
        value[2 * e] = value_min + np.float32(packed & 15) * value_scale
        value[2 * e + 1] = value_min + np.float32(packed >> 4) * value_scale


def decode_rows(records: np.ndarray, ids: np.ndarray, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Records [N, H, record_bytes] (may be a memmap) and token ids [H, ...] (each head its own) -> the
    dequantised rotated keys x = R (k - mu) and values, float32 [H, ..., D] each, without copying the records."""
    flat = np.ascontiguousarray(ids.reshape(ids.shape[0], -1), dtype=np.int64)
    keys = np.empty(flat.shape + (head_dim,), np.float32)
    values = np.empty(flat.shape + (head_dim,), np.float32)
    with numba_threads_for(flat.size * head_dim * 4):
        _decode_rows(records, flat, keys, values)
    return keys.reshape(ids.shape + (head_dim,)), values.reshape(ids.shape + (head_dim,))


def signatures_from_records(records: np.ndarray, head_dim: int) -> np.ndarray:
    """The derived search index: sign bits of the key codes, packed little-endian, [..., D/8] uint8.

    Bit j of byte b is 1 when key code 8*b + j is negative.
    """
    negative = records[..., :head_dim] >= 128  # int8 sign bit
    return np.packbits(negative, axis=-1, bitorder="little")


def key_mean_abs(records: np.ndarray, head_dim: int) -> np.ndarray:
    """The per-record weight of the signature score, float32 [...]."""
    return record_fields(records, head_dim)[2][..., 1].astype(np.float32)


# LLVM 15 made pointers opaque, and the intrinsic's name carries its pointer type
_PREFETCH = "llvm.prefetch.p0" if llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch(typingctx, address):
    # a hint, never a fault: ask for the cache line holding `address` (uintp) for reading, kept in every level
    def codegen(context, builder, signature, args):
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), _PREFETCH)
        builder.call(hint, [builder.inttoptr(args[0], byte_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(types.uintp), codegen


@nb.njit(inline="always")
def prefetch_cell(array, i, h, n_bytes):
    """Kernel helper (numba): start loading the n_bytes at array[i, h] into the caches. Scattered rows read in a
    loop of many loads each keep only a few cache misses in flight; a pass of these hints over all the rows first
    overlaps them (measured: 3 x 1,024 cold records copied out in half the time)."""
    address = array.ctypes.data + i * array.strides[0] + h * array.strides[1]
    for offset in range(0, n_bytes, 64):
        _prefetch(address + offset)
    _prefetch(address + n_bytes - 1)


@nb.njit(cache=True, inline="always")
def _int8(byte):
    # a key code's value from its stored byte, without a branch: loops over codes then vectorise (a rerank of
    # 1,024 candidates measured 2.7x faster than with `code - 256 if code >= 128 else code`)
    code = np.int32(byte)
    return code - ((code >> 7) << 8)


@nb.njit(cache=True, inline="always")
def _half_to_float(low, high):
    # IEEE 754 binary16 -> float32 (numba has no float16)
    bits = low | (high << 8)
    sign = -1.0 if bits & 0x8000 else 1.0
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0:
        return sign * mantissa * 2.0**-24
    if exponent == 31:
        return sign * np.inf if mantissa == 0 else np.nan
    return sign * (1.0 + mantissa / 1024.0) * 2.0 ** (exponent - 15)


@nb.njit(parallel=True, cache=True)
def _score_shortlist(records, shortlist, queries, block_starts, out):
    n_blocks, n_heads, _ = shortlist.shape
    for task in nb.prange(n_blocks * n_heads):
        b = task // n_heads
        h = task % n_heads
        rerank_candidates(records, shortlist[b, h], queries[h], (block_starts[b], block_starts[b + 1]), h,
                          out[h, b])


@nb.njit(cache=True, fastmath=True)
def rerank_candidates(records, ids, queries, span, h, out):
    """Kernel helper (numba): out[j] = the max over queries[c, g] for c in span of q . x for candidate ids[j] of
    kv-head h, x its dequantised key. records [N, H, record_bytes]; ids [L]; queries [C, G, D]."""
    n_candidates = ids.shape[0]
    group, d = queries.shape[1], queries.shape[2]
    scale_at = d + d // 2
    # the candidates' key codes and scales are copied out first: a loop of plain loads keeps many of these
    # scattered records in flight at once, where scoring each as it arrives waits on memory for every one
    rows = np.empty((n_candidates, d + 2), np.uint8)
    for j in range(n_candidates):
        prefetch_cell(records, ids[j], h, scale_at + 2)
    for j in range(n_candidates):
        token = ids[j]
        for e in range(d):
            rows[j, e] = records[token, h, e]
        rows[j, d] = records[token, h, scale_at]
        rows[j, d + 1] = records[token, h, scale_at + 1]
    key = np.empty(d, dtype=np.float32)
    for j in range(n_candidates):
        for e in range(d):
            key[e] = np.float32(_int8(rows[j, e]))
        scale = _half_to_float(np.int32(rows[j, d]), np.int32(rows[j, d + 1]))
        best = -np.inf
        for c in range(span[0], span[1]):
            for g in range(group):
                dot = np.float32(0.0)
                for e in range(d):
                    dot += key[e] * queries[c, g, e]
                if dot > best:
                    best = dot
        out[j] = best * scale


WIDE_RERANK = 16  # from this many queries x query heads per block (a prefill block's), the rerank is a matmul


def reranks_by_matmul(block_starts: np.ndarray, group: int) -> bool:
    """Whether score_shortlist scores these blocks (G query heads per kv-head) by its batched matmul."""
    return int(np.diff(block_starts).max()) * group >= WIDE_RERANK


def score_shortlist(records: np.ndarray, shortlist: np.ndarray, queries: np.ndarray, block_starts: np.ndarray):
    """Rerank scores straight from the int8 key codes, without materialising float keys.

    records [N, H, record_bytes] (may be a memmap); shortlist [n_blocks, H, L] token ids; queries [H, C, G, D] in
    the rotated basis, G query heads per kv-head; block b owns queries block_starts[b]:block_starts[b+1] and
    shortlist[b]. Returns float32 [H, n_blocks, L]: for block b, the max over its queries and their G heads of
    q . x against its candidates (x = dequantised R(k - mu)). Blocks of a few queries (decode) are scored in numba
    (rerank_candidates), blocks of many (prefill) by one batched matmul: equal up to float rounding (tested).
    """
    n_heads, n_blocks = queries.shape[0], shortlist.shape[0]
    block_starts = np.asarray(block_starts, dtype=np.int64)
    if reranks_by_matmul(block_starts, queries.shape[2]):
        return _score_shortlist_by_matmul(records, shortlist, queries, block_starts)
    out = np.empty((n_heads, n_blocks, shortlist.shape[2]), dtype=np.float32)
    with numba_threads_for(shortlist.size * queries.shape[1] // n_blocks * queries.shape[2] * queries.shape[3]):
        _score_shortlist(records, np.ascontiguousarray(shortlist), np.ascontiguousarray(queries, dtype=np.float32),
                         np.ascontiguousarray(block_starts, dtype=np.int64), out)
    return out


def _score_shortlist_by_matmul(records, shortlist, queries, block_starts):
    # score_shortlist for blocks of many queries: every candidate's key codes against all of its block's queries
    # in one batched matrix product (a dot per pair in numba spent most of its time summing across its vector:
    # 19 ms against ~3 for a prefill chunk of 16 blocks x 3 kv-heads x 1,024 candidates). A short block is padded
    # with repeats of its last query, which leave its max alone.
    import torch

    n_heads, _, group, head_dim = queries.shape
    n_blocks, _, n_candidates = shortlist.shape
    codes = np.empty((n_blocks, n_heads, n_candidates, head_dim), np.float32)
    scales = np.empty((n_blocks, n_heads, n_candidates), np.float32)
    with numba_threads_for(codes.size):
        _gather_key_codes(records, np.ascontiguousarray(shortlist, dtype=np.int64), codes, scales)
    longest = int(np.diff(block_starts).max())
    rows = np.minimum(block_starts[:-1, None] + np.arange(longest), block_starts[1:, None] - 1)  # [n_blocks, longest]
    by_block = np.asarray(queries, dtype=np.float32)[:, rows]  # [H, n_blocks, longest, G, D]
    by_block = by_block.transpose(1, 0, 4, 2, 3).reshape(n_blocks * n_heads, head_dim, longest * group)
    dots = torch.bmm(torch.from_numpy(codes.reshape(n_blocks * n_heads, n_candidates, head_dim)),
                     torch.from_numpy(np.ascontiguousarray(by_block)))  # [n_blocks * H, L, longest * G]
    best = dots.amax(dim=-1).numpy().reshape(n_blocks, n_heads, n_candidates)
    return np.ascontiguousarray((best * scales).transpose(1, 0, 2))  # [H, n_blocks, L]


@nb.njit(parallel=True, cache=True)
def _gather_key_codes(records, shortlist, codes, scales):
    # the candidates' int8 key codes as float32 and their key scales: codes [n_blocks, H, L, D], scales [.., L]
    n_blocks, n_heads, n_candidates = shortlist.shape
    d = codes.shape[3]
    scale_at = d + d // 2
    for task in nb.prange(n_blocks * n_heads):
        b = task // n_heads
        h = task % n_heads
        for j in range(n_candidates):
            prefetch_cell(records, shortlist[b, h, j], h, scale_at + 2)
        for j in range(n_candidates):
            row = records[shortlist[b, h, j], h]
            for e in range(d):
                codes[b, h, j, e] = np.float32(_int8(row[e]))
            scales[b, h, j] = _half_to_float(np.int32(row[scale_at]), np.int32(row[scale_at + 1]))
