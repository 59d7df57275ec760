"""Retrieval attention's pieces on small shapes: block selection, the merged softmax, the RoPE tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infinitekv import codec
from torch.nn.attention.bias import causal_lower_right

from infinitekv.attention import (ColdTier, LayerMemory, RetrievalConfig, Rope, apply_rope, attend_with_retrieved,
                                  attention_with_lse, decode_cold, exact_attention, merge_attention, retrieve,
                                  select_blocks, select_cold, select_cold_blocks, selection_queries, sliding_mask)
from infinitekv.coverage import ColdRecords


def _two_queries_wanting_different_tokens(select_block: int) -> np.ndarray:
    """Token 17 points along axis 0 (a strong match for query 0), token 150 along axis 1 (a weaker match for query
    1); each query wants its own; one token is retrieved."""
    d, n = 64, 200
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((n, 1, d)).astype(np.float32) * 0.1
    keys[17, 0, :] = 0
    keys[17, 0, 0] = 3.0
    keys[150, 0, :] = 0
    keys[150, 0, 1] = 2.0
    records = codec.encode_records(keys.reshape(n, d), np.zeros((n, d), np.float32)).reshape(n, 1, -1)
    queries = np.zeros((1, 2, 1, d), np.float32)  # [Hk, C, G, D]
    queries[0, 0, 0, 0] = 1.0
    queries[0, 1, 0, 1] = 1.0
    config = RetrievalConfig(shortlist=n, select_block=select_block)
    return select_cold(ColdRecords(records, d, np.eye(d, dtype=np.float32)), 0, queries,
                       select_blocks(2, select_block), config, 1)


def test_the_queries_of_a_block_share_the_blocks_best_cold_tokens():
    """One block: both queries get the token with the highest score over the block's queries (the max)."""
    ids = _two_queries_wanting_different_tokens(select_block=2)
    assert ids.shape == (1, 2, 1)
    assert ids[0, 0, 0] == 17 and ids[0, 1, 0] == 17


def test_a_block_of_one_query_gets_its_own_best_cold_tokens():
    ids = _two_queries_wanting_different_tokens(select_block=1)
    assert ids[0, 0, 0] == 17 and ids[0, 1, 0] == 150


class _ColdRecordsWithMean(ColdRecords):
    def key_mean(self, layer):
        return np.zeros((self._records.shape[1], self.rotation.shape[0]), np.float32)


class _RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 100.0 ** (torch.arange(0, head_dim, 2).double() / head_dim))


