"""The engine's entry points: `enable()` switches a model to retrieval attention and yields an `InfiniteKVCache`
(cache.py) for `model.generate` and pipelines; `open_session()` adds a `Session` on top, the chat convenience the CLI
and the server use (ask, checkpointed reads, commit and resume). With `policy=` both give an eviction baseline
instead (`infinitekv.policies`: an EvictingCache on the same attention path, for comparison).

    with infinitekv.enable(model, archive="./mem") as cache:
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

    with infinitekv.open_session(model, tokenizer=tokenizer, archive="./mem") as session:
        answer = session.ask("What is the pass key?", document=haystack)

On exit the model's attention implementation and generation hooks are restored; the weights are never written
(tests check their SHA-256).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch

from infinitekv import adapters, codec, threads
from infinitekv.archive import Archive
from infinitekv.attention import RetrievalConfig
from infinitekv.cache import (ATTENTION, InfiniteKVCache, RoutedCache, begin_model_forward, cache_argument,
                              carried_cache, chunk_bounds, forward_ids, route_attention)
from infinitekv.errors import IKVError
from infinitekv.models import weights_sha256
from infinitekv.policies import EvictingCache, Policy, check_policy

CHECKPOINT_EVERY = 8  # prefill chunks between checkpoints of a disk archive (8 x 512 tokens); 0 turns them off


class Session:
    """A conversation over an InfiniteKVCache: chat turns, checkpointed reads, greedy or sampled replies."""

    def __init__(self, model, tokenizer, cache: RoutedCache):  # an InfiniteKVCache, or an EvictingCache (no archive)
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.transcript = ""  # the text whose tokens are in the cache, for continuing chat turns
        self.messages: list[dict] = []
        # a turn being read: its token ids not fed yet, and the hashes of the text they came from; committed by a
        # checkpoint so an interrupted read resumes where it stopped (see feed)
        self.pending_ids: list[int] = []
        self.pending_inputs: dict = {}
        self.checkpoint_every = CHECKPOINT_EVERY

    # the cache's state, read through the session by benches and tests
    archive = property(lambda self: self.cache.archive)
    config = property(lambda self: self.cache.config)
    counters = property(lambda self: self.cache.counters)
    memories = property(lambda self: self.cache.memories)
    token_ids = property(lambda self: self.cache.token_ids)
    layout = property(lambda self: self.cache.layout)

    def memory_bill(self) -> dict:
        return self.cache.memory_bill()

    # ---- feeding tokens -------------------------------------------------------------------------------------
    def _forward(self, ids: list[int]) -> torch.Tensor:
        return forward_ids(self.cache, self.model, ids)

    def feed(self, ids: list[int], progress: bool = False) -> torch.Tensor:
        """Prefill `ids` in the cache's chunks (`chunk_bounds`); returns the logits after the last one.

        A disk archive gets a checkpoint (a commit, with the ids still to read) at the end of the first chunk that
        completes `checkpoint_every` x chunk_size tokens since the last one, so a read killed midway resumes from
        the last checkpoint instead of from the start. Checkpoints fall on chunk boundaries, and chunks depend only
        on positions, so the resumed read feeds exactly the chunks the uninterrupted one would have.
        """
        if not ids:
            raise IKVError("nothing to read: the prompt is empty; pass --prompt, --prompt-file or --question")
        start = time.perf_counter()
        bounds = chunk_bounds(self.cache, len(self.token_ids), len(ids))
        archive = self.archive  # None under an eviction policy: nothing to checkpoint
        durable = archive is not None and archive.mode == "disk" and archive.writable
        spacing = self.checkpoint_every * self.config.chunk_size if durable else 0
        last_checkpoint = 0
        for index, (begin, end) in enumerate(bounds):
            logits = self._forward(ids[begin:end])
            if progress:
                print_progress("prefill", index + 1, len(bounds), len(self.token_ids))
            if spacing and end - last_checkpoint >= spacing and end < len(ids):
                self.pending_ids = ids[end:]
                self.commit()
                self.counters.checkpoints += 1
                last_checkpoint = end
        self.pending_ids = []
        self.counters.prefill_tokens += len(ids)
        self.counters.prefill_seconds += time.perf_counter() - start
        return logits

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: set[int] | None = None,
                 progress: bool = False, on_token: Callable[[int], bool] | None = None) -> list[int]:
        """Greedy by default. The last generated stop token is fed too, so the cache holds the whole turn.

        on_token(token) is called after each token is fed; returning True stops generation there (a server uses it
        to stream tokens, to end at a stop string and to stop when its client goes away). Python users wanting
        logits processors, streamers or stopping criteria call `model.generate(..., past_key_values=session.cache)`.
        """
        stop_ids = self.stop_ids() if stop_ids is None else stop_ids
        generator = torch.Generator().manual_seed(seed)
        logits = self.feed(prompt_ids, progress=progress)
        generated: list[int] = []
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)
            generated.append(token)
            logits = self._forward([token])
            self.counters.decode_steps += 1
            stop = on_token(token) if on_token is not None else False
            if stop or token in stop_ids:
                break
        self.counters.decode_seconds += time.perf_counter() - start
        return generated

    def stop_ids(self) -> set[int]:
        stops = set()
        for source in (self.model.generation_config, self.model.config):
            eos = getattr(source, "eos_token_id", None)
            stops.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer is not None:
            if self.tokenizer.eos_token_id is not None:
                stops.add(self.tokenizer.eos_token_id)
            end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
                stops.add(end_of_turn)
        return stops

    # ---- chat turns -----------------------------------------------------------------------------------------
    def turn_ids(self, user_text: str) -> list[int]:
        """Token ids that continue the conversation with one user message and open the assistant's reply."""
        tokenizer = self.tokenizer
        messages = self.messages + [{"role": "user", "content": user_text}]
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if rendered.startswith(self.transcript):
                new_text = rendered[len(self.transcript) :]
            else:  # the template re-renders history differently (e.g. drops old reasoning): render the turn alone
                new_text = tokenizer.apply_chat_template(messages[-1:], tokenize=False, add_generation_prompt=True)
            ids = tokenizer(new_text, add_special_tokens=False)["input_ids"]
        else:
            new_text = ("\n\n" if self.transcript else "") + user_text + "\n"
            ids = tokenizer(new_text, add_special_tokens=not self.transcript)["input_ids"]
        self.messages = messages
        self.transcript += new_text
        return ids

    def ask(self, question: str | None, document: str | None = None, max_new_tokens: int = 64,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, progress: bool = False) -> str:
        """One turn. If a restored archive was interrupted while reading a turn, that read continues (the document
        and question, when given, must be the ones it was reading)."""
        given = _turn_inputs(document, question)
        if self.pending_ids:
            for name, digest in given.items():
                if digest is not None and digest != self.pending_inputs.get(name):
                    raise IKVError(
                        f"the archive was interrupted while reading another {name} (sha256 "
                        f"{str(self.pending_inputs.get(name))[:12]}); pass the same one, or none, to finish that read"
                    )
            ids = self.pending_ids
        else:
            user_text = "\n\n".join(part for part in (document, question) if part)
            self.pending_inputs = given
            ids = self.turn_ids(user_text)
        generated = self.generate(ids, max_new_tokens, temperature, top_p, seed, progress=progress)
        answer = self.tokenizer.decode(generated, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": answer.strip()})
        self.transcript += self.tokenizer.decode(generated, skip_special_tokens=False)
        return answer

    # ---- durable state --------------------------------------------------------------------------------------
    def commit(self) -> None:
        """Make the archive's records, the cache's hot tier and this conversation one durable point."""
        meta = {"transcript": self.transcript, "messages": self.messages}
        arrays = {}
        if self.pending_ids:
            arrays["pending_ids"] = np.asarray(self.pending_ids, dtype=np.int64)
            meta["pending"] = {"inputs": self.pending_inputs, "tokens": len(self.pending_ids)}
        self.cache.commit(arrays, meta)

    def restore(self) -> None:
        self.take_conversation(*self.cache.restore())

    def take_conversation(self, arrays: dict, meta: dict) -> None:
        """The conversation fields of a committed state (see commit)."""
        self.transcript = meta.get("transcript", "")
        self.messages = meta.get("messages", [])
        pending = meta.get("pending")
        self.pending_ids = arrays["pending_ids"].tolist() if pending else []
        self.pending_inputs = pending["inputs"] if pending else {}


def _turn_inputs(document: str | None, question: str | None) -> dict:
    digest = lambda text: hashlib.sha256(text.encode("utf-8")).hexdigest() if text else None  # noqa: E731
    return {"document": digest(document), "question": digest(question)}


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


_progress_open = False  # a progress line is on stderr without its newline (an error printed now starts a new line)


def end_progress_line() -> None:
    """Finish an open progress line on stderr, so what is printed next starts on a line of its own."""
    global _progress_open
    if _progress_open:
        print(file=sys.stderr, flush=True)
        _progress_open = False


def print_progress(label: str, done: int, total: int, tokens: int) -> None:
    global _progress_open
    _progress_open = done != total
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} chunks, {tokens:,} tokens",
          end=end, file=sys.stderr, flush=True)


