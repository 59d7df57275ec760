"""`InfiniteKVCache`: InfiniteKV as a transformers `Cache`, so `model.generate`, streamers, stopping criteria and
pipelines drive it like any other cache.

    with infinitekv.enable(model, archive="./mem") as cache:
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

How it plugs in (transformers 5): `enable()` switches the model to the attention implementation registered here as
"infinitekv" (`AttentionInterface`). The model's own attention modules still project, normalise and apply RoPE; they
hand their post-RoPE queries and keys to `cache.update` (which keeps nothing: the attention function below does the
bookkeeping) and then to the registered function. A forward pre-hook on each attention module tells that function
which cache the call carries (`past_key_values`) and the cos/sin the module used, so it can undo RoPE exactly and run
retrieval attention (attention.py) on pre-RoPE keys. A call that carries no InfiniteKVCache (a direct `model(ids)`,
`use_cache=False`) gets transformers' own SDPA attention and leaves every InfiniteKV state untouched.

Positions: a forward continues the cache, token for token; `position_ids` that do not are refused with a clear error.
One sequence per cache (batch size 1); beam search is refused.

Committed points: `commit()` makes the records and the hot tier durable (disk) or a restore point (RAM). `crop(n)`
returns to the last committed point and `fork()` opens another cache there, sharing the committed records, so
several questions about one document are answered without re-reading it and without one answer leaking into the
next. The archive is append-only: the records a cache writes past the committed point are its own until another cache
of the same archive writes; that one then takes over the tail, and the first must crop back before going on.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import weakref
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from infinitekv import adapters
from infinitekv.attention import ColdTier, LayerMemory, RetrievalConfig, Rope, retrieval_attention, unrotate
from infinitekv.errors import IKVError

ATTENTION = "infinitekv"
STATE_VERSION = 3  # 3: conversation fields optional (model.generate has none); R and mu moved to the archive
_STATE_KEYS = frozenset({"state_version", "config", "transcript", "messages", "pending"})

# attention module -> (cache, cos, sin) for the call in flight; set by the module's pre-hook, read once by the
# attention function (weak keys: a model dropped inside `enable()` is not kept alive)
_routes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Counters:
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    checkpoints: int = 0  # commits made in the middle of a prefill
    forwards_on_fewer_threads: int = 0  # forwards run on fewer threads because others wanted the cores (threads.py)
    extra: dict = field(default_factory=dict)  # cold_tokens_attended and query_tokens, summed over layers by the attention

    def cold_tokens_per_step(self) -> float:
        """Average cold tokens each query token attended, per layer and kv-head (all of them while exact)."""
        return self.extra.get("cold_tokens_attended", 0) / max(1, self.extra.get("query_tokens", 0))


class RoutedLayer(CacheLayerMixin):
    """A decoder layer's slot in a RoutedCache: the cache's `attend` keeps the layer's tokens (so `update` keeps
    nothing), builds its own masks, and holds one sequence (no batches, no beams)."""

    is_compileable = False
    is_croppable = False
    cache_name: ClassVar[str] = "RoutedCache"  # named in the errors below

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        # the attention function stores the chunk (the cache's `attend`): nothing to keep here
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0  # the cache's attention builds its own masks; transformers' covers the new tokens only

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx) -> None:
        raise IKVError(f"beam search is not supported with an {self.cache_name} (it holds one sequence); use greedy "
                       "or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise IKVError(f"an {self.cache_name} holds one sequence; generate one sequence at a time "
                           "(num_return_sequences=1, num_beams=1)")

    def batch_select_indices(self, indices) -> None:
        if len(indices) != 1:
            raise IKVError(f"an {self.cache_name} holds one sequence; generate one sequence at a time")


class RetrievalLayer(RoutedLayer):
    """One decoder layer's slot in an InfiniteKVCache: its hot tier. Cold tokens live in the shared archive."""

    cache_name = "InfiniteKVCache"

    def __init__(self, cache: "InfiniteKVCache", index: int, memory: LayerMemory):
        super().__init__()
        self.cache, self.index, self.memory = cache, index, memory
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.cache.layer_length(self.index)

    def reset(self) -> None:
        raise IKVError("an InfiniteKVCache cannot be reset in place; crop it to a committed point or open a new one")

    def crop(self, tokens_to_remove: int) -> None:
        raise IKVError("an InfiniteKVCache crops only as a whole, to a committed point: cache.crop(n)")


@dataclass
class _Snapshot:
    """A committed point kept in memory: exact hot tier (the whole window, archived tokens too), token ids."""

    token_ids: list
    records: int  # archive tokens per layer at that point
    layers: list  # per layer: (sink_k, sink_v, window_k, window_v, archived)


