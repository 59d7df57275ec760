"""The interface every eviction policy implements: a budget and one method, `keep`, that picks the tokens to keep."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass
class CacheView:
    """What a policy may look at, per kv-head, for the n tokens resident after a step, in ascending position."""

    positions: torch.Tensor  # [Hk, n] int64 true token positions
    scores: torch.Tensor  # [Hk, n] float32 attention each token has received (see Policy.attention_decay); zeros
    # for policies that do not score


@dataclass
class Policy(abc.ABC):
    """Keep at most `budget` tokens per layer and kv-head; drop the rest for good (equal resident memory)."""

    budget: int | None  # resident tokens per layer and kv-head after every step; None keeps everything
    name: ClassVar[str] = ""
    # attention each cached token receives is summed over queries with weight decay ** (queries since): 1.0 is
    # H2O's accumulated attention, < 1 favours recent attention; None: the policy needs no scores, and attention
    # runs fused without materialising its probabilities
    attention_decay: ClassVar[float | None] = None

    @abc.abstractmethod
    def keep(self, view: CacheView) -> torch.Tensor:
        """Indices into the view [Hk, budget], ascending, of the tokens to keep."""


def top_budget(priority: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices [Hk, budget], ascending, of the highest priorities per row; ties go to the more recent token."""
    n = priority.shape[-1]
    # sorting the reversed row stably puts, among equal priorities, the latest token first
    order = torch.argsort(priority.flip(-1), dim=-1, descending=True, stable=True)[:, :budget]
    return torch.sort(n - 1 - order, dim=-1).values
