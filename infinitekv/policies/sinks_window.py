"""Sinks + window (StreamingLLM, Xiao et al. 2023): the first `sinks` tokens, which soak up attention whatever
they say, and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinitekv.policies.base import CacheView, Policy, top_budget


@dataclass
class SinksWindow(Policy):
    sinks: int = 4
    name = "sinks_window"

    def keep(self, view: CacheView) -> torch.Tensor:
        sink = view.positions < self.sinks
        return top_budget(torch.where(sink, torch.iinfo(torch.int64).max, view.positions), self.budget)