@pytest.mark.parametrize("c, block", [(5, 2), (1, 1)], ids=["prefill", "decode"])
def test_a_blocks_best_picks_sit_after_the_far_gap_and_the_others_before_it_each_in_token_order(c, block):
    """retrieve's layout against a brute-force one: per block, the near_picks best by the max over the block's
    queries and query heads of q.k sit after the gap, the rest from the sinks on; switched off (far_gap 0), every
    pick sits at s + its rank in token order. A decode step takes the one-call path (token_retrieval)."""
    rng = np.random.default_rng(4)
    hq, hk, d, n, r, near, gap = 4, 2, 16, 300, 6, 2, 50
    keys = rng.standard_normal((n, hk, d)).astype(np.float32)
    records = codec.encode_records(keys.reshape(n * hk, d), rng.standard_normal((n * hk, d)).astype(np.float32))
    archive = _ColdRecordsWithMean(records.reshape(n, hk, -1), d, np.eye(d, dtype=np.float32))
    rope = Rope(_RotaryEmbedding(d), torch.float32, "cpu")
    memory = LayerMemory(hk, d, "cpu", torch.float32)
    memory.sink_k = memory.sink_v = torch.randn(hk, 3, d)
    memory.set_window(torch.randn(hk, 7, d), torch.randn(hk, 7, d))
    q = torch.randn(hq, c, d)
    blocks = select_blocks(c, block)
    for far_gap in (gap, 0):
        config = RetrievalConfig(shortlist=64, select_block=block, near_picks=near, far_gap=far_gap)
        got_k, got_v = retrieve(ColdTier(archive, config, rope, {}), 0, memory, q, blocks, r)
        turned = selection_queries(q, 7 + (r + 1) // 2, rope, hk)  # [Hk, C, G, D]
        ids = select_cold_blocks(archive, 0, turned.numpy(), blocks, config, r)  # [Hk, n_blocks, r], ascending
        for h in range(hk):
            for b, (start, end) in enumerate(blocks):
                picked_k, picked_v = (torch.from_numpy(a[h]) for a in decode_cold(archive, 0, ids[:, b]))  # [r, D]
                scores = (turned[h, start:end].reshape(-1, d) @ picked_k.T).amax(dim=0)
                best = set(torch.argsort(scores, descending=True)[:near].tolist()) if far_gap else set()
                order = [i for i in range(r) if i not in best] + sorted(best)
                positions = [3 + slot + (far_gap if slot >= r - len(best) else 0) for slot in range(r)]
                cos, sin = rope.at(0, 3 + far_gap + r)
                want_k = apply_rope(picked_k[order], cos[positions], sin[positions])
                torch.testing.assert_close(got_k[h, b], want_k, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_v[h, b], picked_v[order], rtol=1e-6, atol=1e-6)


def test_the_far_gap_is_derived_from_the_models_reach_and_fits_the_layout_in_it():
    from transformers import LlamaConfig

    model_config = LlamaConfig(max_position_embeddings=2048)
    config = RetrievalConfig.for_model(model_config)
    assert (config.top_k_cold, config.near_picks, config.far_gap) == (16, 2, 1024)
    assert config.compact_span() <= 2048
    crowded = RetrievalConfig.for_model(model_config, hot_window=1200)  # half the reach no longer fits: less gap
    assert 0 < crowded.far_gap < 1024 and crowded.compact_span() == 2048
    # never farther back than a token truly is, and no gap when every pick sits near
    assert (config.gap_before_near(16, 10_000), config.gap_before_near(16, 100), config.gap_before_near(2, 10_000)) \
        == (1024, 84, 0)


def test_merged_softmax_equals_attention_over_each_querys_own_keys():
    rng = torch.Generator().manual_seed(0)
    hq, hk, c, s, r, d = 4, 2, 5, 7, 3, 8
    queries = torch.randn(hq, c, d, generator=rng)
    keys, values = torch.randn(hk, s, d, generator=rng), torch.randn(hk, s, d, generator=rng)
    cold_k, cold_v = torch.randn(hk, c, r, d, generator=rng), torch.randn(hk, c, r, d, generator=rng)
    mask = torch.ones(c, s, dtype=torch.bool)
    mask[:, -c:] = torch.ones(c, c, dtype=torch.bool).tril()  # the last c shared keys are the chunk: causal
    got = attend_with_retrieved(queries, keys, values, (cold_k, cold_v, 1), 0.5)
    for query in range(c):
        for head in range(hq):
            kv = head // (hq // hk)
            k_all = torch.cat([keys[kv][mask[query]], cold_k[kv, query]])
            v_all = torch.cat([values[kv][mask[query]], cold_v[kv, query]])
            want = F.softmax(queries[head, query] @ k_all.T * 0.5, dim=-1) @ v_all
            torch.testing.assert_close(got[head, query], want, rtol=1e-5, atol=1e-5)


def test_queries_of_a_block_attend_their_blocks_keys_as_if_each_had_its_own_copy():
    """Keys retrieved once per selection block (the last block short) give what per-query copies give."""
    rng = torch.Generator().manual_seed(1)
    hq, hk, c, s, r, d, block = 6, 2, 7, 9, 3, 8, 3
    queries = torch.randn(hq, c, d, generator=rng)
    keys, values = torch.randn(hk, s, d, generator=rng), torch.randn(hk, s, d, generator=rng)
    n_blocks = len(select_blocks(c, block))
    cold_k, cold_v = torch.randn(hk, n_blocks, r, d, generator=rng), torch.randn(hk, n_blocks, r, d, generator=rng)
    of_query = torch.arange(c) // block
    want = attend_with_retrieved(queries, keys, values, (cold_k[:, of_query], cold_v[:, of_query], 1), 0.5)
    got = attend_with_retrieved(queries, keys, values, (cold_k, cold_v, block), 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_fused_and_the_materialised_attention_give_the_same_output_and_log_sum_exp():
    rng = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=rng) for _ in range(3))
    for causal in (False, True):
        fused = attention_with_lse(q, k, v, 0.4, causal, fused=True)
        materialised = attention_with_lse(q, k, v, 0.4, causal, fused=False)
        for got, want in zip(fused, materialised):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merging_attention_over_parts_equals_attention_over_their_union():
    rng = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 4, 8, generator=rng)
    k, v = torch.randn(1, 2, 10, 8, generator=rng), torch.randn(1, 2, 10, 8, generator=rng)
    parts = [attention_with_lse(q, k[:, :, a:b], v[:, :, a:b], 0.7, fused=False) for a, b in ((0, 3), (3, 4), (4, 10))]
    want = F.softmax(q @ k.transpose(-1, -2) * 0.7, dim=-1) @ v
    torch.testing.assert_close(merge_attention(parts), want, rtol=1e-5, atol=1e-5)


