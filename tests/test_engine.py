"""The engine on tiny random models of every supported family: exactness when nothing is cold, retrieval when it is,
weights untouched, resume equal to an uninterrupted run, and clear refusals."""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import tiny_model
from infinitekv import threads
from infinitekv.archive import Archive
from infinitekv.attention import RetrievalConfig
from infinitekv.cache import chunk_bounds
from infinitekv.engine import open_session
from infinitekv.errors import IKVError
from infinitekv.models import weights_sha256

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def reference_greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                             pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_unmodified_model_when_hot_window_covers_everything(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits[0]
    config = RetrievalConfig(hot_window=1024, chunk_size=64, top_k_cold=8, shortlist=32)
    with open_session(model, config=config, mode="ram") as session:
        for start in range(0, 300, 64):
            logits = session.feed(ids[0, start : start + 64].tolist())
            last = min(start + 64, 300) - 1
            torch.testing.assert_close(logits, reference[last], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_identical_and_weights_byte_identical_after_exit(family):
    model = tiny_model(family)
    before = weights_sha256(model)
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(2))
    expected = reference_greedy(model, ids, 12)
    config = RetrievalConfig(hot_window=1024, chunk_size=50, top_k_cold=8, shortlist=32)
    with open_session(model, config=config, mode="ram") as session:
        got = session.generate(ids[0].tolist(), max_new_tokens=12, stop_ids=set())
    assert got == expected
    assert weights_sha256(model) == before
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    with torch.no_grad():  # the unpatched model still works and is the original
        assert reference_greedy(model, ids, 12) == expected


def test_attention_is_restored_when_the_body_raises():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError):
        with open_session(model, mode="ram"):
            raise RuntimeError("boom")
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_old_tokens_go_to_the_cold_tier_and_are_retrieved(mode, tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(3)).tolist()[0]
    config = RetrievalConfig(sinks=4, hot_window=64, evict_batch=16, chunk_size=32, top_k_cold=8, shortlist=32,
                             dense_up_to=0)
    archive = str(tmp_path / "mem") if mode == "disk" else None
    with open_session(model, config=config, archive=archive, mode=mode) as session:
        logits = session.feed(ids)
        cold = len(session.archive.signatures(0))
        memory = session.memories[0]
        assert memory.sink_k.shape[1] == 4
        assert 64 <= memory.window_k.shape[1] < 64 + 16
        assert cold + 4 + memory.window_k.shape[1] == 400
        assert session.counters.cold_tokens_per_step() > 0
        assert torch.isfinite(logits).all()
        bill = session.memory_bill()
        assert bill["cold_tokens"] == cold
        assert bill["cold_record_bytes"] == cold * 2 * 2 * (16 + 8 + 8)


def test_retrieval_off_differs_from_retrieval_on_once_tokens_are_cold():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(4)).tolist()[0]
    outputs = []
    for top_k in (0, 16):
        config = RetrievalConfig(hot_window=32, evict_batch=8, chunk_size=32, top_k_cold=top_k, shortlist=64,
                                 dense_up_to=0)
        with open_session(model, config=config, mode="ram") as session:
            outputs.append(session.feed(ids))
    assert not torch.allclose(outputs[0], outputs[1])


def test_resumed_session_continues_exactly_like_an_uninterrupted_one(tmp_path):
    model = tiny_model("qwen3")
    ids = torch.randint(0, 256, (1, 500), generator=torch.Generator().manual_seed(5)).tolist()[0]
    more = [7, 8, 9, 10, 11]
    config = RetrievalConfig(hot_window=48, evict_batch=8, chunk_size=40, top_k_cold=8, shortlist=32,
                             dense_up_to=300)  # crosses from exact attention to retrieval mid-way
    with open_session(model, config=config, mode="ram") as session:
        session.feed(ids)
        expected = session.generate(more, max_new_tokens=10, stop_ids=set())
    with open_session(model, config=config, archive=str(tmp_path / "mem")) as session:
        session.feed(ids)
        session.commit()
    with open_session(model, config=config, archive=str(tmp_path / "mem"), resume=True) as session:
        assert len(session.token_ids) == 500
        got = session.generate(more, max_new_tokens=10, stop_ids=set())
        assert session.counters.prefill_tokens == len(more)
    assert got == expected


def test_resume_with_another_model_is_refused(tmp_path):
    config = RetrievalConfig(hot_window=32, evict_batch=8, chunk_size=32)
    with open_session(tiny_model("llama", seed=0), config=config, archive=str(tmp_path / "mem")) as session:
        session.feed(list(range(100)))
        session.commit()
    with pytest.raises(IKVError, match="model"):
        with open_session(tiny_model("llama", seed=1), config=config, archive=str(tmp_path / "mem"), resume=True):
            pass


def test_budget_beyond_trained_window_is_refused_with_the_fix():
    model = tiny_model("llama")
    with pytest.raises(IKVError, match="trained window.*lower --hot-window"):
        with open_session(model, config=RetrievalConfig(hot_window=8000), mode="ram"):
            pass


