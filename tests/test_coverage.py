"""The coverage measure against a brute-force reference on small random shapes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from infinitekv.coverage import covered_mass


def brute_force(logits, hot, retrieved):
    n = logits.shape[1]
    probs = np.array([[np.exp(row[j]) / sum(np.exp(row[i]) for i in range(n)) for j in range(n)] for row in logits])
    mass = lambda chosen: float(np.mean([sum(p[j] for j in range(n) if hot[j] or j in chosen) for p in probs]))  # noqa: E731
    cold = [j for j in range(n) if not hot[j]]
    oracle = max(mass(set(subset)) for subset in itertools.combinations(cold, len(retrieved)))
    return mass(set(retrieved)), oracle, mass(set())


@pytest.mark.parametrize("seed", range(6))
def test_covered_mass_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 9
    logits = rng.standard_normal((3, n)) * rng.uniform(0.5, 4)
    hot = np.zeros(n, dtype=bool)
    hot[:1] = True
    hot[-3:] = True
    cold = np.flatnonzero(~hot)
    retrieved = rng.choice(cold, size=2, replace=False)
    got = covered_mass(logits, hot, retrieved)
    want = brute_force(logits, hot, retrieved)
    np.testing.assert_allclose([got.retrieved, got.oracle, got.hot], want, rtol=1e-9)
    assert got.hot <= got.retrieved <= got.oracle <= 1 + 1e-12


def test_retrieving_every_cold_token_covers_all_the_mass():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((2, 20))
    hot = np.zeros(20, dtype=bool)
    hot[:2] = True
    got = covered_mass(logits, hot, np.arange(2, 20))
    assert got.retrieved == pytest.approx(1.0) and got.oracle == pytest.approx(1.0)


def test_a_hot_token_cannot_be_counted_as_retrieved():
    hot = np.array([True, False, False, True])
    with pytest.raises(ValueError, match="cold"):
        covered_mass(np.zeros((1, 4)), hot, np.array([0]))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_captured_queries_and_keys_are_the_modules_own_before_rope(family):
    """`bench._capture_qk` against the projections recomputed by hand from the layer's input (Qwen3: with its
    q/k norms), and the model's output unchanged by the capture."""
    import torch

    from infinitekv import adapters, bench
    from tests.conftest import tiny_model

    model = tiny_model(family)
    ids = list(range(3, 40))
    inputs = {}
    attn = adapters.attention_modules(model)[1]

    def remember_input(module, args, kwargs):
        inputs["hidden"] = kwargs.get("hidden_states", args[0] if args else None)

    hook = attn.register_forward_pre_hook(remember_input, with_kwargs=True)
    try:
        queries, keys = bench._capture_qk(model, ids)
    finally:
        hook.remove()
    assert model.config._attn_implementation == "sdpa"
    hidden = inputs["hidden"][0]
    head_dim = attn.head_dim
    with torch.no_grad():
        q = attn.q_proj(hidden).view(len(ids), -1, head_dim)
        k = attn.k_proj(hidden).view(len(ids), -1, head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
    torch.testing.assert_close(queries[1], q.transpose(0, 1).float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(keys[1], k.transpose(0, 1).float(), rtol=1e-4, atol=1e-4)