def check_budget(model, config: RetrievalConfig) -> None:
    reach = adapters.attention_reach(model.config)
    if config.compact_span() > reach:
        raise IKVError(
            f"sinks + top-k-cold + far gap + hot-window + evict batch + chunk = {config.compact_span()} positions "
            f"exceeds the model's trained window of {reach} (its sliding window where that is narrower); lower "
            "--hot-window, --top-k-cold or --chunk-size"
        )
    for name in ("sinks", "hot_window", "top_k_cold", "chunk_size", "shortlist", "select_block", "evict_batch"):
        if getattr(config, name) < (0 if name in ("sinks", "top_k_cold") else 1):
            raise IKVError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.shortlist < config.top_k_cold:
        raise IKVError(f"--shortlist {config.shortlist} is smaller than --top-k-cold {config.top_k_cold}: the rerank "
                       "keeps top-k-cold of the shortlist; raise --shortlist or lower --top-k-cold")


def new_archive(path, model, fingerprint: str, rotation_seed: int = 0) -> Archive:
    """An empty archive for `model`'s cache: on disk at `path`, or in RAM when path is None."""
    layout = adapters.layout(model)
    return Archive.create(path, layout, fingerprint, mode="ram" if path is None else "disk",
                          rotation=codec.rotation_matrix(layout.head_dim, rotation_seed))