def test_a_shortlist_smaller_than_the_cold_budget_is_refused_with_the_fix():
    with pytest.raises(IKVError, match="--shortlist 16 is smaller than --top-k-cold 32.*raise --shortlist"):
        with open_session(tiny_model("llama"), config=RetrievalConfig(hot_window=64, top_k_cold=32, shortlist=16),
                          mode="ram"):
            pass


def test_unsupported_architecture_is_refused():
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(IKVError, match="unsupported architecture 'gpt2'"):
        with open_session(model, mode="ram"):
            pass


def test_an_existing_archive_is_not_overwritten(tmp_path):
    model = tiny_model("llama")
    config = RetrievalConfig(hot_window=32, evict_batch=8, chunk_size=32)
    with open_session(model, config=config, archive=str(tmp_path / "mem")) as session:
        session.feed(list(range(100)))
        session.commit()
    with pytest.raises(IKVError):
        with open_session(model, config=config, archive=str(tmp_path / "mem")):
            pass
    with Archive.open(tmp_path / "mem", writable=False) as archive:
        assert archive.committed_tokens == len(archive.signatures(0)) > 0


@pytest.mark.parametrize("chunk", [1, 64])
def test_retrieving_every_cold_token_reproduces_the_full_model_up_to_quantisation(chunk):
    """With top-k above the cold count, every token is attended at its true position: only int8/4-bit error remains,
    token by token (the decode path) and chunk by chunk (the prefill path)."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        reference = model(ids).logits[0]
    config = RetrievalConfig(hot_window=32, evict_batch=8, chunk_size=chunk, top_k_cold=2000, shortlist=4000,
                             select_block=16, dense_up_to=0)
    worst = 0.0
    with open_session(model, config=config, mode="ram") as session:
        for start in range(0, 400, chunk):
            logits = session.feed(ids[0, start : start + chunk].tolist())
            worst = max(worst, float((logits - reference[min(start + chunk, 400) - 1]).abs().max()))
        assert len(session.archive.signatures(0)) > 300
    assert worst < 0.02


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_is_exact_inside_dense_up_to_although_old_tokens_are_archived(family):
    """A small hot window spills records, yet while the sequence fits `dense_up_to` every token is attended exactly
    at its true position: the logits are the unmodified model's."""
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference = model(ids).logits[0]
    config = RetrievalConfig(hot_window=32, evict_batch=8, chunk_size=50, top_k_cold=8, shortlist=32)
    with open_session(model, config=config, mode="ram") as session:
        assert session.config.dense_up_to == model.config.max_position_embeddings  # derived from the model
        for start in range(0, 350, 50):
            logits = session.feed(ids[0, start : start + 50].tolist())
            torch.testing.assert_close(logits, reference[start + 49], rtol=1e-4, atol=1e-4)
        for position in range(350, 400):  # the decode path too
            logits = session.feed([int(ids[0, position])])
            torch.testing.assert_close(logits, reference[position], rtol=1e-4, atol=1e-4)
        assert len(session.archive.signatures(0)) > 300
        assert session.counters.cold_tokens_per_step() > 100  # every cold token, every step


def test_leaving_dense_up_to_switches_to_retrieval_and_drops_archived_tokens_from_the_window():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(9)).tolist()[0]
    config = RetrievalConfig(hot_window=32, evict_batch=8, chunk_size=50, top_k_cold=8, shortlist=32,
                             dense_up_to=200)
    with open_session(model, config=config, mode="ram") as session:
        session.feed(ids[:200])
        assert session.memories[0].window_len > 150  # exact: the window still holds the archived tokens
        session.feed(ids[200:])
        memory = session.memories[0]
        assert memory.archived == 0 and 32 <= memory.window_len < 32 + 8
        assert len(session.archive.signatures(0)) + 4 + memory.window_len == 400


@pytest.fixture
def fixed_threads(monkeypatch):
    """Both reads on the same thread counts, so that they differ by their chunking alone: CoreShare moves the
    engine's forwards to fewer threads while the process waits for cores (on a busy machine, or a noisy virtual
    one), at different layers in different reads, and matrix products split across another number of threads round
    differently."""
    monkeypatch.setattr(threads, "CoreShare", functools.partial(threads.CoreShare, wait_ns=lambda: None))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_long_exact_chunks_give_the_logits_and_records_of_chunks_of_chunk_size(family, fixed_threads):
    """The exact phase reads in long chunks (fewer parallel regions: a busy machine slows it less), yet the logits
    and the records written are those of reading chunk_size at a time up to float rounding (a record's int8 or
    4-bit code can round the other way), through the switch to retrieval and decode steps, and for a read that
    starts off the chunk grid."""
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 420), generator=torch.Generator().manual_seed(12)).tolist()[0]
    results = []
    for dense_chunk in (32, 160):
        config = RetrievalConfig(hot_window=48, evict_batch=8, chunk_size=32, dense_chunk_size=dense_chunk,
                                 top_k_cold=8, shortlist=32, dense_up_to=300)
        with open_session(model, config=config, mode="ram") as session:
            logits = [session.feed(ids[:37]), session.feed(ids[37:400])]
            logits += [session.feed([token]) for token in ids[400:]]
            records = [session.archive.records(layer).copy() for layer in range(model.config.num_hidden_layers)]
            chunks = len(chunk_bounds(session.cache, 37, 363))
        results.append((torch.stack(logits), records, chunks))
    (chunked, chunked_records, many), (long, long_records, few) = results
    assert few < many  # the second read did go through in longer chunks
    torch.testing.assert_close(chunked, long, rtol=1e-4, atol=1e-4)
    assert torch.equal(chunked.argmax(dim=-1), long.argmax(dim=-1))
    for a, b in zip(chunked_records, long_records):
        assert a.shape == b.shape and (a != b).mean() < 1e-3


