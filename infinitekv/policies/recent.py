"""Recent window: the last `budget` tokens (a sliding window)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinitekv.policies.base import CacheView, Policy, top_budget


@dataclass
class Recent(Policy):
    name = "recent"

    def keep(self, view: CacheView) -> torch.Tensor:
        return top_budget(view.positions, self.budget)