def _open_archive(model, archive, mode: str, resume: bool, fingerprint: str,
                  rotation_seed: int) -> tuple[Archive, bool]:
    """The archive to use and whether enable() owns (and so closes) it."""
    if isinstance(archive, Archive):
        store, owned = archive, False
    elif resume:
        if archive is None:
            raise IKVError("--resume needs --archive pointing at an existing archive directory")
        store, owned = Archive.open(archive, model_fingerprint=fingerprint, writable=True), True
    else:
        store, owned = new_archive(archive if mode == "disk" else None, model, fingerprint, rotation_seed), True
    if store.layout != adapters.layout(model):
        if owned:
            store.close()
        raise IKVError(f"archive layout {store.layout} does not match the model's {adapters.layout(model)}")
    return store, owned


@contextlib.contextmanager
def enable(model, *, archive: str | Archive | None = None, mode: str = "disk", config: RetrievalConfig | None = None,
           resume: bool = False, fingerprint: str | None = None, policy: Policy | None = None):
    """Switch retrieval attention on for `model` and yield its InfiniteKVCache; restores the model on exit, always.

    archive: a directory (created, or reopened with resume=True), an open Archive, or None for an in-RAM archive.
    Inside, `model.generate(..., past_key_values=cache)` uses the cache; a `generate` call (or a pipeline) that
    passes no cache gets a fresh in-RAM InfiniteKVCache of its own, so each call reads its prompt from scratch with
    bounded memory.
    policy: an eviction baseline (`infinitekv.policies`) instead of retrieval: the cache yielded is an
    EvictingCache holding at most the policy's budget, on the same attention path; config's chunk_size and
    dense_up_to apply, and there is no archive.
    """
    adapters.check_supported(model)
    threads.configure()  # a model loaded by the caller, not by load_model: the pools must still not fight
    config = RetrievalConfig.for_model(model.config, **asdict(config or RetrievalConfig()))
    if policy is not None:
        if archive is not None or resume:
            raise IKVError(f"the {policy.name} policy keeps no archive: it drops what it evicts; run it without "
                           "--archive and --resume")
        check_policy(policy, model, config.chunk_size)
        with _routed(model, lambda: EvictingCache(model, policy, config)):
            yield EvictingCache(model, policy, config)
        return
    check_budget(model, config)
    fingerprint = fingerprint or weights_sha256(model)
    store, owned = _open_archive(model, archive, mode, resume, fingerprint, config.rotation_seed)
    try:
        cache = InfiniteKVCache(model, store, config, fingerprint)
        if resume:
            cache.restore()

        def ram_cache():
            return InfiniteKVCache(model, new_archive(None, model, fingerprint, config.rotation_seed), config,
                                   fingerprint)

        with _routed(model, ram_cache):
            yield cache
    finally:
        if owned:
            store.close()


