"""`EvictingCache`: a transformers Cache that keeps at most a policy's budget of tokens per layer and kv-head and
drops the rest for good, on the same attention path as InfiniteKVCache (the function cache.py registers hands each
layer's post-RoPE query, key and value to `attend`).

    from infinitekv.policies import make_policy
    with infinitekv.enable(model, policy=make_policy("hybrid", budget=1100)) as cache:
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

For one decoder layer and one chunk of C new tokens (a long forward is cut into chunks of `chunk_size`, so one
`model.generate` prefill equals feeding the prompt chunk by chunk, and a chunk never attends more than budget + C):

1. the model's attention module projects the chunk and applies RoPE at the chunk's true positions (the cache's
   length counts every token read, kept or not, so positions continue as if nothing were evicted);
2. positions: while the sequence fits `dense_up_to` (by default the model's trained window) every token sits at its
   true position, so attention is exactly what the model computes over the tokens kept. Past it, each resident
   token sits at its index in the cache and the chunk right after them (StreamingLLM's rule, and what InfiniteKV's
   compact layout does), so no distance exceeds budget + C, which `check_policy` fits inside the trained window.
   Keys are kept RoPE'd at their true positions: inside the window a step rotates nothing; past it the keys and the
   chunk's queries are turned back to their indices for that step;
3. attention over the resident tokens and the chunk (causal within it; a sliding-window layer also masks keys
   farther than its window at the positions used). A policy that scores tokens (`attention_decay` set) gets the softmax
   materialised, and each token's score takes the attention it received from this chunk's queries, summed over the
   query heads sharing its kv-head: the scores come from the very attention the model's output used;
4. the chunk joins the resident tokens and the policy's `keep` trims them back to the budget; what it does not keep
   is gone (so budget + C tokens are resident only while a chunk is attended).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from infinitekv import adapters
from infinitekv.attention import RetrievalConfig, Rope, apply_rope
from infinitekv.cache import Counters, RoutedCache, RoutedLayer, chunk_bounds
from infinitekv.errors import IKVError
from infinitekv.policies.base import CacheView, Policy


class EvictingLayer(RoutedLayer):
    """One layer's resident tokens, per kv-head in ascending position: keys RoPE'd at their true positions, values,
    the true positions and the policy's running attention score."""

    cache_name = "EvictingCache"

    def __init__(self, n_heads: int, head_dim: int, device, dtype):
        super().__init__()
        self.keys = torch.zeros(1, n_heads, 0, head_dim, device=device, dtype=dtype)  # [1, Hk, n, D]
        self.values = self.keys
        self.positions = torch.zeros(n_heads, 0, dtype=torch.long, device=device)  # [Hk, n]
        self.scores = torch.zeros(n_heads, 0, dtype=torch.float32, device=device)  # [Hk, n]
        self.seen = 0  # tokens this layer has read, kept or not
        self.is_initialized = True

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    def nbytes(self) -> tuple[int, int]:
        """(key and value bytes, bytes of the positions and scores kept beside them)."""
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        return size(self.keys) + size(self.values), size(self.positions) + size(self.scores)

    def trim(self, policy: Policy) -> None:
        if policy.budget is None or self.tokens <= policy.budget:
            return
        kept = policy.keep(CacheView(self.positions, self.scores)).to(self.positions.device)  # [Hk, budget]
        rows = kept[None, :, :, None].expand(1, -1, -1, self.keys.shape[3])
        self.keys, self.values = self.keys.gather(2, rows), self.values.gather(2, rows)
        self.positions, self.scores = self.positions.gather(1, kept), self.scores.gather(1, kept)

    # ---- what transformers asks of a cache layer (the rest: RoutedLayer) ------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def reset(self) -> None:
        self.__init__(self.keys.shape[1], self.keys.shape[3], self.keys.device, self.keys.dtype)

    def crop(self, tokens_to_remove: int) -> None:
        raise IKVError("an EvictingCache cannot be cropped: the tokens it evicted are gone; open a new one")


