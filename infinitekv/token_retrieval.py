"""A decode step's cold retrieval for one layer in one numba call on the CPU: from the step's selection queries to
the retrieved keys and values, RoPE'd at their slots in the compact layout, ready to attend.

attention.retrieve composes the same steps for a block of queries (prefill) from separate calls, each of which
crosses between torch, numpy and numba; per decode step that glue, not the scan, was most of the retrieval's time
(BENCHMARKS.md, speed). Per kv-head, in one task of one call:

1. first stage: the step's query summed over its GQA group scores every tail token's signature, from LUTs built
   here as search.score_luts builds the weighted ones (the same ints), plus the two-level index's candidates where
   it has some: the shortlist, ties to the lower index;
2. rerank and pick: codec.rerank_candidates' int8 scores, the `keep` best, ascending (1 and 2 are search.pick_of,
   the very code search_and_rerank runs per block): the same token ids as attention.select_cold_blocks (tested);
3. decode: the picks' keys and values (codec.decode_record, as decode_rows), keys taken back to the model's basis,
   k = x R + mu (summed in another order than numpy's product: equal up to float rounding);
4. slot order (attention.near_last): far picks in token order, then the `near` best by max over the group's
   turned queries of q . k, in token order;
5. RoPE at each slot's position from the caller's cos/sin rows.

Weighted search only; attention.retrieve takes the composed path for everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from infinitekv import search
from infinitekv.codec import decode_record
from infinitekv.threads import numba_threads_for


@dataclass(frozen=True)
class TokenPicks:
    """What one decode step takes from one layer's cold tier: the tail's `shortlist` best by signature (tokens from
    clustered.covered on, when the two-level index offers candidates), the `keep` best of those by the rerank, the
    `near` of them that sit last; `cos`, `sin` float32 [keep, D]: RoPE at each slot's position."""

    shortlist: int
    keep: int
    near: int
    cos: np.ndarray
    sin: np.ndarray
    clustered: search.ClusterCandidates | None = None


