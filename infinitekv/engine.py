"""The engine: `with enable(model, archive=...) as session:` patches a model's attention with retrieval attention,
feeds it text in chunks, generates, and saves or resumes everything the archive needs to continue a conversation.

    with infinitekv.enable(model, tokenizer=tokenizer, archive="./mem") as session:
        answer = session.ask("What is the pass key?", document=haystack)

On exit the original attention forwards are restored; the weights are never written (tests check their SHA-256).
"""

from __future__ import annotations

import contextlib
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


@dataclass
class Counters:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0
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
        self.rope = Rope(model.model.rotary_emb, self.dtype, self.device)

    # ---- feeding tokens -------------------------------------------------------------------------------------
    def _forward(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            logits = self.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits
        self.token_ids.extend(ids)
        return logits[0, -1].float()

    def feed(self, ids: list[int], progress: bool = False) -> torch.Tensor:
        """Prefill `ids` in chunks; returns the logits after the last one."""
        if not ids:
            raise IKVError("nothing to read: the prompt is empty; pass --prompt, --prompt-file or --question")
        start = time.perf_counter()
        chunk = self.config.chunk_size
        n_chunks = (len(ids) + chunk - 1) // chunk
        for index in range(n_chunks):
            logits = self._forward(ids[index * chunk : (index + 1) * chunk])
            if progress:
                print_progress("prefill", index + 1, n_chunks, len(self.token_ids))
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
        user_text = "\n\n".join(part for part in (document, question) if part)
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
        saved = RetrievalConfig(**meta["config"])
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


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def print_progress(label: str, done: int, total: int, tokens: int) -> None:
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
