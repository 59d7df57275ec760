"""Hybrid (H2O as published): the most recent `recent_fraction` of the budget, and the heaviest hitters among the
older tokens for the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinitekv.policies.base import CacheView, Policy, top_budget


@dataclass
class Hybrid(Policy):
    recent_fraction: float = 0.5
    name = "hybrid"
    attention_decay = 1.0

    def keep(self, view: CacheView) -> torch.Tensor:
        recent = int(self.budget * self.recent_fraction)
        newest = torch.sort(view.positions, dim=-1, descending=True).values[:, recent - 1 : recent]
        is_recent = view.positions >= newest if recent else torch.zeros_like(view.positions, dtype=torch.bool)
        return top_budget(torch.where(is_recent, torch.inf, view.scores), self.budget)
