"""Keep-all: the full cache, nothing evicted; the reference every budget is measured against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinitekv.policies.base import CacheView, Policy


@dataclass
class KeepAll(Policy):
    budget: int | None = None
    name = "keep_all"

    def keep(self, view: CacheView) -> torch.Tensor:
        n_heads, n = view.positions.shape
        return torch.arange(n).expand(n_heads, n)
