"""The engine: `with enable(model, archive=...) as session:` patches a model's attention with retrieval attention,
feeds it text in chunks, generates, and saves or resumes everything the archive needs to continue a conversation.

    with infinitekv.enable(model, tokenizer=tokenizer, archive="./mem") as session:
        answer = session.ask("What is the pass key?", document=haystack)

On exit the original attention forwards are restored; the weights are never written (tests check their SHA-256).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from infinitekv import codec
from infinitekv.archive import Archive, Layout
from infinitekv.attention import LayerMemory, RetrievalConfig, Rope, retrieval_attention, trained_window
from infinitekv.errors import IKVError
from infinitekv.models import check_supported, weights_sha256

STATE_VERSION = 2  # 2: exact attention inside the trained window (config dense_up_to)
CHECKPOINT_EVERY = 8  # prefill chunks between checkpoints of a disk archive (8 x 512 tokens); 0 turns them off
_STATE_KEYS = frozenset({"state_version", "config", "transcript", "messages", "pending"})


@dataclass
class Counters:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    checkpoints: int = 0  # commits made in the middle of a prefill
    extra: dict = field(default_factory=dict)  # cold_tokens_attended and query_tokens, summed over layers by the attention

    def cold_tokens_per_step(self) -> float:
        """Average cold tokens each query token attended, per layer and kv-head (all of them while exact)."""
        return self.extra.get("cold_tokens_attended", 0) / max(1, self.extra.get("query_tokens", 0))


def model_layout(model) -> Layout:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Layout(
        n_layers=config.num_hidden_layers,
        n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        record_bytes=codec.record_bytes(head_dim),
    )


def decoder_layers(model):
    return model.model.layers


class Session:
    """A model with retrieval attention switched on, its hot tier, its archive and its conversation so far."""

    def __init__(self, model, tokenizer, archive: Archive, config: RetrievalConfig, fingerprint: str):
        self.model = model
        self.tokenizer = tokenizer
        self.archive = archive
        self.config = config
        self.fingerprint = fingerprint
        self.layout = model_layout(model)
        self.counters = Counters()
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.memories = [LayerMemory(self.layout.n_kv_heads, self.layout.head_dim, self.device, self.dtype)
                         for _ in range(self.layout.n_layers)]
        self.rotation = codec.rotation_matrix(self.layout.head_dim, config.rotation_seed)
        self.token_ids: list[int] = []
        self.transcript = ""  # the text whose tokens are in the cache, for continuing chat turns
        self.messages: list[dict] = []
        # a turn being read: its token ids not fed yet, and the hashes of the text they came from; committed by a
        # checkpoint so an interrupted read resumes where it stopped (see feed)
        self.pending_ids: list[int] = []
        self.pending_inputs: dict = {}
        self.checkpoint_every = CHECKPOINT_EVERY
        self.rope = Rope(model.model.rotary_emb, self.dtype, self.device)

    # ---- feeding tokens -------------------------------------------------------------------------------------
    def _forward(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits
        self.token_ids.extend(ids)
        return logits[0, -1].float()

    def feed(self, ids: list[int], progress: bool = False) -> torch.Tensor:
        """Prefill `ids` in chunks; returns the logits after the last one.

        A disk archive gets a checkpoint (a commit, with the ids still to read) every `checkpoint_every` chunks, so
        a read killed midway resumes from the last checkpoint instead of from the start. Checkpoints fall on chunk
        boundaries of `ids`, so the resumed read feeds exactly the chunks the uninterrupted one would have.
        """
        if not ids:
            raise IKVError("nothing to read: the prompt is empty; pass --prompt, --prompt-file or --question")
        start = time.perf_counter()
        chunk = self.config.chunk_size
        n_chunks = (len(ids) + chunk - 1) // chunk
        checkpoints = self.checkpoint_every if self.archive.mode == "disk" and self.archive.writable else 0
        for index in range(n_chunks):
            logits = self._forward(ids[index * chunk : (index + 1) * chunk])
            if checkpoints and (index + 1) % checkpoints == 0 and index + 1 < n_chunks:
                self.pending_ids = ids[(index + 1) * chunk :]
                self.commit()
                self.counters.checkpoints += 1
            if progress:
                print_progress("prefill", index + 1, n_chunks, len(self.token_ids))
        self.pending_ids = []
        self.counters.prefill_tokens += len(ids)
        self.counters.prefill_seconds += time.perf_counter() - start
        return logits

    def generate(self, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids: set[int] | None = None,
                 progress: bool = False, on_token: Callable[[int], bool] | None = None) -> list[int]:
        """Greedy by default. The last generated stop token is fed too, so the cache holds the whole turn.

        on_token(token) is called after each token is fed; returning True stops generation there (a server uses it
        to stream tokens, to end at a stop string and to stop when its client goes away).
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
        """Make the archive's records and this session's hot tier and conversation one durable point."""
        arrays = {
            "token_ids": np.asarray(self.token_ids, dtype=np.int64),
            "rotation": self.rotation,
        }
        for index, memory in enumerate(self.memories):
            # the window's archived tokens are in the records already: a resume decodes them from there
            hot = {"sink_k": memory.sink_k, "sink_v": memory.sink_v,
                   "window_k": memory.window_k[:, memory.archived :], "window_v": memory.window_v[:, memory.archived :]}
            for name, tensor in hot.items():
                arrays[f"layer{index}.{name}"] = tensor.float().cpu().numpy()
            if memory.key_mean is not None:
                arrays[f"layer{index}.key_mean"] = memory.key_mean
        meta = {
            "state_version": STATE_VERSION,
            "config": asdict(self.config),
            "transcript": self.transcript,
            "messages": self.messages,
        }
        if self.pending_ids:
            arrays["pending_ids"] = np.asarray(self.pending_ids, dtype=np.int64)
            meta["pending"] = {"inputs": self.pending_inputs, "tokens": len(self.pending_ids)}
        self.archive.commit(arrays, meta)

    def restore(self) -> None:
        arrays, meta = self.archive.load_state()
        if not meta:
            raise IKVError(
                f"archive {self.archive.path} has no saved conversation to resume; run once without --resume first"
            )
        if meta.get("state_version") != STATE_VERSION:
            raise IKVError(
                f"archive conversation state is version {meta.get('state_version')}, this infinitekv reads "
                f"{STATE_VERSION}; use the infinitekv version that wrote it"
            )
        saved = _checked_state(arrays, meta, len(self.memories), self.archive.path)
        for name in ("sinks", "hot_window", "evict_batch", "rotation_seed"):
            if getattr(saved, name) != getattr(self.config, name):
                raise IKVError(
                    f"--{name.replace('_', '-')} {getattr(self.config, name)} differs from the archive's "
                    f"{getattr(saved, name)}; resume with the archive's settings"
                )
        self.rotation = arrays["rotation"]
        self.token_ids = arrays["token_ids"].tolist()
        for index, memory in enumerate(self.memories):
            tensors = {name: torch.from_numpy(arrays[f"layer{index}.{name}"]).to(self.device, self.dtype)
                       for name in ("sink_k", "sink_v", "window_k", "window_v")}
            memory.sink_k, memory.sink_v = tensors["sink_k"], tensors["sink_v"]
            memory.set_window(tensors["window_k"], tensors["window_v"])
            memory.key_mean = arrays.get(f"layer{index}.key_mean")
        self.transcript = meta["transcript"]
        self.messages = meta["messages"]
        pending = meta.get("pending")
        self.pending_ids = arrays["pending_ids"].tolist() if pending else []
        self.pending_inputs = pending["inputs"] if pending else {}

    # ---- accounting -----------------------------------------------------------------------------------------
    def memory_bill(self) -> dict:
        """Bytes per tier, against the fp16 KV cache the cold tier replaces."""
        element = torch.finfo(self.dtype).bits // 8
        hot_tokens = sum(m.sink_k.shape[1] + m.window_len for m in self.memories)
        layout = self.layout
        cold_tokens = len(self.archive.signatures(0)) if layout.n_layers else 0
        index_bytes = sum(self.archive.signatures(i).nbytes + self.archive.key_weights(i).nbytes
                          for i in range(layout.n_layers))
        record_bytes = cold_tokens * layout.n_layers * layout.n_kv_heads * layout.record_bytes
        fp16_cold = cold_tokens * layout.n_layers * layout.n_kv_heads * layout.head_dim * 2 * 2
        return {
            "tokens": len(self.token_ids),
            "cold_tokens": cold_tokens,
            "hot_tier_bytes": hot_tokens * layout.n_kv_heads * layout.head_dim * 2 * element,
            "cold_index_bytes_resident": index_bytes,
            "cold_record_bytes": record_bytes,
            "cold_records_where": self.archive.mode,
            "fp16_kv_bytes_replaced": fp16_cold,
            "resident_fraction_of_fp16": (index_bytes / fp16_cold) if fp16_cold else 0.0,
        }


