"""The 104-byte record: encode/decode error bounds, the signature is the key codes' sign bits, the rerank score."""

from __future__ import annotations

import numpy as np
import pytest

from infinitekv import codec


def sample(n=2000, d=64, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.1, 20, (n, 1)).astype(np.float32)
    values = rng.standard_normal((n, d)).astype(np.float32) * 3 + rng.uniform(-5, 5, (n, 1)).astype(np.float32)
    return keys, values


def test_record_is_104_bytes_for_head_dim_64():
    assert codec.record_bytes(64) == 104
    assert codec.encode_records(*sample(10)).shape == (10, 104)
    with pytest.raises(ValueError):
        codec.record_bytes(60)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_keys_and_values_round_trip_within_half_a_quantisation_step(head_dim):
    keys, values = sample(d=head_dim)
    records = codec.encode_records(keys, values)
    got_keys = codec.decode_keys_rotated(records, head_dim)
    got_values = codec.decode_values(records, head_dim)
    key_step = codec.record_fields(records, head_dim)[2][:, 0].astype(np.float32)
    value_step = codec.record_fields(records, head_dim)[2][:, 2].astype(np.float32)
    # the scales are float16, so the step is the stored one; codes are chosen against exactly that step
    assert (np.abs(got_keys - keys) <= key_step[:, None] * 0.5 * (1 + 1e-3) + 1e-6).all()
    assert (np.abs(got_values - values) <= value_step[:, None] * 0.5 * (1 + 1e-2) + np.abs(values) * 2e-3).all()
    relative = np.linalg.norm(got_keys - keys, axis=1) / np.linalg.norm(keys, axis=1)
    assert np.median(relative) < 0.01  # 8-bit keys: about 0.5% error


def test_signature_bits_are_the_sign_bits_of_the_key_codes():
    keys, values = sample()
    records = codec.encode_records(keys, values)
    bits = np.unpackbits(codec.signatures_from_records(records, 64), axis=-1, bitorder="little").astype(bool)
    assert (bits == (codec.decode_keys_rotated(records, 64) < 0)).all()
    mean_abs = codec.key_mean_abs(records, 64)
    np.testing.assert_allclose(mean_abs, np.abs(keys).mean(axis=1), rtol=2e-3)


def test_constant_vectors_and_zero_keys_encode_without_nan():
    keys = np.zeros((3, 64), np.float32)
    values = np.full((3, 64), 2.5, np.float32)
    records = codec.encode_records(keys, values)
    assert np.isfinite(codec.decode_keys_rotated(records, 64)).all()
    np.testing.assert_allclose(codec.decode_values(records, 64), values, rtol=1e-3)


def test_rotation_is_orthogonal_and_fixed_by_its_seed():
    rotation = codec.rotation_matrix(64, 0)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(64), atol=1e-5)
    np.testing.assert_array_equal(rotation, codec.rotation_matrix(64, 0))
    assert not np.allclose(rotation, codec.rotation_matrix(64, 1))


@pytest.mark.parametrize("block_starts", [[0, 4, 10], [0, 1, 40]], ids=["few_queries", "many_queries"])
def test_rerank_scores_each_block_against_its_shortlist_maxed_over_its_queries_and_heads(block_starts):
    # few queries per block: numba's dot per pair; many (a prefill block's): a matmul, the one-query block padded (a
    # pad that changed its max, e.g. zeros against all-negative dots, would show here)
    keys, values = sample(3000)
    records = codec.encode_records(keys, values).reshape(1000, 3, 104)
    rng = np.random.default_rng(1)
    shortlist = rng.integers(0, 1000, (2, 3, 50))
    queries = rng.standard_normal((3, block_starts[-1], 2, 64)).astype(np.float32)  # [H, C, G, D]
    assert (max(np.diff(block_starts)) * 2 >= codec.WIDE_RERANK) == (block_starts[-1] == 40)
    got = codec.score_shortlist(records, shortlist, queries, np.array(block_starts))
    dequantised = codec.decode_keys_rotated(records, 64)
    blocks = list(zip(block_starts[:-1], block_starts[1:]))
    want = np.stack([np.stack([(queries[h, a:b].reshape(-1, 64) @ dequantised[shortlist[n, h], h].T).max(axis=0)
                               for n, (a, b) in enumerate(blocks)]) for h in range(3)])
    assert got.shape == (3, 2, 50)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_decode_rows_gives_what_the_record_decoders_give_for_each_heads_own_tokens():
    keys, values = sample(3000)
    records = codec.encode_records(keys, values).reshape(1000, 3, 104)
    ids = np.random.default_rng(2).integers(0, 1000, (3, 4, 5))  # repeats included
    got_keys, got_values = codec.decode_rows(records, ids, 64)
    assert got_keys.shape == got_values.shape == (3, 4, 5, 64)
    for h in range(3):
        chosen = records[ids[h], h]
        np.testing.assert_array_equal(got_keys[h], codec.decode_keys_rotated(chosen, 64))
        np.testing.assert_array_equal(got_values[h], codec.decode_values(chosen, 64))