class _Tail:
    """Shared by the caches of one archive: which of them wrote the records past the committed point."""

    def __init__(self):
        self.owner = None


class RoutedCache(Cache, metaclass=abc.ABCMeta):
    """A Cache that does its layers' attention itself: the attention function registered below hands it each layer's
    post-RoPE query, key and value (`attend`), and the model's pre-hook tells it a forward begins (`begin_forward`).
    InfiniteKVCache is one; the eviction baselines (infinitekv.policies) are the others, on the same path."""

    token_ids: list[int]  # every token this cache has seen (-1 where a call passed embeddings)

    def begin_forward(self, position_ids) -> None:
        """Called before a model forward carrying this cache: its positions must continue the cache."""
        start = self.get_seq_length()
        if position_ids is not None:
            first = int(position_ids.reshape(-1)[0])
            if first != start:
                raise IKVError(
                    f"the inputs start at position {first}, but this {type(self).__name__} holds {start} tokens; "
                    "pass model.generate the whole sequence (cached tokens + new ones), or model(...) only the new "
                    "tokens"
                )

    def prefill_chunk(self, position: int, remaining: int) -> int:
        """How many of `remaining` tokens, the first at `position`, this cache attends as one chunk."""
        return min(remaining, self.config.chunk_size)

    @abc.abstractmethod
    def attend(self, layer: int, query, key, value, rope_tables, scale: float, sliding_window) -> torch.Tensor:
        """One layer's attention: query [1, Hq, T, D], key/value [1, Hk, T, D] post-RoPE (rope_tables: the cos/sin
        the module used) -> [1, T, Hq, D]."""


