"""Salience: the tokens with the highest *average* recent attention. Each query's share is weighted by a decay
that halves every `half_life` queries, and divided by the weight of the queries that could see the token, so a
token that mattered long ago gives way to one that matters now, and a token just read is not handicapped by having
been seen by few queries (H2O's sums are). The hot/cold split of salience-based eviction, with the cold side
dropped. Sinks are kept: losing them wrecks the softmax."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinitekv.policies.base import CacheView, Policy, top_budget


@dataclass
class Salience(Policy):
    half_life: int = 256  # queries
    sinks: int = 4
    name = "salience"

    @property
    def attention_decay(self) -> float:
        return 0.5 ** (1 / self.half_life)

    def keep(self, view: CacheView) -> torch.Tensor:
        decay = self.attention_decay
        # the newest token is resident until trimmed, so the latest position is the number of queries so far - 1
        seen_by = view.positions.max(dim=-1, keepdim=True).values + 1 - view.positions  # [Hk, n], >= 1
        weight = (1 - decay ** seen_by.double()) / (1 - decay)
        salience = (view.scores.double() / weight).float()
        return top_budget(torch.where(view.positions < self.sinks, torch.inf, salience), self.budget)