def retrieve_token(archive, layer: int, turned: np.ndarray, rotated: np.ndarray, picks: TokenPicks):
    """turned: the step's selection queries [H, G, D] float32 (pre-RoPE, turned to the cold distance); rotated:
    the same in the signatures' basis (turned R^T, as select_cold_blocks computes it). Returns (ids int64 [H, r],
    keys float32 [H, r, D] RoPE'd at their slots, values float32 [H, r, D]), in slot order, r = min(keep, the
    shortlist's length)."""
    clustered = picks.clustered
    start = clustered.covered if clustered is not None else 0
    sigs, weights = archive.signatures(layer), archive.key_weights(layer)
    n_heads, group, head_dim = rotated.shape
    # search._check's checks, for a step's shapes, without its copies (a decode step makes one of these per layer)
    if (sigs.dtype != np.uint8 or sigs.ndim != 3 or sigs.shape[1:] != (n_heads, head_dim // 8) or head_dim % 8
            or weights.shape != sigs.shape[:2] or weights.dtype not in (np.float16, np.float32)
            or turned.shape != rotated.shape):
        raise ValueError(f"queries [H, G, D] {rotated.shape} do not fit signatures {sigs.shape} {sigs.dtype} and "
                         f"weights {weights.shape} {weights.dtype}")
    if not np.isfinite(rotated).all():
        raise ValueError("queries must be finite")
    n_tail = max(0, min(picks.shortlist, len(sigs) - start))
    probed, n_probe = search.probed_candidates(clustered, 1, n_heads)
    keep = min(picks.keep, n_tail + n_probe)
    near = min(picks.near, keep)
    ids = np.empty((n_heads, keep), np.int64)
    keys = np.empty((n_heads, keep, head_dim), np.float32)
    values = np.empty((n_heads, keep, head_dim), np.float32)
    if keep == 0:
        return ids, keys, values
    basis = (np.ascontiguousarray(archive.rotation, np.float32),
             np.ascontiguousarray(archive.key_mean(layer), np.float32))
    tables = (np.ascontiguousarray(picks.cos[:keep], np.float32), np.ascontiguousarray(picks.sin[:keep], np.float32))
    queries = (np.ascontiguousarray(rotated, np.float32), np.ascontiguousarray(turned, np.float32))
    sizes = (start, n_tail, n_probe, near)
    # the same count of work as search_and_rerank's decode call, so both take the pool or the calling thread alike
    with numba_threads_for(n_heads * (len(sigs) - start + probed.shape[2]) + n_heads * (n_tail + n_probe) * group
                           * head_dim):
        _retrieve_token(sigs, search.kernel_weights(weights, "weighted"), probed, archive.records(layer), queries,
                        basis, tables, sizes, (ids, keys, values))
    return ids, keys, values


@nb.njit(cache=True)
def _weighted_luts(rotated, luts):
    # luts [H, B * 256] int32: search.score_luts(rotated.sum(axis=1), "weighted") -- the group summed in the
    # order numpy sums it, quantised in float64 as quantise_queries does, each byte's signed sum exact in float64
    n_heads, group, d = rotated.shape
    q = np.empty(d, np.float32)
    qi = np.empty(d, np.float64)
    for h in range(n_heads):
        for e in range(d):
            acc = rotated[h, 0, e]
            for g in range(1, group):
                acc = acc + rotated[h, g, e]
            q[e] = acc
        peak = 0.0
        for e in range(d):
            peak = max(peak, abs(np.float64(q[e])))
        step = 2.0 ** search.QUERY_BITS / peak if peak > 0 else 0.0
        for e in range(d):
            qi[e] = np.rint(np.float64(q[e]) * step)
        for b in range(d // 8):
            for byte in range(256):
                total = 0.0
                for j in range(8):
                    total += -qi[8 * b + j] if (byte >> j) & 1 else qi[8 * b + j]
                luts[h, 256 * b + byte] = np.int32(total)


@nb.njit(parallel=True, cache=True)
def _retrieve_token(sigs, weights, probed, records, queries, basis, tables, sizes, out):
    rotated, turned = queries
    rotation, key_mean = basis
    cos, sin = tables
    start, n_tail, n_probe, near = sizes
    ids, keys, values = out
    n_heads, keep, d = keys.shape
    group = rotated.shape[1]
    luts = np.empty((n_heads, d // 8 * 256), np.int32)
    _weighted_luts(rotated, luts)
    for h in nb.prange(n_heads):
        picked_ids = search.pick_of((sigs, weights, (luts, luts), probed), (start, n_tail, n_probe, True), records,
                                    rotated[h : h + 1], (0, 1), (0, h), keep)
        rotated_keys = np.empty((keep, d), np.float32)
        picked_v = np.empty((keep, d), np.float32)
        for j in range(keep):
            decode_record(records[picked_ids[j], h], rotated_keys[j], picked_v[j])
        picked = np.zeros((keep, d), np.float32)  # x R + mu, in token order: R row by row, so the inner loop runs
        for j in range(keep):                     # along contiguous memory in vector registers
            for f in range(d):
                x = rotated_keys[j, f]
                for e in range(d):
                    picked[j, e] += x * rotation[f, e]
            for e in range(d):
                picked[j, e] += key_mean[h, e]
        slot_of = _slot_order(picked, turned[h], near)
        half = d // 2
        for j in range(keep):
            slot = slot_of[j]
            ids[h, slot] = picked_ids[j]
            for e in range(d):
                turned_half = -picked[j, e + half] if e < half else picked[j, e - half]
                keys[h, slot, e] = picked[j, e] * cos[slot, e] + turned_half * sin[slot, e]
                values[h, slot, e] = picked_v[j, e]


@nb.njit(inline="always")
def _slot_order(picked, turned, near):
    # slot of each pick (picks in token order): the far ones first in token order, then the `near` best by the max
    # over the group's queries of q . k (ties to the later token, as near_last breaks them), in token order
    keep, d = picked.shape
    score = np.empty(keep, np.float32)
    for j in range(keep):
        best = -np.inf
        for g in range(turned.shape[0]):
            dot = np.float32(0.0)
            for e in range(d):
                dot += turned[g, e] * picked[j, e]
            best = max(best, dot)
        score[j] = best
    is_near = np.zeros(keep, np.bool_)
    for _ in range(near):
        top = -1
        for j in range(keep):
            if not is_near[j] and (top < 0 or score[j] >= score[top]):
                top = j
        is_near[top] = True
    slot_of = np.empty(keep, np.int64)
    far_slot, near_slot = 0, keep - near
    for j in range(keep):
        if is_near[j]:
            slot_of[j] = near_slot
            near_slot += 1
        else:
            slot_of[j] = far_slot
            far_slot += 1
    return slot_of
