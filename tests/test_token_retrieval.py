"""A decode step's retrieval in one numba call against the calls it replaces: the same tokens, ties included, and
the same keys and values up to float rounding, in the same slots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infinitekv import codec, search, threads, token_retrieval
from infinitekv.attention import apply_rope, near_last, select_cold_blocks
from infinitekv.coverage import ColdRecords


class _Archive(ColdRecords):
    """Cold records written with a random R and mu, as the engine writes them."""

    def __init__(self, rng, n: int, n_heads: int, d: int, duplicates: bool):
        rotation = codec.rotation_matrix(d, seed=int(rng.integers(1 << 30)))
        self.mean = rng.standard_normal((n_heads, d)).astype(np.float32)
        keys = rng.standard_normal((n, n_heads, d)).astype(np.float32)
        if duplicates:  # equal keys tie in the scan and in the rerank
            keys = keys[rng.integers(0, 60, n)]
        values = rng.standard_normal((n, n_heads, d)).astype(np.float32)
        records = codec.encode_records(((keys - self.mean) @ rotation.T).reshape(-1, d), values.reshape(-1, d))
        super().__init__(records.reshape(n, n_heads, codec.record_bytes(d)), d, rotation)

    def key_mean(self, layer):
        return self.mean


def _composed(archive, turned, shortlist, keep, near, tables, clustered=None):
    """The step as attention.retrieve composes it for a block of queries: select_cold_blocks' ids (through
    search.search_and_rerank), decode_cold's keys and values, near_last's slot order, apply_rope at the slots."""
    from infinitekv.attention import RetrievalConfig, decode_cold

    rotated = turned[:, None] @ archive.rotation.T  # [H, 1, G, D]
    if clustered is None:
        ids = select_cold_blocks(archive, 0, turned[:, None], [(0, 1)], RetrievalConfig(shortlist=shortlist), keep)
    else:
        block_queries = rotated.sum(axis=2).mean(axis=1)[None]
        ids = search.search_and_rerank(archive.signatures(0), archive.key_weights(0), archive.records(0),
                                       block_queries, rotated, np.array([0, 1]), shortlist, keep, "weighted",
                                       clustered)
    keys, values = (torch.from_numpy(a) for a in decode_cold(archive, 0, ids))  # [H, 1, r, D]
    order = near_last(torch.from_numpy(turned[:, None]), keys, [(0, 1)], near)[..., None] if near else None
    if order is not None:
        keys, values = keys.gather(2, order.expand_as(keys)), values.gather(2, order.expand_as(values))
    ids = torch.from_numpy(ids)
    if order is not None:
        ids = ids.gather(2, order[..., 0])
    cos, sin = (torch.from_numpy(t) for t in tables)
    return ids[:, 0].numpy(), apply_rope(keys[:, 0], cos[: keys.shape[2]], sin[: keys.shape[2]]), values[:, 0]


def _tables(rng, keep, d):
    angles = rng.uniform(0, 2 * np.pi, (keep, d // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("near", [0, 3])
@pytest.mark.parametrize("shortlist, keep", [(256, 32), (40, 64), (5000, 16)])
def test_one_call_picks_the_composed_steps_tokens_and_their_keys_in_their_slots(duplicates, near, shortlist, keep):
    rng = np.random.default_rng(7 + duplicates + near + keep)
    n, n_heads, group, d = 3000, 3, 3, 64
    archive = _Archive(rng, n, n_heads, d, duplicates)
    turned = rng.standard_normal((n_heads, group, d)).astype(np.float32)
    tables = _tables(rng, keep, d)
    picks = token_retrieval.TokenPicks(shortlist, keep, near, *tables)
    ids, keys, values = token_retrieval.retrieve_token(archive, 0, turned, turned @ archive.rotation.T, picks)
    want_ids, want_k, want_v = _composed(archive, turned, shortlist, keep, near, tables)
    assert ids.shape == want_ids.shape == (n_heads, min(keep, shortlist))
    np.testing.assert_array_equal(ids, want_ids)
    torch.testing.assert_close(torch.from_numpy(keys), want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(values), want_v, rtol=0, atol=0)
    if near:  # the near slots hold the best by q . k, each part in token order
        assert all((np.diff(ids[h, : -near]) > 0).all() and (np.diff(ids[h, -near:]) > 0).all()
                   for h in range(n_heads))


def test_one_call_with_the_two_level_index_picks_what_the_composed_call_picks():
    rng = np.random.default_rng(11)
    n, n_heads, group, d = 3000, 3, 3, 64
    archive = _Archive(rng, n, n_heads, d, duplicates=True)
    turned = rng.standard_normal((n_heads, group, d)).astype(np.float32)
    tables = _tables(rng, 16, d)
    for covered, n_members, tail_k, cluster_k in ((1800, 300, 120, 100), (2048, 40, 900, 64), (3000, 500, 0, 200)):
        members = np.stack([np.sort(rng.choice(covered, n_members, replace=False)) for _ in range(n_heads)])[None]
        clustered = search.ClusterCandidates(members, covered, cluster_k)
        picks = token_retrieval.TokenPicks(tail_k, 16, 2, *tables, clustered)
        ids, keys, _ = token_retrieval.retrieve_token(archive, 0, turned, turned @ archive.rotation.T, picks)
        want_ids, want_k, _ = _composed(archive, turned, tail_k, 16, 2, tables, clustered)
        np.testing.assert_array_equal(ids, want_ids)
        torch.testing.assert_close(torch.from_numpy(keys), want_k, rtol=1e-5, atol=1e-5)


def test_one_call_gives_the_same_on_one_thread_and_on_the_pool(monkeypatch):
    rng = np.random.default_rng(3)
    archive = _Archive(rng, 2000, 3, 64, duplicates=False)
    turned = rng.standard_normal((3, 3, 64)).astype(np.float32)
    picks = token_retrieval.TokenPicks(128, 16, 2, *_tables(rng, 16, 64))
    rotated = turned @ archive.rotation.T
    monkeypatch.setattr(threads, "SERIAL_CELLS", 1 << 40)
    serial = token_retrieval.retrieve_token(archive, 0, turned, rotated, picks)
    monkeypatch.setattr(threads, "SERIAL_CELLS", 0)
    parallel = token_retrieval.retrieve_token(archive, 0, turned, rotated, picks)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def test_an_empty_cold_tier_and_bad_queries_are_handled():
    rng = np.random.default_rng(5)
    archive = _Archive(rng, 0, 2, 64, duplicates=False)
    turned = rng.standard_normal((2, 3, 64)).astype(np.float32)
    picks = token_retrieval.TokenPicks(64, 8, 1, *_tables(rng, 8, 64))
    ids, keys, values = token_retrieval.retrieve_token(archive, 0, turned, turned @ archive.rotation.T, picks)
    assert ids.shape == (2, 0) and keys.shape == values.shape == (2, 0, 64)
    archive = _Archive(rng, 100, 2, 64, duplicates=False)
    turned[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        token_retrieval.retrieve_token(archive, 0, turned, turned @ archive.rotation.T, picks)