def test_prefill_chunks_merge_only_whole_chunks_that_stay_exact():
    config = RetrievalConfig(chunk_size=32, dense_chunk_size=128, dense_up_to=200, top_k_cold=8)

    def cut(position, length):
        bounds = []
        while length:
            n = config.next_chunk(position, length)
            bounds.append((position, position + n))
            position, length = position + n, length - n
        return bounds

    # up to 128 tokens at a time while whole chunks end within 200; then chunks of 32, the one crossing 200 included
    assert cut(0, 300) == [(0, 128), (128, 192), (192, 224), (224, 256), (256, 288), (288, 300)]
    assert cut(10, 100) == [(10, 106), (106, 110)]  # from anywhere: the boundaries chunks of 32 would have
    assert cut(190, 40) == [(190, 222), (222, 230)]
    off = RetrievalConfig(chunk_size=32, dense_chunk_size=128, dense_up_to=200, top_k_cold=0)
    assert off.next_chunk(0, 300) == 32  # retrieval off never attends exactly: no long chunks


def _sdpa_reference(queries, keys, values, window=None):
    """Causal attention of the chunk at the end of the keys, one SDPA call with the whole mask."""
    n_keys, length = keys.shape[1], queries.shape[1]
    mask = (causal_lower_right(length, n_keys) if window is None
            else sliding_mask(n_keys - length, length, n_keys, window, queries.device))
    return F.scaled_dot_product_attention(queries[None], keys[None], values[None], attn_mask=mask, scale=0.25,
                                          enable_gqa=True)[0]


def _chunk_at_a_time(queries, keys, values, rows, window=None):
    """The chunk fed `rows` queries at a time, each piece against the keys before and up to it."""
    n_keys, length = keys.shape[1], queries.shape[1]
    outs = []
    for a in range(0, length, rows):
        b = min(a + rows, length)
        visible = n_keys - length + b
        outs.append(exact_attention(queries[:, a:b], keys[:, :visible], values[:, :visible], 0.25, window, rows))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_exact_chunk_equals_one_masked_attention_and_feeding_it_a_chunk_at_a_time(dtype):
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(4, 96, 16, generator=g).to(dtype)
    keys, values = torch.randn(2, 160, 16, generator=g).to(dtype), torch.randn(2, 160, 16, generator=g).to(dtype)
    square_k, square_v = keys[:, :96], values[:, :96]
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for window, k, v in ((None, keys, values),  # a chunk after earlier keys
                         (None, square_k, square_v),  # the chunk that starts the sequence
                         (40, keys, values), (200, keys, values)):  # sliding-window layers: past and inside the window
        got = exact_attention(queries, k, v, 0.25, window, 32)
        assert got.dtype == dtype
        want = _sdpa_reference(queries, k, v, window)
        torch.testing.assert_close(got.float(), want.float(), **tolerance)
        torch.testing.assert_close(got.float(), _chunk_at_a_time(queries, k, v, 32, window).float(), **tolerance)
    # the chunk that starts the sequence is one causal attention: the same as SDPA's own, bit for bit
    assert torch.equal(exact_attention(queries, square_k, square_v, 0.25, None, 32),
                       _sdpa_reference(queries, square_k, square_v))
