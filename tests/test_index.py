"""The two-level index: exact scores for the tokens it scans, the flat answer when it scans every block."""

from __future__ import annotations

import numpy as np
import pytest

from infinitekv import index as two_level
from infinitekv.search import search_many


def archive(n, n_heads=3, n_bytes=8, seed=0):
    rng = np.random.default_rng(seed)
    sigs = rng.integers(0, 256, (n, n_heads, n_bytes), dtype=np.uint8)
    weights = rng.random((n, n_heads), dtype=np.float32).astype(np.float16)
    source = rng.integers(0, n // 20, n)  # repeated records: ties to break by token index
    return sigs[source].copy(), weights[source].copy()


def spilled_index(sigs, weights, sizes, **kw):
    index = two_level.BlockIndex(sigs.shape[1], sigs.shape[2], **kw)
    lo = 0
    for size in sizes:  # spills of uneven sizes: blocks straddle calls
        index.extend(sigs[lo : lo + size], weights[lo : lo + size])
        lo += size
    return index


@pytest.mark.parametrize("n_bytes", [8, 5])
def test_scanning_every_block_equals_the_flat_search_bit_for_bit(n_bytes):
    sigs, weights = archive(3000, n_bytes=n_bytes)
    index = spilled_index(sigs, weights, [100, 777, 2000, 123], blocks_per_query=10**6)
    queries = np.random.default_rng(1).standard_normal((4, 3, 8 * n_bytes)).astype(np.float32)
    got = index.search_many(sigs, weights, queries, 150)
    want = search_many(sigs, weights, queries, 150, backend="numpy")
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0].view(np.uint32), want[0].view(np.uint32))


def test_summaries_do_not_depend_on_how_tokens_were_spilled():
    sigs, weights = archive(1000)
    one = spilled_index(sigs, weights, [1000])
    many = spilled_index(sigs, weights, [1, 63, 64, 500, 372])
    assert one.n_blocks == many.n_blocks == 1000 // two_level.BLOCK and one.n_tokens == many.n_tokens == 1000
    np.testing.assert_allclose(one.sums[:, : one.n_blocks], many.sums[:, : many.n_blocks], rtol=1e-5, atol=1e-4)


def test_chosen_blocks_and_tail_are_scored_exactly_and_the_best_block_wins():
    sigs, weights = archive(4000, seed=2)
    q = np.random.default_rng(3).standard_normal((1, 3, 64)).astype(np.float32)
    bits = np.packbits(q[0] < 0, axis=-1, bitorder="little")  # the signature that scores highest for q
    sigs[1280:1344] = bits  # one whole block (20) of perfect matches
    weights[1280:1344] = 1.0
    index = spilled_index(sigs, weights, [4000], blocks_per_query=3)
    scores, ids = index.search_many(sigs, weights, q, 64)
    np.testing.assert_array_equal(ids[0], np.tile(np.arange(1280, 1344), (3, 1)))
    flat_scores, _ = search_many(sigs, weights, q, 64, backend="numpy")
    np.testing.assert_array_equal(scores.view(np.uint32), flat_scores.view(np.uint32))
    tail = index.search_many(sigs, weights, q, 10_000)[1][0]
    assert set(range(3968, 4000)) <= set(tail[0])  # rows after the last whole block are always scanned
    assert tail.shape[-1] == 3 * two_level.BLOCK + 32


def test_two_level_switches_on_at_the_crossover():
    assert not two_level.use_two_level(two_level.TWO_LEVEL_FROM - 1)
    assert two_level.use_two_level(two_level.TWO_LEVEL_FROM)


def test_index_refuses_signatures_shorter_than_what_it_summarised():
    sigs, weights = archive(200)
    index = spilled_index(sigs, weights, [200])
    with pytest.raises(ValueError, match="cover"):
        index.search_many(sigs[:100], weights[:100], np.zeros((1, 3, 64), np.float32), 5)
