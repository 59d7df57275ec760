"""Two-level signature index for long contexts: score block summaries first, then only the best blocks' tokens.

A flat scan (search.search_many) reads every cold signature every step, so its cost grows with the context. Here the
cold tokens are grouped in blocks of BLOCK consecutive tokens, and each block keeps, per kv-head, the weighted sum of
its tokens' key signs, sum_t w_t * s_t (s = 1 - 2*bit, w the key weight). A query's dot product with that sum is the
sum of the block's weighted scores, so one small matmul ranks the blocks; the tokens of the best `blocks` blocks per
query row, plus the tokens after the last whole block, are then scored exactly as search.py scores them (same
integers, same float32 product) and the top k kept, equal scores to the lower token index. The result is the flat
scan's answer restricted to the chosen blocks: scores are bit for bit the flat scan's, recall of the flat top-k
depends on how clustered the keys are (`ikv bench scan` measures it).

Use (one BlockIndex per layer, fed the same rows the archive holds):

    index = BlockIndex(n_heads, n_bytes)
    index.extend(new_signatures, new_weights)   # uint8 [n, H, B] and float16/float32 [n, H], as tokens spill
    if use_two_level(len(signatures)):          # past the crossover (TWO_LEVEL_FROM cold tokens)
        scores, ids = index.search_many(signatures, weights, queries, k)   # like search.search_many, [Q, H, k]
    else:
        scores, ids = search.search_many(signatures, weights, queries, k)

`signatures` / `weights` are the archive's whole arrays (archive.signatures(layer), archive.key_weights(layer)),
whose first `index.n_tokens` rows must be the rows given to extend, in order; extend is incremental (only new rows
are summarised), so call it with each spill's rows, or with archive rows [index.n_tokens:] before searching.
Weighted mode only; no exclude_before (every cold row is a candidate).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from infinitekv import search

BLOCK = 64  # tokens per summary: one summary row costs D float32s against 64 signatures of B bytes
BLOCKS_PER_QUERY = 128  # blocks whose tokens are scored exactly per query row: 8192 tokens
TWO_LEVEL_FROM = 1 << 17  # cold tokens from which the two-level search replaces the flat scan (see use_two_level)
_SIGNS = (1 - 2 * ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1)).astype(np.float32)  # [256, 8]


def use_two_level(n_cold: int) -> bool:
    """Whether a layer with n_cold cold tokens should search with BlockIndex rather than the flat scan.

    The flat scan is exact and, below this size, costs about what the two-level search does (its per-step time is
    measured by `ikv bench scan`); past it the flat scan's cost keeps growing with the context while the
    two-level search reads one summary per BLOCK tokens plus a fixed number of blocks.
    """
    return n_cold >= TWO_LEVEL_FROM


class BlockIndex:
    """Per-head block summaries of one layer's cold signatures, appended to as tokens spill (see module docstring)."""

    def __init__(self, n_heads: int, n_bytes: int, *, block: int = BLOCK, blocks_per_query: int = BLOCKS_PER_QUERY):
        self.n_heads, self.n_bytes, self.block, self.blocks_per_query = n_heads, n_bytes, block, blocks_per_query
        self.sums = np.zeros((n_heads, 16, 8 * n_bytes), np.float32)  # [H, capacity blocks, D], head-major
        self.n_blocks = 0
        self.n_tokens = 0  # rows summarised so far, n_blocks * block of them in whole blocks
        self._partial = np.zeros((n_heads, 8 * n_bytes), np.float32)  # running sum of the unfinished block

    def extend(self, signatures, weights) -> None:
        """Append rows: signatures uint8 [n, H, B], weights float16 or float32 [n, H] (finite)."""
        sigs = np.asarray(signatures)
        if sigs.dtype != np.uint8 or sigs.shape[1:] != (self.n_heads, self.n_bytes):
            raise ValueError(f"signatures must be uint8 [n, {self.n_heads}, {self.n_bytes}], got {sigs.dtype} "
                             f"{sigs.shape}")
        w = np.asarray(weights, dtype=np.float32)
        if w.shape != sigs.shape[:2]:
            raise ValueError(f"weights must be [{len(sigs)}, {self.n_heads}], got {w.shape}")
        signed = _SIGNS[sigs].reshape(len(sigs), self.n_heads, -1) * w[:, :, None]  # [n, H, D]: w_t * s_t
        done = 0
        while done < len(sigs):
            fill = self.n_tokens % self.block
            take = min(self.block - fill, len(sigs) - done)
            self._partial += signed[done : done + take].sum(axis=0)
            done += take
            self.n_tokens += take
            if self.n_tokens % self.block == 0:
                self._append_block()

    def _append_block(self) -> None:
        if self.n_blocks == self.sums.shape[1]:  # doubling: appends stay amortised O(1)
            grown = np.zeros((self.n_heads, 2 * self.n_blocks, self.sums.shape[2]), np.float32)
            grown[:, : self.n_blocks] = self.sums[:, : self.n_blocks]
            self.sums = grown
        self.sums[:, self.n_blocks] = self._partial
        self.n_blocks += 1
        self._partial[:] = 0

    def search_many(self, signatures, weights, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 [Q, H, D] -> (scores float32, ids int64) [Q, H, k'], best first, ties to the lower id.

        k' = min(k, tokens scored). Scores are the weighted scores of search.py, bit for bit; the tokens are those
        of the best blocks_per_query blocks of each query row plus every row after the last whole block.
        """
        sigs = np.ascontiguousarray(signatures)
        n = len(sigs)
        if n < self.n_tokens or sigs.shape[1:] != (self.n_heads, self.n_bytes):
            raise ValueError(f"signatures {sigs.shape} do not cover the {self.n_tokens} rows this index holds")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n_queries = queries.shape[0]
        rows = queries.reshape(-1, queries.shape[-1])  # [G, D], row g for head g % H
        kept = min(self.blocks_per_query, self.n_blocks)
        chosen = np.empty((len(rows), kept), np.int64)
        for h in range(self.n_heads):
            block_scores = rows[h :: self.n_heads] @ self.sums[h, : self.n_blocks].T  # [Q, n_blocks]
            best = np.argpartition(-block_scores, kept - 1, axis=1)[:, :kept] if kept < self.n_blocks else \
                np.broadcast_to(np.arange(kept), (n_queries, kept))
            chosen[h :: self.n_heads] = np.sort(best, axis=1)  # token order, so position ties are index ties
        tail = np.arange(self.n_blocks * self.block, n, dtype=np.int64)
        ids = np.concatenate([(chosen[:, :, None] * self.block + np.arange(self.block)).reshape(len(rows), -1),
                              np.broadcast_to(tail, (len(rows), len(tail)))], axis=1)  # [G, M], ascending
        w = np.asarray(weights)
        w = w.view(np.uint16) if w.dtype == np.float16 else np.ascontiguousarray(w, dtype=np.float32)
        luts = search.score_luts(rows, "weighted").reshape(len(rows), -1)
        scores = np.empty(ids.shape, np.float32)
        _score_ids(sigs, w, luts, ids, scores)
        best_scores, where = search.top_k_rows(scores, k)
        best_ids = np.take_along_axis(ids, where, axis=1)
        return (best_scores.reshape(n_queries, self.n_heads, -1), best_ids.reshape(n_queries, self.n_heads, -1))


@nb.njit(parallel=True, cache=True)
def _score_ids(sigs, weights, luts, ids, out):
    # out[g, j] = the weighted score of token ids[g, j] for query row g (head g % H), as search.py defines it
    n_heads, n_bytes = sigs.shape[1], sigs.shape[2]
    for g in nb.prange(ids.shape[0]):
        h = g % n_heads
        lut = luts[g]
        for j in range(ids.shape[1]):
            i = ids[g, j]
            acc = 0
            for b in range(n_bytes):
                acc += lut[256 * b + np.intp(sigs[i, h, b])]
            out[g, j] = search._weight_as_float32(weights[i, h]) * np.float32(acc) + np.float32(0.0)