class InfiniteKVCache(RoutedCache):
    """A transformers Cache whose old tokens live in an InfiniteKV archive; see the module docstring."""

    def __init__(self, model, archive, config: RetrievalConfig, fingerprint: str, _tail: _Tail | None = None):
        self.layout = adapters.layout(model)
        self.fingerprint = fingerprint
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.counters = Counters()
        self.cold = ColdTier(archive, config, Rope(adapters.rotary_embedding(model), self.dtype, self.device),
                             self.counters.extra)
        memories = [LayerMemory(self.layout.n_kv_heads, self.layout.head_dim, self.device, self.dtype)
                    for _ in range(self.layout.n_layers)]
        super().__init__(layers=[RetrievalLayer(self, i, m) for i, m in enumerate(memories)])
        self.token_ids: list[int] = []  # every token this cache has seen (-1 where a call passed embeddings)
        self._tail = _tail or _Tail()
        self._base = archive.committed_tokens  # archive records that are this cache's committed prefix
        self._committed: _Snapshot | None = None
        self._wrote = False  # this cache appended records past the committed point
        self.restored: tuple[dict, dict] = ({}, {})  # what restore() read for others (a Session's conversation)
        self._model = weakref.ref(model)

    # ---- what the rest of the engine reads ------------------------------------------------------------------
    @property
    def archive(self):
        return self.cold.archive

    @property
    def config(self) -> RetrievalConfig:
        return self.cold.config

    @property
    def memories(self) -> list[LayerMemory]:
        return [layer.memory for layer in self.layers]

    def layer_length(self, layer: int) -> int:
        """Tokens layer `layer` has seen: sinks, cold records not also in the window, and the window."""
        memory = self.layers[layer].memory
        # records past the committed point are this cache's only if it wrote them (see _check_tail)
        records = self.archive.layer_tokens(layer) if self._tail.owner is self else self._base
        return memory.sink_k.shape[1] + records - memory.archived + memory.window_len

    # ---- one forward ----------------------------------------------------------------------------------------
    def prefill_chunk(self, position: int, remaining: int) -> int:
        return self.config.next_chunk(position, remaining)

    def begin_forward(self, position_ids) -> None:
        """Called before a model forward carrying this cache (by the model's pre-hook)."""
        self._check_tail()
        super().begin_forward(position_ids)

    def attend(self, layer: int, query, key, value, rope_tables, scale: float, sliding_window) -> torch.Tensor:
        """The registered attention for one layer: query [1, Hq, T, D], key/value [1, Hk, T, D] post-RoPE ->
        [1, T, Hq, D]. Runs retrieval attention chunk by chunk, so one long forward equals chunked feeding."""
        if query.shape[0] != 1:
            raise IKVError(f"an InfiniteKVCache holds one sequence, got a batch of {query.shape[0]}; generate one "
                           "prompt at a time")
        cos, sin = (table[0] if table.dim() == 3 else table for table in rope_tables)
        q, k, v = unrotate(query[0], cos, sin), unrotate(key[0], cos, sin), value[0]
        memory = self.layers[layer].memory
        position, outs = self.layer_length(layer), []
        for a, b in chunk_bounds(self, position, q.shape[1]):
            outs.append(retrieval_attention(self.cold, layer, memory, q[:, a:b], k[:, a:b], v[:, a:b], scale,
                                            sliding_window))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [Hq, T, D]
        if self.archive.layer_tokens(layer) > self.archive.committed_tokens:
            self._tail.owner, self._wrote = self, True
        return out.transpose(0, 1)[None]

    def _check_tail(self) -> None:
        """Before this cache reads or writes the archive: its view must be the committed prefix plus its own tail."""
        archive = self.archive
        if archive.committed_tokens != self._base:
            raise IKVError("another cache of this archive committed since this one's committed point; fork the cache "
                           "that committed (cache.fork()) to continue from the new point")
        if self._wrote and self._tail.owner is not self:
            raise IKVError("this cache's records past the committed point were dropped when another cache of the same "
                           "archive wrote; crop it back to the committed point (cache.crop) or fork again")
        if self._tail.owner is not self and archive.n_tokens > archive.committed_tokens:
            archive.rollback()  # another cache's uncommitted records: it finds out when it is next used
            self._tail.owner = None

    # ---- committed points -----------------------------------------------------------------------------------
    def commit(self, extra_arrays: dict | None = None, extra_meta: dict | None = None) -> None:
        """Make the archive's records and this cache's hot tier one durable point (a restore point in RAM)."""
        self._check_tail()
        arrays = {"token_ids": np.asarray(self.token_ids, dtype=np.int64)}
        for index, memory in enumerate(self.memories):
            # the window's archived tokens are in the records already: a resume decodes them from there
            hot = {"sink_k": memory.sink_k, "sink_v": memory.sink_v,
                   "window_k": memory.window_k[:, memory.archived :], "window_v": memory.window_v[:, memory.archived :]}
            for name, tensor in hot.items():
                arrays[f"layer{index}.{name}"] = tensor.float().cpu().numpy()
        arrays.update(extra_arrays or {})
        meta = {"state_version": STATE_VERSION, "config": asdict(self.config), **(extra_meta or {})}
        self.archive.commit(arrays, meta)
        self._base = self.archive.committed_tokens
        self._tail.owner, self._wrote = None, False
        self._snapshot()

    def _snapshot(self) -> None:
        layers = [(m.sink_k.clone(), m.sink_v.clone(), m.window_k.clone(), m.window_v.clone(), m.archived)
                  for m in self.memories]
        self._committed = _Snapshot(list(self.token_ids), self.archive.committed_tokens, layers)

    def _load_snapshot(self, snapshot: _Snapshot) -> None:
        self.token_ids = list(snapshot.token_ids)
        for memory, (sink_k, sink_v, window_k, window_v, archived) in zip(self.memories, snapshot.layers):
            memory.sink_k, memory.sink_v = sink_k.clone(), sink_v.clone()
            memory.set_window(window_k, window_v, archived)
        self._base = snapshot.records

    def restore(self) -> tuple[dict, dict]:
        """Load the archive's last committed state; returns the arrays and metadata others stored with it."""
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
        saved = checked_state(arrays, meta, len(self.layers), self.archive.path)
        for name in ("sinks", "hot_window", "evict_batch", "rotation_seed"):
            if getattr(saved, name) != getattr(self.config, name):
                raise IKVError(
                    f"--{name.replace('_', '-')} {getattr(self.config, name)} differs from the archive's "
                    f"{getattr(saved, name)}; resume with the archive's settings"
                )
        self.token_ids = arrays["token_ids"].tolist()
        for index, memory in enumerate(self.memories):
            tensors = {name: torch.from_numpy(arrays[f"layer{index}.{name}"]).to(self.device, self.dtype)
                       for name in ("sink_k", "sink_v", "window_k", "window_v")}
            memory.sink_k, memory.sink_v = tensors["sink_k"], tensors["sink_v"]
            memory.set_window(tensors["window_k"], tensors["window_v"])
        self._base = self.archive.committed_tokens
        self._snapshot()
        self.restored = ({"pending_ids": arrays["pending_ids"]} if "pending_ids" in arrays else {}), meta
        return self.restored

    def crop(self, max_length: int) -> None:
        """Go back to the last committed point: `max_length` is its length in tokens (negative: tokens to drop)."""
        target = max_length if max_length >= 0 else len(self.token_ids) + max_length
        committed = len(self._committed.token_ids) if self._committed is not None else 0
        if target != committed:
            raise IKVError(
                f"an InfiniteKVCache crops only to its last committed point ({committed} tokens), not to {target}; "
                "call cache.commit() where you want to come back to"
            )
        if self.archive.committed_tokens != self._base:
            self._check_tail()  # raises: another cache committed
        if self._tail.owner is self:
            self.archive.rollback()
            self._tail.owner = None
        self._wrote = False
        if self._committed is not None:
            self._load_snapshot(self._committed)
        else:
            for memory in self.memories:
                memory.__init__(self.layout.n_kv_heads, self.layout.head_dim, self.device, self.dtype)
            self.token_ids = []

    def fork(self) -> "InfiniteKVCache":
        """Another cache at this one's last committed point, sharing the archive's committed records."""
        model = self._model()
        if model is None:
            raise IKVError("the model this cache belongs to is gone; open a new cache with infinitekv.enable")
        other = InfiniteKVCache(model, self.archive, self.config, self.fingerprint, _tail=self._tail)
        if self._committed is not None:
            other._committed = self._committed
            other._load_snapshot(self._committed)
        return other

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
            # with the model on a GPU, each layer's index and records mirrored there for retrieval (device_retrieval)
            "device_mirror_bytes": sum(_mirror_bytes(index) for index in (self.cold.resident or {}).values()),
        }


