"""InfiniteKV as a transformers Cache: model.generate, streamers, stopping criteria and pipelines inside enable(),
on tiny random models of every supported family; forks and crops at committed points."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import tiny_model
from infinitekv import RetrievalConfig, enable
from infinitekv.cache import cache_argument
from infinitekv.errors import IKVError
from infinitekv.models import weights_sha256

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
# a small hot window: old tokens go to the cold tier (written, not read while the sequence fits the trained window)
SPILLING = RetrievalConfig(hot_window=32, evict_batch=8, chunk_size=24, top_k_cold=8, shortlist=32)


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, **kwargs):
    kwargs = {"max_new_tokens": 12, "pad_token_id": 0, "eos_token_id": None, **kwargs}
    with torch.no_grad():
        return model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_inside_enable_gives_the_unmodified_models_greedy_tokens(family):
    model = tiny_model(family)
    ids = prompt(150, 1)
    expected = generate(model, ids, do_sample=False)
    before = weights_sha256(model)
    with enable(model, config=SPILLING, mode="ram") as cache:
        got = generate(model, ids, do_sample=False, past_key_values=cache)
        assert len(cache.archive.signatures(0)) > 50  # old tokens were archived on the way
        assert cache.get_seq_length() == 150 + 12 - 1  # the last token is returned, not fed
        assert cache.token_ids == ids[0].tolist() + got[:-1]
    assert got == expected
    assert weights_sha256(model) == before
    assert model.config._attn_implementation == "sdpa"  # restored on exit


def test_the_cache_under_either_argument_name_is_read_and_written_through_retrieval():
    # transformers 5.24 renamed the argument from past_key_values to cache: users pass either, and the engine's own
    # calls pass the installed version's name
    model = tiny_model("llama")
    ids = prompt(150, 1)
    expected = generate(model, ids, do_sample=False)
    for name in sorted({"past_key_values", cache_argument(model)}):
        with enable(model, config=SPILLING, mode="ram") as cache:
            assert generate(model, ids, do_sample=False, **{name: cache}) == expected
            assert len(cache.archive.signatures(0)) > 50  # the registered attention ran: old tokens were archived
            assert cache.get_seq_length() == 150 + 12 - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_with_a_fixed_seed_matches_the_unmodified_model(family):
    model = tiny_model(family)
    ids = prompt(90, 2)
    options = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=0)
    torch.manual_seed(7)
    expected = generate(model, ids, **options)
    with enable(model, config=SPILLING, mode="ram") as cache:
        torch.manual_seed(7)
        got = generate(model, ids, past_key_values=cache, **options)
    assert got == expected


def test_mistral_sliding_window_is_honoured_while_attention_is_exact():
    """A sequence three times longer than Mistral's sliding window: every layer must forget what the window drops,
    exactly as the unmodified model does."""
    model = tiny_model("mistral", sliding_window=32)
    ids = prompt(100, 3)
    with torch.no_grad():
        reference = model(ids).logits[0]
    expected = generate(model, ids, do_sample=False)
    config = RetrievalConfig(hot_window=8, evict_batch=4, chunk_size=8, top_k_cold=2, shortlist=8)
    with enable(model, config=config, mode="ram") as cache:
        with torch.no_grad():
            logits = model(ids[:, :60], past_key_values=cache).logits[0]
            torch.testing.assert_close(logits, reference[:60], rtol=1e-4, atol=1e-4)
        cache.crop(0)
        got = generate(model, ids, do_sample=False, past_key_values=cache)
    assert got == expected


def test_generate_without_a_cache_inside_enable_gets_a_fresh_infinitekv_cache_each_call():
    model = tiny_model("llama")
    ids = prompt(120, 4)
    expected = generate(model, ids, do_sample=False)
    with enable(model, config=SPILLING, mode="ram") as cache:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                                 return_dict_in_generate=True)
        assert type(out.past_key_values).__name__ == "InfiniteKVCache"
        assert out.past_key_values is not cache and cache.get_seq_length() == 0
        assert out.sequences[0, 120:].tolist() == expected
        assert generate(model, ids, do_sample=False) == expected  # a second call is not fed the first's tokens


def test_text_streamer_and_stopping_criteria_work_inside_enable(capsys):
    model = tiny_model("qwen2")
    tokenizer = _byte_tokenizer()
    ids = prompt(80, 5)
    expected = generate(model, ids, do_sample=False, max_new_tokens=10)
    stop_after = expected[5]

    class StopAt(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_after

    with enable(model, config=SPILLING, mode="ram") as cache:
        streamer = transformers.TextStreamer(tokenizer)
        got = generate(model, ids, do_sample=False, max_new_tokens=10, past_key_values=cache, streamer=streamer,
                       stopping_criteria=transformers.StoppingCriteriaList([StopAt()]))
    assert got == expected[: expected.index(stop_after) + 1]
    printed = capsys.readouterr().out
    assert tokenizer.decode(got) in printed


def test_text_generation_pipeline_works_inside_enable():
    model = tiny_model("llama")
    tokenizer = _byte_tokenizer()
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    text = "".join(chr(ord("a") + i % 26) for i in range(150))
    options = dict(max_new_tokens=10, do_sample=False, return_full_text=False)
    expected = pipe(text, **options)[0]["generated_text"]
    with enable(model, config=SPILLING, mode="ram"):
        got = pipe(text, **options)[0]["generated_text"]
    assert got == expected


def test_a_direct_model_call_inside_enable_keeps_the_cache_consistent(tmp_path):
    """A call without the cache is the unmodified model and touches nothing; a call with it records its tokens, and
    a commit then resume continues where the uninterrupted cache goes on (up to the int8/4-bit error of the archived
    tokens a resume decodes back into the exact window)."""
    model = tiny_model("llama")
    ids = prompt(140, 6)
    with torch.no_grad():
        reference = model(ids).logits[0]
    with enable(model, config=SPILLING, archive=str(tmp_path / "mem")) as cache:
        with torch.no_grad():
            plain = model(ids).logits[0]  # no cache: the model's own attention, no state change
            torch.testing.assert_close(plain, reference)
            assert cache.get_seq_length() == 0 and cache.archive.n_tokens == 0
            model(ids[:, :100], past_key_values=cache)
            assert cache.token_ids == ids[0, :100].tolist() and cache.get_seq_length() == 100
            cache.commit()
            expected = model(ids[:, 100:], past_key_values=cache).logits[0]
    with enable(model, config=SPILLING, archive=str(tmp_path / "mem"), resume=True) as cache:
        assert cache.token_ids == ids[0, :100].tolist()
        with torch.no_grad():
            got = model(ids[:, 100:], past_key_values=cache).logits[0]
    assert float((got - expected).abs().max()) < 0.05


def test_inputs_that_do_not_continue_the_cache_are_refused():
    model = tiny_model("llama")
    with enable(model, config=SPILLING, mode="ram") as cache:
        with torch.no_grad():
            model(prompt(40, 7), past_key_values=cache)
            with pytest.raises(IKVError, match="start at position 0.*holds 40 tokens"):
                model(prompt(5, 8), past_key_values=cache, position_ids=torch.arange(5)[None])
            with pytest.raises(IKVError, match="one sequence"):
                model(prompt(5, 8).repeat(2, 1), past_key_values=cache)


def test_beam_search_is_refused_with_the_fix():
    model = tiny_model("llama")
    with enable(model, config=SPILLING, mode="ram") as cache:
        with pytest.raises(IKVError, match="beam search"):
            generate(model, prompt(30, 9), num_beams=2, do_sample=False, past_key_values=cache)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_forked_questions_share_the_document_and_do_not_leak_into_each_other(mode, tmp_path):
    """Read a document once, commit, then ask two questions, each on its own fork: each answer equals the answer
    of a cache that read only the document and that question, and each question's prefill is its own tokens."""
    model = tiny_model("qwen3")
    document, first, second = prompt(200, 10), prompt(20, 11), prompt(20, 12)
    config = RetrievalConfig(hot_window=32, evict_batch=8, chunk_size=24, top_k_cold=8, shortlist=32,
                             dense_up_to=64)  # past it: the questions retrieve from the cold tier

    def alone(question):  # a cache that read the document, then only this question (same chunks as the forks)
        with enable(model, config=config, mode="ram") as cache, torch.no_grad():
            model(document, past_key_values=cache)
            return generate(model, torch.cat([document, question], dim=1), do_sample=False, past_key_values=cache)

    expected = [alone(first), alone(second)]
    archive = str(tmp_path / "mem") if mode == "disk" else None
    with enable(model, config=config, archive=archive, mode=mode) as cache:
        with torch.no_grad():
            model(document, past_key_values=cache)
        cache.commit()
        committed = cache.archive.committed_tokens
        answers = []
        for question in (first, second):
            fork = cache.fork()
            fed = len(fork.token_ids)
            answers.append(generate(model, torch.cat([document, question], dim=1), do_sample=False,
                                    past_key_values=fork))
            assert len(fork.token_ids) - fed == question.shape[1] + 11  # only the question and the answer were fed
        assert cache.archive.committed_tokens == committed
        # the document's cache itself goes on from the committed point; crop returns a fork there too
        assert generate(model, torch.cat([document, first], dim=1), do_sample=False,
                        past_key_values=cache) == expected[0]
        cache.crop(200)
        assert generate(model, torch.cat([document, second], dim=1), do_sample=False,
                        past_key_values=cache) == expected[1]
    assert answers == expected


def test_a_fork_whose_tail_was_replaced_must_crop_back_first():
    model = tiny_model("llama")
    config = RetrievalConfig(hot_window=16, evict_batch=4, chunk_size=16, top_k_cold=4, shortlist=16, dense_up_to=0)
    with enable(model, config=config, mode="ram") as cache:
        with torch.no_grad():
            model(prompt(100, 13), past_key_values=cache)
            cache.commit()
            first, second = cache.fork(), cache.fork()
            model(prompt(40, 14), past_key_values=first)  # writes records past the committed point
            model(prompt(40, 15), past_key_values=second)  # drops them and writes its own
            with pytest.raises(IKVError, match="crop it back to the committed point"):
                model(prompt(4, 16), past_key_values=first)
            first.crop(100)
            model(prompt(4, 16), past_key_values=first)
            with pytest.raises(IKVError, match="crops only to its last committed point \\(100 tokens\\)"):
                first.crop(50)


def _byte_tokenizer():
    """A real fast tokenizer over the tiny models' 256-token vocabulary (one token per byte), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {chr(i) if 32 <= i < 127 else f"<{i}>": i for i in range(256)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<0>", pad_token="<0>",
                                                eos_token="<1>")
