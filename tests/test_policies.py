"""Eviction policies (`infinitekv.policies`): what each keeps, checked against brute-force references on tiny shapes;
the EvictingCache through plain model.generate on tiny random models; and every policy on the real SmolLM2 at a
short length."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

from conftest import tiny_model
from infinitekv import RetrievalConfig, enable
from infinitekv.errors import IKVError
from infinitekv.policies import POLICIES, CacheView, make_policy

SCORED = [name for name in POLICIES if make_policy(name, 8).attention_decay is not None]
EVICTING = [name for name in POLICIES if name != "keep_all"]


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def brute_force_keep(name: str, tokens: list[tuple[int, float]], budget: int) -> list[int]:
    """Positions kept from (position, score) pairs, by the policy's published rule, ties to the newer token."""
    if name == "keep_all" or len(tokens) <= budget:
        return sorted(p for p, _ in tokens)
    newest_first = sorted(tokens, key=lambda t: t[0], reverse=True)
    if name == "recent":
        kept = newest_first[:budget]
    elif name == "sinks_window":
        kept = sorted(tokens, key=lambda t: (t[0] < 4, t[0]), reverse=True)[:budget]
    elif name == "heavy_hitter":
        kept = sorted(tokens, key=lambda t: (t[1], t[0]), reverse=True)[:budget]
    elif name == "hybrid":
        recent = newest_first[: budget // 2]
        older = sorted(newest_first[budget // 2 :], key=lambda t: (t[1], t[0]), reverse=True)
        kept = recent + older[: budget - len(recent)]
    elif name == "salience":  # the mean decayed attention over the queries that saw the token
        seen, decay = max(p for p, _ in tokens) + 1, 0.5 ** (1 / 256)
        mean = {p: s * (1 - decay) / (1 - decay ** (seen - p)) for p, s in tokens}
        kept = sorted(tokens, key=lambda t: (t[0] < 4, np.float32(mean[t[0]]), t[0]), reverse=True)[:budget]
    return sorted(p for p, _ in kept)


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("seed", range(4))
def test_each_policy_keeps_what_the_brute_force_rule_keeps(name, seed):
    rng = np.random.default_rng(seed)
    n_heads, n, budget = 3, 23, 9
    # each head its own ascending positions, the first three (sinks) present as in a real cache
    positions = np.stack([np.concatenate([[0, 1, 2], np.sort(rng.choice(np.arange(3, 60), n - 3, replace=False))])
                          for _ in range(n_heads)])
    scores = rng.integers(0, 5, size=(n_heads, n)).astype(np.float32)  # few values: many ties
    policy = make_policy(name, budget)
    kept = policy.keep(CacheView(torch.from_numpy(positions), torch.from_numpy(scores)))
    for h in range(n_heads):
        got = positions[h, kept[h].numpy()].tolist()
        assert got == brute_force_keep(name, list(zip(positions[h].tolist(), scores[h].tolist())), budget)


# ---- the cache's bookkeeping against a token-by-token reference -------------------------------------------------

def _layer0_qk(model, ids: torch.Tensor):
    """Pre-RoPE q [Hq, T, D] and k [Hk, T, D] of a Llama's layer 0: its input is the embedding alone, so what the
    cache evicts cannot change it."""
    layer, config = model.model.layers[0], model.config
    with torch.no_grad():
        hidden = layer.input_layernorm(model.model.embed_tokens(ids))[0]
        q = layer.self_attn.q_proj(hidden).view(-1, config.num_attention_heads, config.head_dim)
        k = layer.self_attn.k_proj(hidden).view(-1, config.num_key_value_heads, config.head_dim)
    return q.transpose(0, 1).double().numpy(), k.transpose(0, 1).double().numpy()


def _rope(x, position, inv_freq):
    angles = position * inv_freq
    cos, sin = np.cos(np.concatenate([angles, angles])), np.sin(np.concatenate([angles, angles]))
    half = len(x) // 2
    return x * cos + np.concatenate([-x[half:], x[:half]]) * sin


def reference_layer0(name, q, k, steps, budget, decay, inv_freq, scale, compact):
    """Brute force, one query and one key at a time: [position, score] kept per kv-head after every step. Positions
    are true ones, or (compact) each resident token's index and the chunk right after them."""
    n_q, n_kv = q.shape[0], k.shape[0]
    group = n_q // n_kv
    heads = [[] for _ in range(n_kv)]  # [position, score] lists, ascending position
    for a, b in steps:
        for h in range(n_kv):
            resident = heads[h]
            for token in resident:
                token[1] *= (decay or 1.0) ** (b - a)
            keys = resident + [[p, 0.0] for p in range(a, b)]
            for c, t in enumerate(range(a, b)):
                visible = keys[: len(resident) + c + 1]
                key_at = [i if compact else p for i, (p, _) in enumerate(visible)]
                query_at = len(resident) + c if compact else t
                for g in range(group):
                    query = _rope(q[h * group + g, t], query_at, inv_freq)
                    logits = [scale * query @ _rope(k[h, p], at, inv_freq) for (p, _), at in zip(visible, key_at)]
                    top = max(logits)
                    weights = [math.exp(x - top) for x in logits]
                    for token, w in zip(visible, weights):
                        token[1] += w / sum(weights) * (decay or 1.0) ** (b - 1 - t)
            kept = brute_force_keep(name, [tuple(t) for t in keys], budget)
            heads[h] = [t for t in keys if t[0] in kept]
    return heads


@pytest.mark.parametrize("name", EVICTING)
@pytest.mark.parametrize("dense_up_to", [None, 0])  # true positions inside the trained window; cache indices past it
def test_the_cache_keeps_and_scores_what_a_token_by_token_reference_does(name, dense_up_to):
    """Three 8-token chunks in one forward (the cache cuts them), then one token at a time as decoding does: the
    positions each kv-head keeps and their scores equal a brute-force softmax over exactly those tokens."""
    model = tiny_model("llama")
    ids = prompt(40, 1)
    budget = 10
    policy = make_policy(name, budget)
    with enable(model, config=RetrievalConfig(chunk_size=8, dense_up_to=dense_up_to), policy=policy) as cache:
        with torch.no_grad():
            model(ids[:, :24], past_key_values=cache)
            for t in range(24, 40):
                model(ids[:, t : t + 1], past_key_values=cache)
        layer = cache.layers[0]
        positions, scores = layer.positions.numpy(), layer.scores.numpy()
    q, k = _layer0_qk(model, ids)
    steps = [(0, 8), (8, 16), (16, 24)] + [(t, t + 1) for t in range(24, 40)]
    expected = reference_layer0(name, q, k, steps, budget, policy.attention_decay,
                                model.model.rotary_emb.inv_freq.double().numpy(),
                                model.model.layers[0].self_attn.scaling, compact=dense_up_to == 0)
    for h, tokens in enumerate(expected):
        assert positions[h].tolist() == [p for p, _ in tokens]
        if policy.attention_decay is not None:
            np.testing.assert_allclose(scores[h], [s for _, s in tokens], rtol=1e-4, atol=1e-6)


# ---- through plain model.generate ---------------------------------------------------------------------------------

def generate(model, ids, **kwargs):
    kwargs = {"max_new_tokens": 12, "pad_token_id": 0, "eos_token_id": None, "do_sample": False, **kwargs}
    with torch.no_grad():
        return model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()


class ResidentEachStep(transformers.StoppingCriteria):
    """Records, after every forward of a generate call, the most tokens any layer and kv-head of `cache` holds."""

    def __init__(self, cache):
        self.cache, self.resident = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        self.resident.append(self.cache.resident_tokens())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_a_budget_the_sequence_fits_gives_the_unmodified_models_greedy_tokens(family, name):
    model = tiny_model(family)
    ids = prompt(90, 2)
    expected = generate(model, ids)
    with enable(model, config=RetrievalConfig(chunk_size=32), policy=make_policy(name, 120)) as cache:
        got = generate(model, ids, past_key_values=cache)
        assert cache.get_seq_length() == 90 + 12 - 1 and cache.resident_tokens() == 90 + 12 - 1
        assert cache.token_ids == ids[0].tolist() + got[:-1]
    assert got == expected
    assert model.config._attn_implementation == "sdpa"  # restored on exit


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", EVICTING)
def test_a_smaller_budget_generates_and_never_holds_more_than_it(family, name):
    """Resident tokens after every forward stay within the budget, and each layer's keys and values are really cut
    to it: equal resident memory, whatever the policy."""
    model = tiny_model(family)
    ids = prompt(100, 3)
    budget = 24
    with enable(model, config=RetrievalConfig(chunk_size=16), policy=make_policy(name, budget)) as cache:
        watch = ResidentEachStep(cache)
        got = generate(model, ids, past_key_values=cache, stopping_criteria=[watch])
        assert len(got) == 12 and len(watch.resident) == 12
        assert max(watch.resident) == budget
        assert cache.get_seq_length() == 100 + 12 - 1  # positions go on counting every token read
        layout = cache.layout
        assert cache.memory_bill()["kv_bytes"] == layout.n_layers * 2 * layout.n_kv_heads * budget * layout.head_dim * 4
    assert all(0 <= t < 256 for t in got)


def test_unscored_and_scored_attention_agree_with_the_model_on_a_sliding_window_layer():
    """A sequence three times Mistral's sliding window, with a budget that keeps everything: the cache must mask
    what the window drops, in both its fused and its score-keeping attention."""
    model = tiny_model("mistral", sliding_window=32)
    ids = prompt(100, 4)
    expected = generate(model, ids)
    for name in ("recent", "heavy_hitter"):
        with enable(model, config=RetrievalConfig(chunk_size=24), policy=make_policy(name, 200)) as cache:
            assert generate(model, ids, past_key_values=cache) == expected


def test_keep_all_teacher_forced_is_the_unmodified_model():
    model = tiny_model("qwen3")
    ids = prompt(50, 5)
    with torch.no_grad():
        reference = model(ids).logits[0]
    with enable(model, config=RetrievalConfig(chunk_size=16), policy=make_policy("keep_all")) as cache:
        with torch.no_grad():
            got = [model(ids[:, :40], past_key_values=cache).logits[0, -1]]
            got += [model(ids[:, t : t + 1], past_key_values=cache).logits[0, -1] for t in range(40, 50)]
    torch.testing.assert_close(torch.stack(got[:-1]), reference[39:49], rtol=1e-4, atol=1e-4)


def test_generate_without_a_cache_inside_a_policy_gets_a_fresh_evicting_cache_each_call():
    model = tiny_model("llama")
    ids = prompt(60, 6)
    with enable(model, config=RetrievalConfig(chunk_size=16), policy=make_policy("recent", 20)) as cache:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
                                 return_dict_in_generate=True)
        assert type(out.past_key_values).__name__ == "EvictingCache"
        assert out.past_key_values is not cache and cache.get_seq_length() == 0
        assert out.past_key_values.resident_tokens() == 20


def test_infinitekv_at_a_large_budget_narrows_its_far_gap_to_fit_the_models_reach():
    """The far gap (RetrievalConfig.far_gap) is derived for the hot window a budget leaves: a budget whose window
    leaves less than half the reach gets a narrower gap, not a refusal naming settings the user never set."""
    from infinitekv.baselines import system_at_budget

    model = tiny_model("llama")  # reach 4,096: a derived gap of 2,048
    assert system_at_budget(model, "infinitekv", RetrievalConfig(), 600).config.far_gap == 2048
    wide = system_at_budget(model, "infinitekv", RetrievalConfig(), 2500).config
    assert 0 < wide.far_gap < 2048 and wide.compact_span() <= 4096


def test_bad_policy_settings_are_refused_with_one_line(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(IKVError, match="unknown policy 'lru'; choose from keep_all"):
        make_policy("lru", 10)
    with pytest.raises(IKVError, match="needs a budget"):
        make_policy("recent", 0)
    with pytest.raises(IKVError, match="exceeds the model's trained window of 4096"):
        with enable(model, config=RetrievalConfig(chunk_size=128), policy=make_policy("recent", 4000)):
            pass
    with pytest.raises(IKVError, match="protects 4 tokens"):
        with enable(model, policy=make_policy("sinks_window", 4)):
            pass
    with pytest.raises(IKVError, match="keeps no archive"):
        with enable(model, archive=str(tmp_path / "mem"), policy=make_policy("recent", 8)):
            pass
    with enable(model, config=RetrievalConfig(chunk_size=16), policy=make_policy("recent", 8)) as cache:
        with torch.no_grad():
            model(prompt(20, 7), past_key_values=cache)
            with pytest.raises(IKVError, match="start at position 0.*holds 20 tokens"):
                model(prompt(5, 8), past_key_values=cache, position_ids=torch.arange(5)[None])
        with pytest.raises(IKVError, match="nothing to commit"):
            cache.commit()
        with pytest.raises(IKVError, match="beam search"):
            generate(model, prompt(30, 9), num_beams=2, past_key_values=cache)
    assert model.config._attn_implementation == "sdpa"


# ---- on the real SmolLM2, at a short length ------------------------------------------------------------------------

SHORT, TAIL, BUDGET = 1200, 24, 384


@pytest.fixture(scope="module")
def short_text(smollm2):
    """1,200 tokens of English text and the unmodified model's logits for its last TAIL + 1 positions."""
    from infinitekv.corpus import english_text

    ids = smollm2.tokenizer(english_text(SHORT * 8), add_special_tokens=False)["input_ids"][:SHORT]
    with torch.no_grad():
        reference = smollm2.model(torch.tensor([ids]), use_cache=False, logits_to_keep=TAIL + 1).logits[0]
    return ids, reference


@pytest.mark.smollm2
@pytest.mark.parametrize("name", list(POLICIES))
def test_each_policy_runs_smollm2_within_its_budget(smollm2, short_text, name):
    """Teacher-forced through the session's chunked prefill and one-token steps, as the baselines bench measures."""
    from infinitekv.engine import open_session

    ids, reference = short_text
    agree = []
    with open_session(smollm2.model, tokenizer=smollm2.tokenizer, config=RetrievalConfig(chunk_size=256),
                      mode="ram", policy=make_policy(name, BUDGET)) as session:
        logits = session.feed(ids[: SHORT - TAIL])
        for offset in range(TAIL):
            agree.append(int(logits.argmax()) == int(reference[offset].argmax()))
            logits = session.feed([ids[SHORT - TAIL + offset]])
        resident = {layer.tokens for layer in session.cache.layers}
        kept = session.cache.layers[0].positions[0].tolist()
    assert resident == {SHORT if name == "keep_all" else BUDGET}
    assert kept[-1] == SHORT - 1 or name in SCORED  # only scoring policies may drop the token just read
    if name == "keep_all":
        assert all(agree)  # the full cache is the unmodified model
    if name in ("recent", "sinks_window"):
        assert kept[-BUDGET + 4 :] == list(range(SHORT - BUDGET + 4, SHORT))
    if name == "sinks_window":  # with its sinks a third of the text still predicts most next tokens
        assert kept[:4] == [0, 1, 2, 3] and np.mean(agree) >= 0.6, np.mean(agree)


@pytest.mark.smollm2
@pytest.mark.parametrize("name", ["keep_all", "recent"])
def test_a_passkey_outside_the_recent_window_is_lost_only_by_the_policy_that_drops_it(smollm2, name):
    """Plain model.generate on the chat-templated prompt, as a transformers user writes it."""
    from infinitekv.needles import passkey

    tokenizer = smollm2.tokenizer
    needle = passkey(tokenizer, 1500, 0.2)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": needle.document + "\n\n" + needle.question}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with enable(smollm2.model, policy=make_policy(name, 256)) as cache:
        with torch.no_grad():
            out = smollm2.model.generate(**inputs, past_key_values=cache, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert (needle.answer in text) == (name == "keep_all"), text


@pytest.mark.smollm2
def test_the_baselines_bench_holds_every_system_to_one_budget_and_draws_its_plots(smollm2, tmp_path):
    """`ikv bench baselines` on a tiny grid: each system answers the same needle within the same budget, the KL
    sweep measures each, and the three PNGs land beside the receipt."""
    from infinitekv.baselines import bench_baselines

    receipt = tmp_path / "baselines.json"
    systems = ("keep_all", "recent", "heavy_hitter", "infinitekv")
    parts = bench_baselines(smollm2, RetrievalConfig(), budget=256, systems=systems, lengths=(700,), depths=(0.5,),
                            task_lengths=(), quality_lengths=(600,), positions=4, kl_budgets=(256,),
                            full_up_to=700, plots_beside=receipt)
    cells = {c["system"]: c for c in parts["outputs"]["passkey"]}
    assert sorted(cells) == sorted(systems)
    assert len({c["prompt_tokens"] for c in cells.values()}) == 1  # the same prompt for every system
    for name, cell in cells.items():
        assert cell["resident_tokens"] <= 256 or name == "keep_all"
        assert cell["resident_bytes"] > 0 and cell["decode_ms_per_token"] > 0
    assert cells["keep_all"]["found"]
    quality = {q["system"]: q for q in parts["outputs"]["quality"]}
    assert sorted(quality) == sorted(systems) and quality["keep_all"]["median_kl"] < 1e-6
    assert parts["metrics"]["passkey_recent_at_700"]["unit"] == "of 1"
    for kind in ("accuracy", "kl", "bytes"):
        assert (tmp_path / f"baselines-{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.smollm2
def test_the_memory_bench_draws_the_bill_at_each_length_it_reads(smollm2, tmp_path):
    from infinitekv.bench import bench_memory

    config = RetrievalConfig(hot_window=128, chunk_size=128, dense_up_to=0)
    parts = bench_memory(smollm2, config, tokens=640, points=3, plot=tmp_path / "memory.png")
    series = parts["outputs"]["series"]
    assert [bill["tokens"] for bill in series] == [256, 512, 640]  # chunk boundaries, the last at the end
    cold = [bill["cold_tokens"] for bill in series]
    assert cold == sorted(cold) and cold[-1] == parts["outputs"]["bill"]["cold_tokens"] > 0
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