def _mirror_bytes(index) -> int:
    """Device memory a layer's mirror holds (its allocated capacity: it grows by doubling)."""
    return sum(t.numel() * t.element_size() for t in (index.sigs, index.weights, index.records) if t is not None)


def checked_state(arrays: dict, meta: dict, n_layers: int, where) -> RetrievalConfig:
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
    if not isinstance(meta.get("transcript", ""), str) or not isinstance(meta.get("messages", []), list):
        raise refuse("a malformed transcript")
    needed = ["token_ids"] + [f"layer{i}.{name}" for i in range(n_layers)
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


# ---- wiring into transformers ---------------------------------------------------------------------------------
def infinitekv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function registered as "infinitekv": the cache's own attention when the call carries a
    RoutedCache (retrieval for an InfiniteKVCache), transformers' SDPA attention otherwise."""
    route = _routes.pop(module, None)
    if route is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    cache, cos, sin = route
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = cache.attend(module.layer_idx, query, key, value, (cos, sin), scale, kwargs.get("sliding_window"))
    return out, None


AttentionInterface.register(ATTENTION, infinitekv_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # calls without an InfiniteKVCache get SDPA's masks


def carried_cache(kwargs: dict):
    """The cache a model, module or generate call carries: transformers 5.24 renamed the argument from
    `past_key_values` to `cache` (and still takes the old name from callers, with a warning)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def returned_cache(output):
    """The cache a model call returns, under either name (see carried_cache)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_argument(model) -> str:
    """The name this transformers gives the cache argument of `model`'s forward (and of generate's model kwargs)."""
    return _cache_argument_of(type(model))


@functools.cache
def _cache_argument_of(model_class) -> str:  # once per class: forward_ids asks on every decode step
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def route_attention(module, args, kwargs):
    """Forward pre-hook on an attention module: remember the cache and RoPE tables of this call."""
    cache = carried_cache(kwargs)
    if isinstance(cache, RoutedCache):
        cos, sin = kwargs["position_embeddings"]
        _routes[module] = (cache, cos, sin)
    else:
        _routes.pop(module, None)


def begin_model_forward(model, args, kwargs):
    """Forward pre-hook on the model: a call carrying a RoutedCache records its token ids and checks that its
    positions continue the cache."""
    cache = carried_cache(kwargs)
    if not isinstance(cache, RoutedCache):
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    length = ids.shape[-1] if ids is not None else embeds.shape[1]
    batch = ids.shape[0] if ids is not None else embeds.shape[0]
    if batch != 1:
        raise IKVError(f"this {type(cache).__name__} holds one sequence, got a batch of {batch}; generate one prompt "
                       "at a time, with greedy or sampling (no beam search, num_return_sequences=1)")
    cache.begin_forward(kwargs.get("position_ids"))
    cache.token_ids.extend(ids[0].tolist() if ids is not None else [-1] * length)


def chunk_bounds(cache: RoutedCache, position: int, length: int) -> list[tuple[int, int]]:
    """The chunks (begin, end), offsets into `length` tokens starting at `position`, that `cache` attends apart."""
    bounds, begin = [], 0
    while begin < length:
        end = begin + cache.prefill_chunk(position + begin, length - begin)
        bounds.append((begin, end))
        begin = end
    return bounds


def forward_ids(cache: InfiniteKVCache, model, ids: list[int]) -> torch.Tensor:
    """Feed `ids` through the model with `cache`; the logits after the last one (float32)."""
    input_ids = torch.tensor([ids], device=cache.device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache}).logits
    return logits[0, -1].float()