class EvictingCache(RoutedCache):
    """A transformers Cache under an eviction policy; see the module docstring. `config` supplies chunk_size and
    dense_up_to (derived from the model by `RetrievalConfig.for_model`, as for retrieval)."""

    archive = None  # what it evicts is dropped, not archived

    def __init__(self, model, policy: Policy, config: RetrievalConfig):
        self.policy, self.config = policy, config
        self.layout = adapters.layout(model)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.rope = Rope(adapters.rotary_embedding(model), self.dtype, self.device)
        self.counters = Counters()
        self.token_ids: list[int] = []
        super().__init__(layers=[EvictingLayer(self.layout.n_kv_heads, self.layout.head_dim, self.device, self.dtype)
                                 for _ in range(self.layout.n_layers)])

    def attend(self, layer: int, query, key, value, rope_tables, scale: float, sliding_window) -> torch.Tensor:
        """query [1, Hq, T, D], key/value [1, Hk, T, D], RoPE'd at their true positions -> [1, T, Hq, D]."""
        if query.shape[0] != 1:
            raise IKVError(f"an EvictingCache holds one sequence, got a batch of {query.shape[0]}; generate one "
                           "prompt at a time")
        state = self.layers[layer]
        outs = [self._attend_chunk(state, query[0, :, a:b], key[0, :, a:b], value[0, :, a:b], scale, sliding_window)
                for a, b in chunk_bounds(self, state.seen, query.shape[2])]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [Hq, T, D]
        return out.transpose(0, 1)[None]

    def _attend_chunk(self, state: EvictingLayer, q, k, v, scale: float, sliding_window) -> torch.Tensor:
        """Steps 2-4 of the module docstring for one chunk: q [Hq, C, D]; k, v [Hk, C, D] -> [Hq, C, D]."""
        n_kv_heads, length = k.shape[:2]
        n, start = state.tokens, state.seen
        device = k.device
        true = torch.cat([state.positions, torch.arange(start, start + length, device=device)
                          .expand(n_kv_heads, length)], dim=1)  # [Hk, S] true positions, S = n + C
        keys = torch.cat([state.keys[0], k], dim=1)  # [Hk, S, D] RoPE'd at true positions
        values = torch.cat([state.values[0], v], dim=1)
        if start + length <= self.config.dense_up_to:
            queries, attended, at = q, keys, true
        else:  # token i of the cache at position i, the chunk right after them
            slots = torch.arange(n + length, device=device)
            attended, queries = self._turn(keys, true - slots), self._turn(q, torch.tensor([start - n]))
            at = slots.expand(n_kv_heads, -1)
        decay = self.policy.attention_decay
        scores = torch.cat([state.scores, state.scores.new_zeros(n_kv_heads, length)], dim=1)
        if decay is None:
            out = _attention(queries, attended, values, scale, at, sliding_window)
        else:
            out, probs = _attention_with_probs(queries, attended, values, scale, at, sliding_window)
            # query c's share counts decay ** (queries after it) by the end of the chunk
            weights = decay ** torch.arange(length - 1, -1, -1, device=device, dtype=torch.float64)
            scores = scores * decay**length + torch.einsum("hcs,c->hs", probs, weights.float())
        state.keys, state.values, state.positions = keys[None], values[None], true
        state.scores = scores
        state.seen += length
        state.trim(self.policy)
        return out

    def _turn(self, x: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        """x [..., T, D], RoPE'd at position p, turned to p - by (by broadcasts against [..., T], >= 0)."""
        cos, sin = self.rope.at(0, int(by.max()) + 1)
        # the tables carry the RoPE variant's attention scaling, which x has had once already
        scaling = self.rope.scaling
        return apply_rope(x, cos[by.to(cos.device)] / scaling, -sin[by.to(cos.device)] / scaling)

    # ---- what the rest of the engine reads ------------------------------------------------------------------
    def resident_tokens(self) -> int:
        """The most tokens any layer and kv-head holds."""
        return max(layer.tokens for layer in self.layers)

    def memory_bill(self) -> dict:
        kv, bookkeeping = (sum(parts) for parts in zip(*(layer.nbytes() for layer in self.layers)))
        return {"tokens": len(self.token_ids), "resident_tokens": self.resident_tokens(), "kv_bytes": kv,
                "bookkeeping_bytes": bookkeeping}

    def commit(self, *args, **kwargs) -> None:
        raise IKVError(f"the {self.policy.name} policy keeps no archive, so there is nothing to commit or resume; "
                       "use retrieval (no policy) for a durable conversation")

    def crop(self, max_length: int) -> None:
        raise IKVError("an EvictingCache cannot be cropped: the tokens it evicted are gone; open a new one")


def _mask(positions: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """[Hk, C, S]: query c (the c-th of the last `length` positions) may see key s: causal, and within the window."""
    queries = positions[:, -length:, None]
    keys = positions[:, None, :]
    allowed = keys <= queries
    return allowed if window is None else allowed & (queries - keys < window)


def _attention(queries, keys, values, scale: float, positions, window: int | None) -> torch.Tensor:
    """Fused attention of the chunk (the last C keys) over keys [Hk, S, D]: queries [Hq, C, D] -> [Hq, C, D]."""
    n_q_heads, length = queries.shape[:2]
    n_kv_heads, n_keys = keys.shape[:2]
    if window is None:  # every resident token precedes the chunk: a lower-right causal mask
        mask = causal_lower_right(length, n_keys)
    else:
        mask = _mask(positions, length, window).repeat_interleave(n_q_heads // n_kv_heads, dim=0)[None]
    return F.scaled_dot_product_attention(queries[None], keys[None], values[None], attn_mask=mask, scale=scale,
                                          enable_gqa=n_q_heads != n_kv_heads)[0]


def _attention_with_probs(queries, keys, values, scale: float, positions, window: int | None):
    """The same attention with its probabilities: out [Hq, C, D] and probs [Hk, C, S] (float32), summed over the
    query heads that share each kv-head."""
    n_q_heads, length, head_dim = queries.shape
    n_kv_heads = keys.shape[0]
    grouped = queries.view(n_kv_heads, -1, length, head_dim)  # [Hk, G, C, D]
    logits = torch.matmul(grouped, keys[:, None].transpose(2, 3)).float() * scale  # [Hk, G, C, S]
    logits.masked_fill_(~_mask(positions, length, window)[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = torch.matmul(probs.to(values.dtype), values[:, None])  # [Hk, G, C, D]
    return out.reshape(n_q_heads, length, head_dim), probs.sum(dim=1)