def test_resume_inside_dense_up_to_restores_the_cold_tokens_from_records(tmp_path):
    """The state file holds only the unarchived window; a resume decodes the rest from the records, so it continues
    like the uninterrupted run up to int8/4-bit error."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(10)).tolist()[0]
    more = ids[250:]
    config = RetrievalConfig(hot_window=32, evict_batch=8, chunk_size=50, top_k_cold=8, shortlist=32)
    with open_session(model, config=config, mode="ram") as session:
        session.feed(ids[:250])
        expected = session.feed(more)
    with open_session(model, config=config, archive=str(tmp_path / "mem")) as session:
        session.feed(ids[:250])
        session.commit()
    arrays, _ = Archive.open(tmp_path / "mem", writable=False).load_state()
    assert arrays["layer0.window_k"].shape[1] < 32 + 8
    with open_session(model, config=config, archive=str(tmp_path / "mem"), resume=True) as session:
        got = session.feed(more)
        assert session.memories[0].window_len == 300 - 4
    assert float((got - expected).abs().max()) < 0.05
    assert int(got.argmax()) == int(expected.argmax())


def test_retrieval_sizes_are_derived_from_the_models_config():
    """Not SmolLM2 constants: the window, chunk and budgets follow the model's attention reach (its trained window,
    or its sliding window where that is narrower), and what the caller sets is kept."""
    import transformers

    def derived(config, **overrides):
        c = RetrievalConfig.for_model(config, **overrides)
        return c.hot_window, c.chunk_size, c.top_k_cold, c.shortlist, c.evict_batch, c.dense_up_to

    llama_8k = transformers.LlamaConfig(max_position_embeddings=8192)
    assert derived(llama_8k) == (1024, 512, 64, 1024, 64, 8192)
    assert derived(transformers.LlamaConfig(max_position_embeddings=2048)) == (256, 128, 16, 256, 16, 2048)
    mistral = transformers.MistralConfig(max_position_embeddings=32768, sliding_window=1024)
    assert derived(mistral) == (128, 64, 8, 128, 8, 32768)
    assert derived(llama_8k, hot_window=512, top_k_cold=0)[:3] == (512, 256, 0)
    qwen2 = transformers.Qwen2Config(max_position_embeddings=32768, sliding_window=4096, use_sliding_window=False)
    assert derived(qwen2)[0] == 1024  # Qwen2 only slides when use_sliding_window is on
    assert RetrievalConfig.for_model(llama_8k).dense_chunk_size == 8 * 512


def test_enable_leaves_numpys_blas_one_thread_so_its_pool_cannot_spin_against_torchs():
    from threadpoolctl import threadpool_info, threadpool_limits

    from infinitekv.engine import enable

    model = tiny_model("llama")
    with threadpool_limits(2, user_api="blas"):  # as a process that set its own limits finds them
        with enable(model, mode="ram"):
            blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
            assert blas, "numpy links a BLAS"
            assert all(lib["num_threads"] == 1 for lib in blas)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_in_one_call_per_layer_give_the_composed_retrievals_logits(family, monkeypatch):
    """A decode step's retrieval runs as one numba call per layer (token_retrieval); the same steps composed from
    the block path (the path prefill takes) give the same logits up to float rounding, step after step."""
    from infinitekv import token_retrieval
    from infinitekv.attention import ColdTier

    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 320), generator=torch.Generator().manual_seed(6)).tolist()[0]
    config = RetrievalConfig(hot_window=48, evict_batch=8, chunk_size=32, top_k_cold=12, shortlist=48, near_picks=3,
                             far_gap=40, dense_up_to=0)
    calls = []
    one_call = token_retrieval.retrieve_token
    monkeypatch.setattr(token_retrieval, "retrieve_token", lambda *args: calls.append(1) or one_call(*args))
    steps = {}
    for fused in (True, False):
        monkeypatch.setattr(ColdTier, "fuses_token_steps", lambda self, fused=fused: fused)
        with open_session(model, config=config, mode="ram") as session:
            session.feed(ids[:300])
            steps[fused] = torch.stack([session.feed([token])[-1] for token in ids[300:]])
    assert len(calls) == 20 * model.config.num_hidden_layers  # every decode step of every layer, fused run only
    torch.testing.assert_close(steps[True], steps[False], rtol=1e-4, atol=1e-4)
