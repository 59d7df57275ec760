"""Retrieval attention: one layer's attention over sinks + cold tokens + hot window + the current chunk.

Read top to bottom, for one decoder layer and one chunk of C new tokens (C = 1 while decoding):

1. the model's own attention module projects the chunk (biases, Qwen3's q/k norms and RoPE included) and hands it
   to the registered attention function (cache.py), which undoes RoPE with the module's own tables (`unrotate`):
   queries and keys arrive here pre-RoPE, and keys stay pre-RoPE everywhere we keep them;
2. while the whole sequence fits `dense_up_to` (by default the model's trained window) attention is exact: the
   window keeps every token, at its true position, and tokens older than `hot_window` are only *written* to the
   cold tier (so the archive is the same either way, and durable); the first chunk that would pass it drops them
   from the window, and from then on the cold tier is read by retrieval;
3. retrieval, per query: the chunk is split into selection blocks of `select_block` queries; for each block and
   kv-head, the first stage scans the cold tier's signatures with the block's mean query (`search.search_many`)
   for a shortlist; the shortlist is reranked with the int8 keys (max of q.(k - mu) over the block's queries and
   the query heads of their GQA group) and the block keeps the `top_k_cold` best, shared by its queries (a decode
   step is a block of one). Past `cluster_segment` cold tokens the clustered ones reach the shortlist through the
   two-level index (index.py) and only the rest are scanned. On the CPU a prefill block's selection is one
   `search.search_and_rerank` call per layer, and a decode step's, through to its RoPE'd keys and values, one
   `token_retrieval` call. Queries are turned by RoPE to the typical distance of a cold key first;
4. positions: exact attention uses true positions; retrieval the compact layout (sinks 0..s-1, each query's
   retrieved tokens s..s+r-1 in their original order, then the window and the chunk), so no relative distance
   exceeds the trained window;
5. attention: one softmax over the shared keys (sinks, window, causal chunk) and the query's retrieved keys;
6. move the chunk into the hot tier and write the oldest window tokens beyond `hot_window + evict_batch - 1` to
   the cold tier as records (`codec.encode_records`).

Past `dense_up_to`, cost per chunk is O(cold tokens) for the scan plus O(C * (sinks + top_k + window + C)) for
attention, so prefill grows about linearly with length instead of quadratically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from infinitekv import adapters, codec, device_retrieval, search, token_retrieval
from infinitekv.errors import IKVError
from infinitekv.index import ClusterIndex

PROBE = 4  # two-level: cluster members scored by signature per place in the shortlist


@dataclass
class RetrievalConfig:
    """Retrieval settings. Sizes left None are derived from the model's config by `for_model`."""

    sinks: int = 4  # first tokens of the sequence, always attended (attention sinks)
    hot_window: int | None = None  # most recent tokens kept exact
    top_k_cold: int | None = None  # cold tokens each query retrieves per kv-head; 0: never read the cold tier
    shortlist: int | None = None  # first-stage candidates per kv-head, reranked with dequantised keys
    select_block: int | None = None  # queries sharing one retrieval during prefill (decode: every token retrieves)
    chunk_size: int | None = None  # prefill chunk
    # prefill chunk while attention is still exact (the sequence within dense_up_to): each chunk is a few hundred
    # small parallel regions per layer, and on a busy machine every region waits for a descheduled thread, so the
    # exact phase reads in fewer, larger chunks (measured at 4,096 tokens with one busy process beside it: chunks
    # of 512 made the engine's prefill 1.9x the full cache's time, one chunk 1.0x). None: 8 chunk_size
    dense_chunk_size: int | None = None
    evict_batch: int | None = None  # the window may overshoot by this much before a batch moves to the cold tier
    search_mode: str = "weighted"  # "weighted" (float query against key bits) or "hamming"
    search_backend: str = "auto"
    rotation_seed: int = 0
    # sequences up to this many tokens are attended exactly, every token at its true position (the cold tier is
    # written, never read); longer ones switch to retrieval in the compact layout. None: the model's trained window
    dense_up_to: int | None = None
    # past this many cold tokens a layer's first stage goes two-level: each complete segment of this many tokens is
    # clustered by key and a query reranks the members of its best clusters (index.py), so a step's cost stops
    # growing with the context; the tokens after the last complete segment are scanned flat. 0: always flat
    cluster_segment: int = 16384
    # where retrieved tokens sit in the compact layout: the `near_picks` best of a block's picks (by the rerank's
    # score) right before the window, the others `far_gap` positions further back. On SmolLM2 at 32k, all 64 picks
    # at a near distance pulled the model's answer away from a fact inside its own window, and all of them pushed
    # back made it ignore a retrieved needle (BENCHMARKS.md, "Where the retrieved tokens sit"). None: near_picks
    # 1/8 of top_k_cold, far_gap half the model's attention reach (less where the layout would not fit it)
    near_picks: int | None = None
    far_gap: int | None = None

    @classmethod
    def for_model(cls, model_config, **overrides) -> "RetrievalConfig":
        """Settings for one model: what the caller set, and the rest derived from the model's config.

        Exact attention for as long as the model was trained to attend; past it, a hot window of 1/8 of the
        model's attention reach (at most 1,024 tokens: the per-step cost, not the context, bounds it), prefill
        chunks of half the hot window, and a cold budget of 1/16 of the hot window per query and kv-head, reranked
        from a shortlist 16 times that; the best 1/8 of each block's picks sit next to the window and the rest half
        the reach further back (near_picks, far_gap). The compact layout (sinks + retrieved + gap + window + chunk)
        then spans under the reach, so no query sees a key farther than the model ever did.
        """
        config = cls(**overrides)
        if config.hot_window is None:
            config.hot_window = max(16, min(1024, adapters.attention_reach(model_config) // 8))
        derived = {"chunk_size": config.hot_window // 2, "evict_batch": config.hot_window // 16,
                   "top_k_cold": config.hot_window // 16}
        for name, value in derived.items():
            if getattr(config, name) is None:
                setattr(config, name, max(1, value))
        if config.dense_chunk_size is None:
            config.dense_chunk_size = 8 * config.chunk_size
        if config.shortlist is None:
            config.shortlist = max(16 * config.top_k_cold, 16)
        if config.select_block is None:
            config.select_block = min(32, config.chunk_size)
        if config.dense_up_to is None:
            config.dense_up_to = adapters.trained_window(model_config)
        if config.near_picks is None:
            config.near_picks = max(1, config.top_k_cold // 8)
        if config.far_gap is None:
            reach = adapters.attention_reach(model_config)  # compact_span counts an unset gap as 0
            config.far_gap = max(0, min(reach // 2, reach - config.compact_span()))
        return config

    def next_chunk(self, position: int, remaining: int) -> int:
        """How many of `remaining` prefill tokens, the first at `position`, go through attention together.

        Chunks of `chunk_size`, except that whole ones ending within `dense_up_to` (exact attention) go together,
        up to `dense_chunk_size` tokens: a long chunk is a union of the chunks reading `chunk_size` at a time would
        feed, and the archive takes it in pieces of `chunk_size` (`retrieval_attention`), so the logits and records
        are those of reading `chunk_size` at a time up to float rounding (tested; on the CPU exact attention takes
        the whole chunk at once, see `exact_attention`). A last, partial chunk stays on its own. The engine's feed
        and a long forward both cut by this rule, so they attend in the same chunks: a read resumed from a
        checkpoint feeds exactly the chunks the uninterrupted one would have."""
        chunk = self.chunk_size
        if self.top_k_cold and remaining >= chunk:
            dense = min(self.dense_chunk_size, self.dense_up_to - position, remaining) // chunk * chunk
            if dense > 0:
                return dense
        return min(remaining, chunk)

    def compact_span(self) -> int:
        """The largest position the compact layout uses: sinks, retrieved, the far gap, window and a chunk."""
        return (self.sinks + self.top_k_cold + (self.far_gap or 0) + self.hot_window + self.evict_batch
                + self.chunk_size)

    def gap_before_near(self, retrieved: int, n_cold: int) -> int:
        """Positions left empty between a block's far picks and its near ones (see near_picks): none when every pick
        is near, and never so many that a token sits farther back than it truly is."""
        return max(0, min(self.far_gap or 0, n_cold - retrieved)) if retrieved > self.near_picks else 0


class LayerMemory:
    """The hot tier of one layer, pre-RoPE. Cold tokens live in the archive; cold token i is position sinks + i.

    The window lives in a buffer with spare capacity so a decode step appends in place. Its first `archived`
    tokens are already in the archive too: while attention is exact the window keeps them (they are the exact
    keys the full model would use), and the first step past `dense_up_to` drops them. `decode_view` caches the
    RoPE'd keys of the window; they stay valid until the layout changes (a sink is added, the number of retrieved
    tokens changes, or the window drops tokens), so a decode step rotates one new key and the retrieved ones.
    """

    def __init__(self, n_heads: int, head_dim: int, device, dtype):
        empty = torch.zeros(n_heads, 0, head_dim, device=device, dtype=dtype)
        self.sink_k = empty  # [Hk, s, D]
        self.sink_v = empty
        self._window_k = empty  # [Hk, capacity, D]; the first window_len are live
        self._window_v = empty
        self.window_len = 0
        self.archived = 0  # oldest window tokens that are also cold records
        self.decode_view: DecodeView | None = None

    @property
    def window_k(self) -> torch.Tensor:  # [Hk, w, D]
        return self._window_k[:, : self.window_len]

    @property
    def window_v(self) -> torch.Tensor:
        return self._window_v[:, : self.window_len]

    def set_window(self, k: torch.Tensor, v: torch.Tensor, archived: int = 0) -> None:
        self._window_k, self._window_v = k.clone(), v.clone()
        self.window_len = k.shape[1]
        self.archived = archived
        self.decode_view = None

    def append_window(self, k: torch.Tensor, v: torch.Tensor) -> None:
        end = self.window_len + k.shape[1]
        if end > self._window_k.shape[1]:
            capacity = max(end, 2 * self._window_k.shape[1])
            grown_k = self._window_k.new_empty(k.shape[0], capacity, k.shape[2])
            grown_v = self._window_v.new_empty(k.shape[0], capacity, k.shape[2])
            grown_k[:, : self.window_len] = self.window_k
            grown_v[:, : self.window_len] = self.window_v
            self._window_k, self._window_v = grown_k, grown_v
        self._window_k[:, self.window_len : end] = k
        self._window_v[:, self.window_len : end] = v
        self.window_len = end

    def drop_archived(self) -> None:
        """Leave exact attention: the window forgets the tokens the archive holds."""
        n = self.archived
        if n == 0:
            return
        remaining = self.window_len - n
        self._window_k[:, :remaining] = self._window_k[:, n : self.window_len].clone()
        self._window_v[:, :remaining] = self._window_v[:, n : self.window_len].clone()
        self.window_len = remaining
        self.archived = 0
        self.decode_view = None


@dataclass
class DecodeView:
    """RoPE'd keys and values laid out as [sinks | retrieved slots | window | spare], for one-token steps."""

    keys: torch.Tensor  # [Hk, capacity, D]
    values: torch.Tensor
    sinks: int
    retrieved: int
    window: int  # window tokens already in place
    shift: int  # positions the compact layout skipped when they were computed (0: true positions)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [..., T, D]; cos, sin: [T, D]
    return x * cos + rotate_half(x) * sin


class Rope:
    """cos/sin tables from the model's own inverse frequencies (so scaled RoPE variants are honoured), computed in
    float64 once per range of positions and kept in the model's dtype on its device; a step only indexes them."""

    def __init__(self, rotary_emb: torch.nn.Module, dtype, device):
        self.inv_freq = rotary_emb.inv_freq.detach().double().cpu()
        self.scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))
        self.dtype, self.device = dtype, device
        self.cos = self.sin = torch.empty(0, 2 * len(self.inv_freq), dtype=dtype, device=device)

    def _grow(self, size: int) -> None:
        size = max(size, 2 * self.cos.shape[0], 4096)
        angles = torch.arange(size, dtype=torch.float64)[:, None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        self.cos = (angles.cos() * self.scaling).to(self.device, self.dtype)
        self.sin = (angles.sin() * self.scaling).to(self.device, self.dtype)

    def at(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, D] for positions start .. start + length - 1."""
        if start + length > self.cos.shape[0]:
            self._grow(start + length)
        return self.cos[start : start + length], self.sin[start : start + length]

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """RoPE at consecutive positions start, start + 1, ... along x's second-to-last axis."""
        cos, sin = self.at(start, x.shape[-2])
        return apply_rope(x, cos, sin)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo RoPE applied with these cos/sin (the model's own tables for the chunk): x [..., T, D]; cos, sin [T, D].

    R(p) is a rotation scaled by the RoPE variant's attention scaling a (cos^2 + sin^2 = a^2), so R(p)^-1 x is
    R(-p) x / a^2.
    """
    scale_sq = (cos[..., :1] ** 2 + sin[..., :1] ** 2)
    return (x * cos - rotate_half(x) * sin) / scale_sq


def select_blocks(length: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, length)) for start in range(0, length, block)]


def selection_queries(q: torch.Tensor, distance: int, rope: Rope, n_kv_heads: int) -> torch.Tensor:
    """Queries turned so that q'.k (pre-RoPE k) approximates the logit a cold key gets under RoPE.

    RoPE makes the logit (R_p q).(R_j k) = (R_(p-j) q).k: it depends on the distance p - j. In the compact layout
    retrieved keys sit between w + 1 and w + r positions before the query, so every query is turned by the middle
    of that span (measured on SmolLM2 at 2k: median KL 0.0088 unturned -> 0.0043 turned, top-1 0.91 -> 0.95).
    q: [Hq, C, D] -> float32 [Hk, C, G, D] on q's device.
    """
    n_q_heads, length, head_dim = q.shape
    cos, sin = rope.at(distance, 1)
    turned = apply_rope(q.detach().float(), cos.float(), sin.float())
    return turned.view(n_kv_heads, -1, length, head_dim).transpose(1, 2)


def turned_step_query(q: torch.Tensor, distance: int, rope: Rope, n_kv_heads: int) -> np.ndarray:
    """`selection_queries` for one decode step, in numpy (the same float32 products and sums, so the same bits,
    without a torch call per operation): q [Hq, 1, D] -> float32 [Hk, G, D]."""
    cos, sin = (t.float().cpu().numpy() for t in rope.at(distance, 1))
    x = q[:, 0].detach().float().cpu().numpy()
    half = x.shape[-1] // 2
    turned = x * cos + np.concatenate((-x[:, half:], x[:, :half]), axis=-1) * sin
    return turned.reshape(n_kv_heads, -1, x.shape[-1])


def decode_cold(archive, layer: int, ids: np.ndarray):
    """Dequantised pre-RoPE keys and values of cold tokens ids [Hk, ...] (each head its own ids): [Hk, ..., D]."""
    rotation, key_mean = archive.rotation, archive.key_mean(layer)  # the R and mu these records were written with
    rotated, values = codec.decode_rows(archive.records(layer), ids, rotation.shape[0])
    n_heads, head_dim = ids.shape[0], rotation.shape[0]
    keys = rotated.reshape(n_heads, -1, head_dim) @ rotation + key_mean[:, None, :]
    return keys.reshape(rotated.shape), values


def select_cold_blocks(archive, layer: int, q_grouped: np.ndarray, blocks, config: RetrievalConfig,
                       retrieved: int, clusters: ClusterIndex | None = None) -> np.ndarray:
    """The cold tokens each selection block attends, per kv-head: ids [Hk, n_blocks, r] sorted ascending,
    r = `retrieved`; the queries of one block share them.

    q_grouped: [Hk, C, G, D] float32 pre-RoPE queries, G query heads per kv-head. Per block, the first stage scans
    the signatures with the block's mean query for a shortlist; the rerank scores the shortlist with the int8 keys
    for every query and query head of the block and the block keeps the `retrieved` best by the max over them.
    Why shared and not each query's own best from the same shortlist: measured on the 32k needle (SmolLM2,
    defaults), per-query picks missed it and block-shared picks answered it; per-query picks also left KL at 8k
    unchanged. A token one query of the block needs is then seen by its neighbours too, which is what a fact spread
    over a few consecutive tokens needs. Decode steps are blocks of one query.
    clusters: the layer's two-level index; the tokens it covers reach the rerank through it (the members of each
    block's best clusters) and only the rest are scanned flat, the `shortlist` shared between the two. With the
    numba backend, the scan, the rerank and the pick are one call (`search.search_and_rerank`); `retrieve` takes a
    decode step's from token_retrieval instead, which also decodes and places the picks.
    With the model on a GPU, device_retrieval does the same on the device.
    """
    q_rotated = q_grouped @ archive.rotation.T  # scores against R(k - mu): q.(k - mu) = (R q).(R (k - mu))
    q_summed = q_rotated.sum(axis=2)  # [Hk, C, D]: one first-stage query per kv-head
    block_means = np.stack([q_summed[:, a:b].mean(axis=1) for a, b in blocks])  # [n_blocks, Hk, D]
    starts = np.array([a for a, _ in blocks] + [blocks[-1][1]])
    tail_k, clustered = shortlist_sources(archive, layer, q_rotated, blocks, config, clusters)
    covered = clustered.covered if clustered is not None else 0
    if search.resolve_backend(config.search_backend) == "numba":  # the same picks in one call
        return search.search_and_rerank(archive.signatures(layer), archive.key_weights(layer), archive.records(layer),
                                        block_means, q_rotated, starts, tail_k, retrieved, config.search_mode,
                                        clustered)
    _, shortlist = search.search_many(
        archive.signatures(layer), archive.key_weights(layer), block_means, tail_k,
        mode=config.search_mode, backend=config.search_backend, exclude_before=covered, by_index=True,
    )  # [n_blocks, Hk, L], in token order: equal rerank scores then go to the lower token id
    if clustered is not None:  # clustered tokens all come before the flat tail: joined, the shortlist stays in order
        scores = search.score_ids(archive.signatures(layer), archive.key_weights(layer), block_means, clustered.ids)
        _, keep = search.top_k_rows(scores, clustered.keep, by_index=True)
        shortlist = np.concatenate([np.take_along_axis(clustered.ids, keep, axis=-1), shortlist], axis=-1)
    # max over the query heads of the group and the queries of the block: one head's strong interest (an induction
    # head copying a number) must not be averaged away by its neighbours (measured: summing lost a digit at 12k)
    by_block = codec.score_shortlist(archive.records(layer), shortlist, q_rotated, starts)  # [Hk, n_blocks, L]
    # equal tokens have equal keys at layer 0: ties are common. Picked by index from a shortlist in token order,
    # the ids come out sorted
    _, best = search.top_k_rows(by_block, retrieved, by_index=True)
    return np.take_along_axis(shortlist.transpose(1, 0, 2), best, axis=-1)  # [Hk, n_blocks, r]


def shortlist_sources(archive, layer: int, q_rotated: np.ndarray, blocks, config: RetrievalConfig,
                      clusters: ClusterIndex | None) -> tuple[int, search.ClusterCandidates | None]:
    """How each block's shortlist is drawn: (tail_k, clustered), the `tail_k` best of the tokens the two-level
    index does not cover by a flat scan and, where it covers some, the best of its clusters' members (None: all
    flat). q_rotated [Hk, C, G, D]: the selection queries in the signatures' basis."""
    covered = clusters.covered if clusters is not None else 0
    if not covered:
        return config.shortlist, None
    n_cold = len(archive.signatures(layer))
    # the shortlist is shared between the clusters and the flat tail in proportion to the tokens each holds, so
    # the rerank sees as many candidates as with the flat scan (measured on the 32k passkey grid: handing it the
    # clusters' `shortlist` plus the tail's lost the one needle the flat scan found, as a 4,096 shortlist did)
    tail_k = -(-config.shortlist * (n_cold - covered) // n_cold)
    per_head = np.stack([q_rotated[:, a:b].mean(axis=1) for a, b in blocks])  # [n_blocks, Hk, G, D]
    # probe PROBE times as many clusters' members as there are places, and keep the best by their signatures:
    # one rare token (a planted number) in a cluster of ordinary ones still reaches the rerank
    return tail_k, search.ClusterCandidates(clusters.candidates(per_head, PROBE * (config.shortlist - tail_k)),
                                            covered, config.shortlist - tail_k)


def select_cold(archive, layer: int, q_grouped: np.ndarray, blocks, config: RetrievalConfig,
                retrieved: int) -> np.ndarray:
    """`select_cold_blocks`, per query: ids [Hk, C, r], each query given its block's tokens."""
    block_of_query = np.repeat(np.arange(len(blocks)), [b - a for a, b in blocks])
    return select_cold_blocks(archive, layer, q_grouped, blocks, config, retrieved)[:, block_of_query]


@dataclass
class ColdTier:
    """What every layer's retrieval attention shares: the archive (its records, and the R and mu that decode them),
    the settings, the RoPE tables, and counters (cold_tokens_attended and query_tokens, summed over layers)."""

    archive: object
    config: RetrievalConfig
    rope: Rope
    counters: dict
    clusters: dict = field(default_factory=dict)  # layer -> ClusterIndex, built as segments complete
    resident: dict | None = None  # layer -> search.ResidentIndex (with records) while retrieval runs on the GPU
    device_basis: dict = field(default_factory=dict)  # R and each layer's mu on the model's device
    slot_tables: tuple | None = None  # ((sinks, retrieved, near, gap), (cos, sin) at the retrieved slots)

    def __post_init__(self):
        if retrieval_on_device(self.config, self.rope.device):
            self.resident = {}

    def cluster_index(self, layer: int) -> ClusterIndex | None:
        """The layer's two-level index, brought up to date with its records; None while the flat scan is used."""
        segment = self.config.cluster_segment
        if not segment or len(self.archive.signatures(layer)) < segment:
            return None
        if layer not in self.clusters:
            self.clusters[layer] = ClusterIndex(segment)
        self.clusters[layer].sync(self.archive, layer)
        return self.clusters[layer]


    def resident_index(self, layer: int) -> search.ResidentIndex | None:
        """The layer's index and records on the model's GPU, brought up to date with the archive; None: retrieval
        runs on the CPU."""
        if self.resident is None:
            return None
        if layer not in self.resident:
            self.resident[layer] = search.ResidentIndex(self.rope.device, with_records=True)
        self.resident[layer].sync(self.archive, layer)
        return self.resident[layer]

    def fuses_token_steps(self) -> bool:
        """Whether a decode step's retrieval is one numba call (token_retrieval): weighted search on the CPU."""
        return (self.resident is None and self.config.search_mode == "weighted"
                and search.resolve_backend(self.config.search_backend) == "numba")

    def slot_rope(self, sinks: int, retrieved: int, near: int, gap: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin float32 [retrieved, D] at the retrieved slots' positions (`retrieve`'s layout), kept per layout:
        a decode step only reads them."""
        layout = (sinks, retrieved, near, gap)
        if self.slot_tables is None or self.slot_tables[0] != layout:  # every layer's step shares one layout
            positions = slot_positions(sinks, retrieved, near, gap, "cpu")
            cos, sin = self.rope.at(0, sinks + gap + retrieved)
            self.slot_tables = layout, tuple(t.cpu()[positions].float().numpy() for t in (cos, sin))
        return self.slot_tables[1]

    def basis_on_device(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """R and the layer's mu (fixed at its first spill) as float32 tensors on the model's device."""
        if layer not in self.device_basis:
            as_tensor = lambda a: torch.from_numpy(np.array(a, np.float32)).to(self.rope.device)  # noqa: E731
            self.device_basis[layer] = (as_tensor(self.archive.rotation), as_tensor(self.archive.key_mean(layer)))
        return self.device_basis[layer]


def retrieval_on_device(config: RetrievalConfig, device) -> bool:
    """Whether retrieval runs on the model's GPU (device_retrieval): search_backend 'cuda', or 'auto' with the model
    on a CUDA device and the scan kernel built; weighted search only. Else on the CPU (the same selection, summed in
    another order)."""
    on_gpu = torch.device(device).type == "cuda"
    if config.search_backend == "cuda":
        why_not = search.cuda_scan_ready() if on_gpu else f"the model is on {device}, not a GPU"
        if not why_not and config.search_mode != "weighted":
            why_not = f"search_mode {config.search_mode!r} has no device path (weighted has)"
        if why_not:
            raise IKVError(f"search_backend='cuda' cannot run: {why_not}; use search_backend='auto'")
        return True
    return (config.search_backend == "auto" and on_gpu and config.search_mode == "weighted"
            and search.cuda_scan_ready() is None)


def retrieval_attention(cold: ColdTier, layer: int, memory: LayerMemory, q, k, v, scale: float,
                        sliding_window: int | None = None) -> torch.Tensor:
    """One layer's attention for one chunk. q [Hq, C, D], k and v [Hk, C, D], pre-RoPE -> [Hq, C, D].

    sliding_window: the layer attends only that many most recent tokens (Mistral, Qwen2); honoured while attention
    is exact, and implied past it (the compact layout spans less than the window).
    """
    archive, config = cold.archive, cold.config
    length = q.shape[1]
    n_cold = len(archive.signatures(layer))
    s = memory.sink_k.shape[1]
    end = s + n_cold - memory.archived + memory.window_len + length  # the sequence's length after this chunk
    dense = config.top_k_cold > 0 and end <= config.dense_up_to
    if dense and memory.archived < n_cold:  # resumed from an archive: the window gets its cold tokens back
        restore_exact_window(memory, archive, layer, n_cold)
    if not dense:
        memory.drop_archived()
    retrieved = 0 if dense else min(config.top_k_cold, n_cold)
    gap = config.gap_before_near(retrieved, n_cold)
    counters = cold.counters
    counters["cold_tokens_attended"] = counters.get("cold_tokens_attended", 0) + length * (
        n_cold if dense else retrieved)
    counters["query_tokens"] = counters.get("query_tokens", 0) + length
    shift = n_cold - retrieved - gap if not dense else 0  # positions skipped by the compact layout
    first = end - length - shift  # where the chunk starts in the layout
    window = sliding_window if dense else None
    if length == 1:
        out = decode_step(cold, layer, memory, (q, k, v), scale, retrieved, first, shift, window)
    else:
        memory.decode_view = None
        out = chunk_attention(cold, layer, memory, (q, k, v), scale, retrieved, first, window)
    # the archive takes a long exact chunk in pieces of chunk_size, so its records, and the key mean fixed at the
    # first spill, do not depend on how the exact phase was chunked
    for a in range(0, length, config.chunk_size):
        update_hot_tier(cold, layer, memory, k[:, a : a + config.chunk_size], v[:, a : a + config.chunk_size], dense)
    return out


def restore_exact_window(memory: LayerMemory, archive, layer: int, n_cold: int) -> None:
    """Put the cold tokens the window lacks back in front of it, dequantised (after a resume inside the span)."""
    missing = n_cold - memory.archived
    ids = np.broadcast_to(np.arange(missing), (memory.sink_k.shape[0], missing))
    keys, values = decode_cold(archive, layer, ids)
    as_tensor = lambda a: torch.from_numpy(a).to(memory.sink_k.device, memory.sink_k.dtype)  # noqa: E731
    memory.set_window(torch.cat([as_tensor(keys), memory.window_k], dim=1),
                      torch.cat([as_tensor(values), memory.window_v], dim=1), archived=n_cold)


def retrieve(cold: ColdTier, layer: int, memory: LayerMemory, q, blocks, retrieved: int):
    """Each selection block's retrieved keys, RoPE'd at their compact positions, and values: [Hk, n_blocks, r, D]
    each (the queries of a block share them, so they are decoded and turned once per block, not per query).

    The picks sit in token order from position s (sinks) on; with a far gap (RetrievalConfig.near_picks), the block's
    `near_picks` best come last, in token order too, after the gap (`near_last`)."""
    n_kv_heads = memory.sink_k.shape[0]
    s, w = memory.sink_k.shape[1], memory.window_len
    distance = w + (retrieved + 1) // 2
    if blocks == [(0, 1)] and cold.fuses_token_steps():  # a decode step: one numba call, RoPE'd in slot order
        keys, values = token_retrieval_keys(cold, layer, memory, turned_step_query(q, distance, cold.rope, n_kv_heads),
                                            retrieved)
        return keys[:, None].to(q.device, q.dtype), values[:, None].to(q.device, q.dtype)
    turned = selection_queries(q, distance, cold.rope, n_kv_heads)
    index = cold.resident_index(layer)
    if index is not None:  # on the GPU: the same steps in torch, no host crossing
        rotation, key_mean = cold.basis_on_device(layer)
        ids = device_retrieval.select_blocks_on_device(index, turned @ rotation.T, blocks, cold.config.shortlist,
                                                       retrieved)
        keys, values = device_retrieval.decode_on_device(index, ids, rotation, key_mean)
    else:
        ids = select_cold_blocks(cold.archive, layer, turned.cpu().numpy(), blocks, cold.config, retrieved,
                                 cold.cluster_index(layer))
        keys, values = (torch.from_numpy(a) for a in decode_cold(cold.archive, layer, ids))
    device, dtype = q.device, q.dtype
    keys, values = keys.to(device), values.to(device, dtype)
    gap = cold.config.gap_before_near(retrieved, len(cold.archive.signatures(layer)))
    if not gap:
        return cold.rope.rotate(keys.to(dtype), s), values
    near = cold.config.near_picks
    order = near_last(turned, keys, blocks, near)[..., None]  # [Hk, n_blocks, r, 1]
    keys = keys.gather(2, order.expand_as(keys)).to(dtype)
    values = values.gather(2, order.expand_as(values))
    positions = slot_positions(s, retrieved, near, gap, device)
    cos, sin = cold.rope.at(0, s + gap + retrieved)
    return apply_rope(keys, cos[positions], sin[positions]), values


def slot_positions(sinks: int, retrieved: int, near: int, gap: int, device) -> torch.Tensor:
    """The compact positions of a block's retrieved slots: from the sinks on, the last `near` slots `gap` further."""
    positions = torch.arange(sinks, sinks + retrieved, device=device)
    positions[retrieved - near :] += gap
    return positions


def token_retrieval_keys(cold: ColdTier, layer: int, memory: LayerMemory, turned: np.ndarray, retrieved: int):
    """`retrieve` for one decode step in one numba call (token_retrieval): turned [Hk, G, D] -> keys (RoPE'd),
    values, float32 tensors [Hk, r, D] in slot order."""
    archive, config = cold.archive, cold.config
    rotated = turned @ archive.rotation.T  # as select_cold_blocks turns them, so the picks are the same
    tail_k, clustered = shortlist_sources(archive, layer, rotated[:, None], [(0, 1)], config,
                                          cold.cluster_index(layer))
    gap = config.gap_before_near(retrieved, len(archive.signatures(layer)))
    near = config.near_picks if gap else 0
    cos, sin = cold.slot_rope(memory.sink_k.shape[1], retrieved, near, gap)
    picks = token_retrieval.TokenPicks(tail_k, retrieved, near, cos, sin, clustered)
    _, keys, values = token_retrieval.retrieve_token(archive, layer, turned, rotated, picks)
    return torch.from_numpy(keys), torch.from_numpy(values)


def near_last(turned: torch.Tensor, keys: torch.Tensor, blocks, near: int) -> torch.Tensor:
    """Slot order for each block's picks, its `near` best last: indices [Hk, n_blocks, r] into the picks (which are
    in token order), the far ones first and then the near ones, each in token order.

    turned: the selection queries [Hk, C, G, D] float32; keys: the picks' pre-RoPE keys [Hk, n_blocks, r, D]. A
    pick's score is the rerank's: the max over the block's queries and query heads of q.k."""
    n_heads, length, group, head_dim = turned.shape
    block = blocks[0][1] - blocks[0][0]
    n_blocks = len(blocks)
    # a short last block is padded with repeats of its last query, which leave its max alone
    rows = torch.clamp(torch.arange(n_blocks * block, device=turned.device), max=length - 1)
    queries = turned[:, rows].reshape(n_heads, n_blocks, block * group, head_dim)
    scores = (queries @ keys.float().transpose(-1, -2)).amax(dim=2)  # [Hk, n_blocks, r]
    # equal scores (a repeated token's equal keys) go to the later pick: it sits nearer the window in the text too
    best_last = torch.argsort(scores.flip(-1), dim=-1, descending=True, stable=True)[..., :near]
    is_near = torch.zeros(scores.shape, dtype=torch.int8, device=scores.device)
    is_near.scatter_(-1, scores.shape[-1] - 1 - best_last, 1)
    return torch.argsort(is_near, dim=-1, stable=True)


def sliding_mask(query_start: int, length: int, n_keys: int, window: int, device) -> torch.Tensor:
    """True where query i (at position query_start + i) may see key j (at position j): causal, and closer than
    `window` (transformers' sliding-window convention: a token sees itself and the window - 1 before it)."""
    queries = torch.arange(query_start, query_start + length, device=device)[:, None]
    keys = torch.arange(n_keys, device=device)[None, :]
    return (keys <= queries) & (queries - keys < window)


def chunk_attention(cold: ColdTier, layer: int, memory: LayerMemory, qkv, scale: float, retrieved: int, first: int,
                    window: int | None) -> torch.Tensor:
    """A prefill chunk: shared keys (sinks, window, causal chunk) plus the keys each query's block retrieved."""
    q, k, v = qkv
    rope = cold.rope
    n_q_heads, length, head_dim = q.shape
    n_kv_heads = k.shape[0]
    w = memory.window_len
    keys = torch.cat([rope.rotate(memory.sink_k, 0), rope.rotate(memory.window_k, first - w),
                      rope.rotate(k, first)], dim=1)  # [Hk, S, D]
    values = torch.cat([memory.sink_v, memory.window_v, v], dim=1)
    queries = rope.rotate(q, first)
    if not retrieved:
        return exact_attention(queries, keys, values, scale, window, cold.config.chunk_size)
    block = cold.config.select_block
    cold_k, cold_v = retrieve(cold, layer, memory, q, select_blocks(length, block), retrieved)
    return attend_with_retrieved(queries, keys, values, (cold_k, cold_v, block), scale)


def exact_attention(queries, keys, values, scale: float, window: int | None, rows: int) -> torch.Tensor:
    """Causal attention of a chunk sitting at the end of its keys: queries [Hq, C, D], keys, values [Hk, S, D].

    On the CPU, two fused attentions merged by their log-sum-exp: the keys before the chunk (no mask, the group's
    query heads folded into one sequence per kv-head) and the chunk's own keys (causal, square): SDPA with a
    lower-right causal mask takes a slower kernel there (BENCHMARKS.md, speed). So a long chunk equals feeding it a
    chunk at a time up to float rounding, not bit for bit. Elsewhere, and on a sliding-window layer whose chunk
    reaches past the window, SDPA with its mask, `rows` queries at a time against the keys up to their last one (a
    lower-right mask over the whole chunk would make the kernel read a C x S mask and score the masked corner)."""
    n_q_heads, length, _ = queries.shape
    n_keys = keys.shape[1]
    if queries.device.type == "cpu" and (window is None or n_keys <= window):
        return merge_attention(prefix_and_causal_parts(queries, keys, values, scale)).to(queries.dtype)
    if length == n_keys and window is None:
        bounds = [(0, length)]  # one square causal attention: no mask to read, nothing to skip
    else:
        bounds = [(a, min(a + rows, length)) for a in range(0, length, rows)]
    outs = []
    for a, b in bounds:
        visible = n_keys - length + b
        mask = (causal_lower_right(b - a, visible) if window is None or visible <= window
                else sliding_mask(visible - (b - a), b - a, visible, window, queries.device))
        outs.append(F.scaled_dot_product_attention(
            queries[None, :, a:b], keys[None, :, :visible], values[None, :, :visible], attn_mask=mask, scale=scale,
            enable_gqa=n_q_heads != keys.shape[0],
        )[0])  # [Hq, b - a, D]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def prefix_and_causal_parts(queries, keys, values, scale: float) -> list:
    """The attention of queries [Hq, C, D] sitting at the end of keys, values [Hk, S, D], as two parts to merge
    (`merge_attention`), each (out [Hq, C, D], lse [Hq, C]): the S - C keys before the queries, seen by all (the
    group's query heads fold into one sequence per kv-head: no mask, keys not repeated), and the last C keys, seen
    causally."""
    n_q_heads, length, head_dim = queries.shape
    n_kv_heads, n_keys = keys.shape[:2]
    group = n_q_heads // n_kv_heads
    before = n_keys - length
    parts = []
    if before:
        out, lse = attention_with_lse(queries.reshape(1, n_kv_heads, group * length, head_dim),
                                      keys[None, :, :before], values[None, :, :before], scale)
        parts.append((out.reshape(n_q_heads, length, head_dim), lse.reshape(n_q_heads, length)))
    own_k = keys[:, before:].repeat_interleave(group, dim=0)[None]
    own_v = values[:, before:].repeat_interleave(group, dim=0)[None]
    out, lse = attention_with_lse(queries[None], own_k, own_v, scale, causal=True)
    parts.append((out[0], lse[0]))
    return parts


def attend_with_retrieved(queries, keys, values, block_keys, scale: float) -> torch.Tensor:
    """One softmax over shared keys and per-block keys.

    queries [Hq, C, D]; keys, values [Hk, S, D], all seen by every query except the last C (the chunk itself),
    seen causally; block_keys = (cold_k, cold_v, block): cold_k, cold_v [Hk, n_blocks, r, D] for the selection
    blocks of `select_blocks(C, block)`, query c seeing only block c // block's r. Returns [Hq, C, D].

    Computed as three attentions, each with its log-sum-exp, merged (the softmax over the union of their keys):
    the keys before the chunk, the chunk's own keys (causal), and each block's retrieved keys. None of them needs
    a mask built per query or a [C, S] score matrix in memory, so each runs as one fused attention kernel.
    """
    cold_k, cold_v, block = block_keys
    n_q_heads, length, head_dim = queries.shape
    n_kv_heads = keys.shape[0]
    n_blocks = cold_k.shape[1]
    group = n_q_heads // n_kv_heads
    parts = prefix_and_causal_parts(queries, keys, values, scale)
    padded = n_blocks * block  # the last block may be short: its missing queries are zeros, dropped after
    by_block = F.pad(queries.view(n_kv_heads, group, length, head_dim).transpose(1, 2), (0, 0, 0, 0, 0, padded - length))
    by_block = by_block.reshape(n_kv_heads, n_blocks, block * group, head_dim)  # [Hk, n_blocks, block*G, D]
    out, lse = attention_with_lse(by_block, cold_k, cold_v, scale)
    out = out.reshape(n_kv_heads, padded, group, head_dim)[:, :length].transpose(1, 2)  # [Hk, G, C, D]
    lse = lse.reshape(n_kv_heads, padded, group)[:, :length].transpose(1, 2)
    parts.append((out.reshape(n_q_heads, length, head_dim), lse.reshape(n_q_heads, length)))
    return merge_attention(parts).to(queries.dtype)


def attention_with_lse(q, k, v, scale: float, causal: bool = False, fused: bool | None = None):
    """softmax(q.k * scale) v over these keys alone, and its log-sum-exp: q [B, H, L, D], k, v [B, H, S, D] ->
    (out [B, H, L, D], lse [B, H, L], both float32). causal: L == S, query i sees keys 0..i.
    fused: PyTorch's fused CPU kernel, which returns the log-sum-exp with the output (default: on the CPU);
    elsewhere the scores are materialised."""
    if fused is None:
        fused = q.device.type == "cpu"
    if fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal, scale=scale)
        return out.float(), lse.float()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()), lse


def merge_attention(parts) -> torch.Tensor:
    """Attention over the union of several key sets from each set's (output, log-sum-exp): the outputs weighted by
    each set's share of the total softmax mass."""
    lse = torch.stack([part[1] for part in parts])
    top = lse.max(dim=0).values
    weights = torch.exp(lse - top)
    weights = weights / weights.sum(dim=0)
    return sum(w[..., None] * out for w, (out, _) in zip(weights, parts))


def decode_step(cold: ColdTier, layer: int, memory: LayerMemory, qkv, scale: float, retrieved: int, position: int,
                shift: int, window: int | None) -> torch.Tensor:
    """One new token: the same attention as a chunk, reusing the window's RoPE'd keys while the layout holds."""
    q, k, v = qkv
    rope = cold.rope
    n_kv_heads, _, head_dim = k.shape
    s, w = memory.sink_k.shape[1], memory.window_len
    view = memory.decode_view
    if (view is None or (view.sinks, view.retrieved, view.window, view.shift) != (s, retrieved, w, shift)
            or s + retrieved + w + 1 > view.keys.shape[1]):
        capacity = s + retrieved + w + cold.config.evict_batch + 1
        keys = k.new_empty(n_kv_heads, capacity, head_dim)
        values = v.new_empty(n_kv_heads, capacity, head_dim)
        keys[:, :s] = rope.rotate(memory.sink_k, 0)
        values[:, :s] = memory.sink_v
        begin = s + retrieved
        keys[:, begin : begin + w] = rope.rotate(memory.window_k, position - w)
        values[:, begin : begin + w] = memory.window_v
        view = memory.decode_view = DecodeView(keys, values, s, retrieved, w, shift)
    if retrieved:
        cold_k, cold_v = retrieve(cold, layer, memory, q, [(0, 1)], retrieved)
        view.keys[:, s : s + retrieved] = cold_k[:, 0]
        view.values[:, s : s + retrieved] = cold_v[:, 0]
    end = s + retrieved + w
    view.keys[:, end : end + 1] = rope.rotate(k, position)
    view.values[:, end : end + 1] = v
    view.window = w + 1  # update_hot_tier appends this token to the window next (or resets the view)
    queries = rope.rotate(q, position)
    mask = None
    if window is not None and end + 1 > window:  # exact attention on a sliding-window layer: true positions
        mask = sliding_mask(end, 1, end + 1, window, q.device)
    return F.scaled_dot_product_attention(
        queries[None], view.keys[None, :, : end + 1], view.values[None, :, : end + 1], attn_mask=mask, scale=scale,
        enable_gqa=q.shape[0] != n_kv_heads,
    )[0]  # [Hq, 1, D]


def update_hot_tier(cold: ColdTier, layer: int, memory: LayerMemory, k: torch.Tensor, v: torch.Tensor,
                    dense: bool) -> None:
    """Append the chunk to the hot tier; write the oldest window tokens to the cold tier in batches (and, unless
    attention is exact, drop them from the window)."""
    archive, config = cold.archive, cold.config
    missing_sinks = max(0, config.sinks - memory.sink_k.shape[1])
    if missing_sinks:
        memory.sink_k = torch.cat([memory.sink_k, k[:, :missing_sinks]], dim=1)
        memory.sink_v = torch.cat([memory.sink_v, v[:, :missing_sinks]], dim=1)
        k, v = k[:, missing_sinks:], v[:, missing_sinks:]
    memory.append_window(k, v)
    unarchived = memory.window_len - memory.archived
    if unarchived >= config.hot_window + config.evict_batch:
        spill = unarchived - config.hot_window
        begin = memory.archived
        if archive.key_mean(layer) is None:
            # centre of this layer's signatures: the mean pre-RoPE key of the first window we spill from (sinks are
            # outliers by design, so they are left out); any fixed centre keeps q.(k - mu) rank-equal to q.k
            archive.set_key_mean(layer, memory.window_k[:, begin:].float().mean(dim=1).cpu().numpy())
        spilled_k = memory.window_k[:, begin : begin + spill].float().cpu().numpy().transpose(1, 0, 2)  # [n, Hk, D]
        spilled_v = memory.window_v[:, begin : begin + spill].float().cpu().numpy().transpose(1, 0, 2)
        n, n_heads, head_dim = spilled_k.shape
        centred_rotated = (spilled_k - archive.key_mean(layer)[None]) @ archive.rotation.T
        records = codec.encode_records(centred_rotated.reshape(n * n_heads, head_dim),
                                       spilled_v.reshape(n * n_heads, head_dim))
        archive.append(layer, records.reshape(n, n_heads, -1))
        memory.archived += spill
    if not dense:
        memory.drop_archived()