def _turn_inputs(document: str | None, question: str | None) -> dict:
    digest = lambda text: hashlib.sha256(text.encode("utf-8")).hexdigest() if text else None  # noqa: E731
    return {"document": digest(document), "question": digest(question)}


def _checked_state(arrays: dict, meta: dict, n_layers: int, where) -> RetrievalConfig:
    """The saved config, after checking the state holds what restore reads: its checksums passed, but a state
    written by another version (or by hand) must still get one line, not a KeyError."""
    def refuse(what: str) -> IKVError:
        return IKVError(f"archive {where} holds a conversation state this infinitekv cannot read ({what}); use the "
                        "infinitekv version that wrote it, or start a new archive")

    if not isinstance(meta, dict):
        raise refuse("its metadata is not an object")
    unknown = sorted(set(meta) - _STATE_KEYS)
    if unknown:
        raise refuse(f"unknown field {unknown[0]!r}")
    config = meta.get("config")
    known = {f.name for f in dataclasses.fields(RetrievalConfig)}
    if not isinstance(config, dict) or set(config) - known:
        raise refuse(f"unknown setting {sorted(set(config) - known)[0]!r}" if isinstance(config, dict)
                     else "no settings")
    if not isinstance(meta.get("transcript"), str) or not isinstance(meta.get("messages"), list):
        raise refuse("no transcript")
    needed = ["token_ids", "rotation"] + [f"layer{i}.{name}" for i in range(n_layers)
                                           for name in ("sink_k", "sink_v", "window_k", "window_v")]
    if meta.get("pending") is not None:
        if not isinstance(meta["pending"], dict) or not isinstance(meta["pending"].get("inputs"), dict):
            raise refuse("a malformed interrupted read")
        needed.append("pending_ids")
    missing = [name for name in needed if name not in arrays]
    if missing:
        raise refuse(f"missing tensor {missing[0]!r}")
    try:
        return RetrievalConfig(**config)
    except (TypeError, ValueError) as err:
        raise refuse(str(err)) from None


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
    trained = trained_window(model.config)
    if config.compact_span() > trained:
        raise IKVError(
            f"sinks + top-k-cold + hot-window + evict batch + chunk = {config.compact_span()} positions exceeds the "
            f"model's trained window of {trained}; lower --hot-window, --top-k-cold or --chunk-size"
        )
    for name in ("sinks", "hot_window", "top_k_cold", "chunk_size", "shortlist", "select_block", "evict_batch"):
        if getattr(config, name) < (0 if name in ("sinks", "top_k_cold") else 1):
            raise IKVError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")


