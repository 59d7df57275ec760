"""The two-level index: clusters cover what they claim, the best cluster's members reach the rerank, the selection
equals the flat one when the budget covers everything, and rolled-back records never leave stale clusters behind."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from infinitekv import codec
from infinitekv import index as two_level
from infinitekv.archive import Archive, Layout
from infinitekv.attention import ColdTier, RetrievalConfig, Rope, select_blocks, select_cold_blocks

HEAD_DIM, N_HEADS = 16, 2


def keys_around_centres(n, rng, n_centres=40):
    """Keys near a few centres, each centre used in runs of consecutive tokens (as topics run through text)."""
    centres = rng.standard_normal((n_centres, N_HEADS, HEAD_DIM)).astype(np.float32) * 2
    runs = np.repeat(rng.integers(0, n_centres, n // 16 + 1), 16)[:n]
    return (centres[runs] + 0.3 * rng.standard_normal((n, N_HEADS, HEAD_DIM))).astype(np.float32)


def ram_archive(keys):
    n = len(keys)
    layout = Layout(n_layers=1, n_kv_heads=N_HEADS, head_dim=HEAD_DIM, record_bytes=codec.record_bytes(HEAD_DIM))
    archive = Archive.create(None, layout, "index-test", mode="ram", rotation=np.eye(HEAD_DIM, dtype=np.float32))
    archive.set_key_mean(0, np.zeros((N_HEADS, HEAD_DIM), np.float32))
    append(archive, keys)
    return archive


def append(archive, keys):
    n = len(keys)
    records = codec.encode_records(keys.reshape(n * N_HEADS, HEAD_DIM), np.zeros((n * N_HEADS, HEAD_DIM), np.float32))
    archive.append(0, records.reshape(n, N_HEADS, -1))


def test_each_segment_lists_every_token_once_grouped_by_cluster():
    rng = np.random.default_rng(0)
    archive = ram_archive(keys_around_centres(1000, rng))
    index = two_level.ClusterIndex(segment=256, cluster_tokens=32)
    index.sync(archive, 0)
    assert index.covered == 768 and len(index.segments) == 3  # the last 232 tokens are the flat tail
    for number, seg in enumerate(index.segments):
        for h in range(N_HEADS):
            assert sorted(seg.members[h]) == list(range(256 * number, 256 * (number + 1)))
            assert seg.starts[h, 0] == 0 and seg.starts[h, -1] == 256 and np.all(np.diff(seg.starts[h]) >= 0)
            # every member is nearest to its own cluster's centroid
            x = codec.decode_keys_rotated(np.asarray(archive.records(0))[seg.members[h], h], HEAD_DIM)
            cluster = np.repeat(np.arange(seg.starts.shape[1] - 1), np.diff(seg.starts[h]))
            distance = ((x[:, None, :] - seg.centroids[h][None]) ** 2).sum(-1)
            np.testing.assert_array_equal(distance.argmin(axis=1), cluster)


def test_clustering_is_deterministic_and_independent_of_how_tokens_were_appended():
    rng = np.random.default_rng(1)
    keys = keys_around_centres(600, rng)
    whole = ram_archive(keys)
    pieces = ram_archive(keys[:7])
    for lo, hi in [(7, 300), (300, 301), (301, 600)]:
        append(pieces, keys[lo:hi])
    a, b = two_level.ClusterIndex(segment=256), two_level.ClusterIndex(segment=256)
    a.sync(whole, 0)
    for lo in range(0, 600, 100):  # synced as the archive grows, on another archive
        b.sync(pieces, 0)
    for x, y in zip(a.segments, b.segments):
        np.testing.assert_array_equal(x.members, y.members)
        np.testing.assert_array_equal(x.centroids, y.centroids)


def test_candidates_are_the_best_clusters_members_best_first_cut_to_the_budget():
    rng = np.random.default_rng(2)
    archive = ram_archive(keys_around_centres(512, rng))
    index = two_level.ClusterIndex(segment=512, cluster_tokens=32)
    index.sync(archive, 0)
    seg = index.segments[0]
    queries = rng.standard_normal((3, N_HEADS, 2, HEAD_DIM)).astype(np.float32)  # [Q, H, G, D]
    got = index.candidates(queries, 100)
    assert got.shape == (3, N_HEADS, 100)
    for q in range(3):
        for h in range(N_HEADS):
            score = (queries[q, h] @ seg.centroids[h].T).max(axis=0)  # a cluster's best over the group's heads
            want = []
            for c in np.argsort(-score, kind="stable"):
                want += list(seg.members[h, seg.starts[h, c] : seg.starts[h, c + 1]])
            np.testing.assert_array_equal(got[q, h], np.sort(want[:100]))
    assert index.candidates(queries, 10_000).shape[-1] == 512  # never more than it covers


def test_candidates_break_equal_cluster_scores_to_the_lower_cluster_and_go_past_their_first_guess():
    # hand-made segments: every centroid repeated (equal scores) and random cluster sizes, small ones among them,
    # so a budget can need more clusters than budget / cluster_tokens guesses; the reference is a stable argsort per row
    rng = np.random.default_rng(7)
    index = two_level.ClusterIndex(segment=2048, cluster_tokens=1024)  # guesses 16 clusters; ~51 tokens each here
    for first in (0, 2048):
        cuts = np.stack([np.sort(rng.choice(np.arange(1, 2048), 39, replace=False)) for _ in range(N_HEADS)])
        sizes = np.diff(cuts, axis=1, prepend=0, append=2048)  # 40 clusters per head holding the whole segment
        base = rng.standard_normal((N_HEADS, 20, HEAD_DIM)).astype(np.float32)
        centroids = np.concatenate([base, base], axis=1)  # cluster c and c + 20 score the same
        members = np.stack([first + rng.permutation(2048) for _ in range(N_HEADS)])
        starts = np.concatenate([np.zeros((N_HEADS, 1), np.int64), np.cumsum(sizes, axis=1)], axis=1)
        for h in range(N_HEADS):
            for c in range(40):
                members[h, starts[h, c] : starts[h, c + 1]].sort()
        index.segments.append(two_level.Segment(centroids, members, starts))
    queries = rng.standard_normal((2, N_HEADS, 3, HEAD_DIM)).astype(np.float32)
    queries[1] = 0  # every cluster scores 0: cluster order alone decides
    for budget in (1, 200, 1500, 4096):
        got = index.candidates(queries, budget)
        for q in range(2):
            for h in range(N_HEADS):
                want = []
                score = np.concatenate([(queries[q, h] @ seg.centroids[h].T).max(axis=0) for seg in index.segments])
                cluster_members = [seg.members[h, seg.starts[h, c] : seg.starts[h, c + 1]]
                                   for seg in index.segments for c in range(40)]
                for c in np.argsort(-score, kind="stable"):
                    want += list(cluster_members[c])
                np.testing.assert_array_equal(got[q, h], np.sort(want[:budget]))


def _selection(archive, clusters, queries, shortlist, retrieved=8):
    config = RetrievalConfig(shortlist=shortlist, select_block=2)
    return select_cold_blocks(archive, 0, queries, select_blocks(queries.shape[1], 2), config, retrieved, clusters)


def test_with_a_budget_covering_every_token_the_two_level_selection_is_the_flat_one():
    rng = np.random.default_rng(3)
    archive = ram_archive(keys_around_centres(900, rng))
    index = two_level.ClusterIndex(segment=256, cluster_tokens=32)
    index.sync(archive, 0)
    queries = rng.standard_normal((N_HEADS, 5, 2, HEAD_DIM)).astype(np.float32)  # [Hk, C, G, D]
    flat = _selection(archive, None, queries, shortlist=900)
    np.testing.assert_array_equal(_selection(archive, index, queries, shortlist=900), flat)


@pytest.mark.parametrize("mode", ["weighted", "hamming"])
def test_the_two_level_selection_in_one_numba_call_picks_what_the_composed_calls_pick(mode):
    # the engine's CPU path (search.search_and_rerank with the clusters' candidates) against the same step composed
    # from the numpy scan, score_ids, the rerank and the selects (what the other backends run)
    rng = np.random.default_rng(8)
    archive = ram_archive(keys_around_centres(1500, rng))
    index = two_level.ClusterIndex(segment=512, cluster_tokens=32)
    index.sync(archive, 0)
    assert index.covered == 1024
    queries = rng.standard_normal((N_HEADS, 7, 2, HEAD_DIM)).astype(np.float32)
    blocks = select_blocks(7, 2)
    picks = {}
    for backend in ("numba", "numpy"):
        config = RetrievalConfig(shortlist=200, select_block=2, search_backend=backend, search_mode=mode)
        picks[backend] = select_cold_blocks(archive, 0, queries, blocks, config, 16, index)
    assert picks["numba"].shape == (N_HEADS, len(blocks), 16)
    np.testing.assert_array_equal(picks["numba"], picks["numpy"])


def test_the_token_a_query_matches_best_is_found_through_its_cluster():
    """Two-level recall where it matters: a key planted far from every other key, matched exactly by the query, is
    retrieved although the clusters hold 30x more tokens than the shortlist takes."""
    rng = np.random.default_rng(4)
    keys = keys_around_centres(4096, rng)
    needle = rng.standard_normal((N_HEADS, HEAD_DIM)).astype(np.float32)
    needle *= 20 / np.linalg.norm(needle, axis=-1, keepdims=True)  # its own best match by far
    for at in (5, 1234, 3000):
        keys[at : at + 3] = needle
    archive = ram_archive(keys)
    index = two_level.ClusterIndex(segment=4096, cluster_tokens=64)
    index.sync(archive, 0)
    queries = np.broadcast_to(needle[:, None, None, :], (N_HEADS, 1, 1, HEAD_DIM)).copy()
    picked = _selection(archive, index, queries, shortlist=128, retrieved=9)
    for h in range(N_HEADS):
        assert {5, 6, 7, 1234, 1235, 1236, 3000, 3001, 3002} == set(picked[h, 0].tolist())


def test_a_rollback_rebuilds_the_clusters_of_records_that_were_replaced():
    rng = np.random.default_rng(5)
    first = keys_around_centres(300, rng)
    archive = ram_archive(first[:100])
    archive.commit({}, {})
    append(archive, first[100:])
    index = two_level.ClusterIndex(segment=128, cluster_tokens=16)
    index.sync(archive, 0)
    assert len(index.segments) == 2
    archive.rollback()  # tokens 100.. are gone; another branch writes different ones
    other = keys_around_centres(200, np.random.default_rng(6))
    append(archive, other)
    index.sync(archive, 0)
    fresh = two_level.ClusterIndex(segment=128, cluster_tokens=16)
    fresh.sync(archive, 0)
    assert len(index.segments) == len(fresh.segments) == 2
    for x, y in zip(index.segments, fresh.segments):
        np.testing.assert_array_equal(x.members, y.members)
        np.testing.assert_array_equal(x.centroids, y.centroids)


@pytest.mark.parametrize("segment, n_cold, used", [(0, 5000, False), (4096, 4000, False), (4096, 5000, True)])
def test_the_cold_tier_goes_two_level_once_a_segment_is_complete(segment, n_cold, used):
    archive = ram_archive(keys_around_centres(n_cold, np.random.default_rng(7)))
    rope = Rope(SimpleNamespace(inv_freq=torch.ones(HEAD_DIM // 2)), torch.float32, "cpu")
    cold = ColdTier(archive, RetrievalConfig(cluster_segment=segment), rope=rope, counters={})
    index = cold.cluster_index(0)
    assert (index is not None) == used
    if used:
        assert index.covered == 4096


def test_an_index_of_decoded_keys_equals_the_one_synced_from_their_records():
    rng = np.random.default_rng(8)
    archive = ram_archive(keys_around_centres(700, rng))
    synced = two_level.ClusterIndex(segment=256, cluster_tokens=32)
    synced.sync(archive, 0)
    decoded = codec.decode_keys_rotated(np.asarray(archive.records(0)), HEAD_DIM)
    built = two_level.ClusterIndex.from_keys(decoded, segment=256, cluster_tokens=32)
    assert built.covered == synced.covered == 512
    for x, y in zip(built.segments, synced.segments):
        np.testing.assert_array_equal(x.members, y.members)
        np.testing.assert_array_equal(x.centroids, y.centroids)