@contextlib.contextmanager
def _routed(model, fresh_cache: Callable[[], RoutedCache]):
    """Inside: the model's attention goes through the function registered in cache.py for calls carrying a
    RoutedCache, and a `generate` call that passes no cache gets `fresh_cache()`. Restored on exit, always."""
    previous = model.config._attn_implementation
    handles = []
    share = threads.CoreShare() if next(model.parameters()).device.type == "cpu" else None
    try:
        model.set_attn_implementation(ATTENTION)
        handles.append(model.register_forward_pre_hook(begin_model_forward, with_kwargs=True))
        handles += [attn.register_forward_pre_hook(route_attention, with_kwargs=True)
                    for attn in adapters.attention_modules(model)]
        if share is not None:
            handles.append(model.register_forward_pre_hook(_begin_forward(share), with_kwargs=True))
            handles.append(model.register_forward_hook(_after_forward(share), with_kwargs=True, always_call=True))
            handles += [attn.register_forward_pre_hook(_layer_tick(share), with_kwargs=True)
                        for attn in adapters.attention_modules(model)]
        model._prepare_cache_for_generation = types.MethodType(_fresh_cache_unless_given(fresh_cache), model)
        yield
    finally:
        for handle in handles:
            handle.remove()
        model.__dict__.pop("_prepare_cache_for_generation", None)
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
        if share is not None:
            share.restore()


def _begin_forward(share: threads.CoreShare):
    def begin(model, args, kwargs):
        # only the engine's forwards are measured and run on the shared count; any other forward of the model (a
        # baseline's own cache beside it) runs on the user's
        if isinstance(carried_cache(kwargs), RoutedCache):
            share.begin()
    return begin


def _layer_tick(share: threads.CoreShare):
    def tick(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if (isinstance(carried_cache(kwargs), RoutedCache) and hidden is not None
                and hidden.shape[-2] > 1):  # a prefill forward: measured layer by layer
            share.tick()
    return tick


def _after_forward(share: threads.CoreShare):
    def after(model, args, kwargs, output):
        cache = carried_cache(kwargs)
        if isinstance(cache, RoutedCache) and share.end():
            cache.counters.forwards_on_fewer_threads += 1
    return after


def _fresh_cache_unless_given(fresh_cache: Callable[[], RoutedCache]):
    def prepare(model, generation_config, model_kwargs, *args, **kwargs):
        if carried_cache(model_kwargs) is None and generation_config.use_cache is not False:
            model_kwargs[cache_argument(model)] = fresh_cache()
        return type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)

    return prepare


@contextlib.contextmanager
def open_session(model, *, tokenizer=None, archive: str | Archive | None = None, mode: str = "disk",
                 config: RetrievalConfig | None = None, resume: bool = False, fingerprint: str | None = None,
                 policy: Policy | None = None):
    """`enable()` plus a Session on its cache (resumed from the archive's conversation with resume=True)."""
    with enable(model, archive=archive, mode=mode, config=config, resume=resume, fingerprint=fingerprint,
                policy=policy) as cache:
        session = Session(model, tokenizer, cache)
        if resume:
            session.take_conversation(*cache.restored)
        yield session
