"""Eviction policies: the field's ways of keeping a KV cache within a token budget, as peers of retrieval on the
same engine. Each is one small dataclass in its own file with one method, `keep`, that picks the tokens to keep
(base.py); `cache.py` owns the plumbing (an `EvictingCache` on the attention path InfiniteKVCache uses).

    from infinitekv.policies import make_policy
    with infinitekv.enable(model, policy=make_policy("hybrid", budget=1100)) as cache:
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)
"""

from __future__ import annotations

from infinitekv import adapters
from infinitekv.errors import IKVError
from infinitekv.policies.base import CacheView, Policy, top_budget
from infinitekv.policies.cache import EvictingCache
from infinitekv.policies.heavy_hitter import HeavyHitter
from infinitekv.policies.hybrid import Hybrid
from infinitekv.policies.keep_all import KeepAll
from infinitekv.policies.recent import Recent
from infinitekv.policies.salience import Salience
from infinitekv.policies.sinks_window import SinksWindow

POLICIES = {cls.name: cls for cls in (KeepAll, Recent, SinksWindow, HeavyHitter, Hybrid, Salience)}

__all__ = ["POLICIES", "CacheView", "EvictingCache", "Policy", "check_policy", "make_policy", "top_budget"]


def make_policy(name: str, budget: int | None = None) -> Policy:
    """The policy called `name` with `budget` resident tokens per layer and kv-head (keep_all ignores it)."""
    if name not in POLICIES:
        raise IKVError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    if name == "keep_all":
        return KeepAll()
    if budget is None or budget < 1:
        raise IKVError(f"policy {name} needs a budget of at least 1 token, got {budget}")
    return POLICIES[name](budget=budget)


def check_policy(policy: Policy, model, chunk_size: int) -> None:
    """Past the trained window tokens sit at their cache index, so a budget plus a chunk must fit that window;
    and what a policy always keeps (sinks, the recent share) must leave it something to choose."""
    if policy.budget is None:
        return
    trained = adapters.trained_window(model.config)  # sliding-window layers mask at the positions used: no limit here
    if policy.budget + chunk_size > trained:
        raise IKVError(f"budget {policy.budget} + chunk {chunk_size} exceeds the model's trained window of {trained}; "
                       "lower --budget or --chunk-size")
    protected = max(getattr(policy, "sinks", 0), int(policy.budget * getattr(policy, "recent_fraction", 0)))
    if protected >= policy.budget:
        raise IKVError(f"policy {policy.name} protects {protected} tokens, not fewer than its budget "
                       f"{policy.budget}; raise --budget")
