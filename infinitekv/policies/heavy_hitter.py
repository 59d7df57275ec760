"""Heavy hitters (the scoring of H2O, Zhang et al. 2023): the tokens that have received the most attention so
far, summed over every query since they were read. Nothing is reserved for recent tokens, so a token that has
not yet been attended much is dropped at once; `hybrid` is H2O's own remedy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinitekv.policies.base import CacheView, Policy, top_budget


@dataclass
class HeavyHitter(Policy):
    name = "heavy_hitter"
    attention_decay = 1.0

    def keep(self, view: CacheView) -> torch.Tensor:
        return top_budget(view.scores, self.budget)