@contextlib.contextmanager
def enable(model, *, tokenizer=None, archive: str | Archive | None = None, mode: str = "disk",
           config: RetrievalConfig | None = None, resume: bool = False, fingerprint: str | None = None):
    """Switch retrieval attention on for `model`; restores the original attention on exit, always.

    archive: a directory (created, or reopened with resume=True), an open Archive, or None for an in-RAM archive.
    """
    check_supported(model)
    config = RetrievalConfig.for_model(model.config, **asdict(config or RetrievalConfig()))
    check_budget(model, config)
    fingerprint = fingerprint or weights_sha256(model)
    owns_archive = not isinstance(archive, Archive)
    if isinstance(archive, Archive):
        store = archive
    elif resume:
        if archive is None:
            raise IKVError("--resume needs --archive pointing at an existing archive directory")
        store = Archive.open(archive, model_fingerprint=fingerprint, writable=True)
    else:
        store = Archive.create(archive if mode == "disk" else None, model_layout(model), fingerprint, mode=mode)
    if store.layout != model_layout(model):
        if owns_archive:
            store.close()
        raise IKVError(f"archive layout {store.layout} does not match the model's {model_layout(model)}")
    session = Session(model, tokenizer, store, config, fingerprint)
    attentions = [layer.self_attn for layer in decoder_layers(model)]
    try:
        if resume:
            session.restore()
        for attn in attentions:
            attn.forward = types.MethodType(_patched_forward(session), attn)
        yield session
    finally:
        for attn in attentions:
            attn.__dict__.pop("forward", None)
        if owns_archive:
            store.close()


def _patched_forward(session: Session):
    def forward(attn, hidden_states, *args, **kwargs):
        memory = session.memories[attn.layer_idx]
        out = retrieval_attention(attn, hidden_states, memory, session.archive, session.config, session.rope,
                                  session.rotation, session.counters.extra)
        return out, None

    return forward
