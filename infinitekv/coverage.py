"""Where retrieval loses attention: the share of the exact softmax mass that falls on what a query attends.

For one query position t, layer and kv-head, the exact attention of each of the G query heads of the group is a
softmax over every earlier token at its true position. The engine's query sees the sinks, the hot window and the
cold tokens retrieval picked for it; `covered_mass` is the mass of the exact softmax on that set, averaged over the
G heads. The oracle keeps the same sinks and window and the same number of cold tokens, the ones with the most exact
mass (averaged over the group, which is the best any one set per kv-head can do).

`bench coverage` measures it offline on real text: one pass of the unmodified model captures every layer's queries
and keys, the cold part of the sequence is encoded into records exactly as the engine spills it, and retrieval
(`attention.select_cold`) picks from them for decode queries (one per selection) and prefill blocks (the queries of
a block share one first-stage shortlist).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ColdRecords:
    """Cold records held in memory, seen through the archive's read interface (what `attention.select_cold`
    reads): records [N, H, record_bytes], the signatures and weights derived from them, and the rotation R they
    were written with."""

    def __init__(self, records: np.ndarray, head_dim: int, rotation: np.ndarray):
        from infinitekv import codec

        self.rotation = rotation
        self._records = records
        self._signatures = codec.signatures_from_records(records, head_dim)
        self._weights = codec.key_mean_abs(records, head_dim).astype(np.float16)

    def signatures(self, layer):
        return self._signatures

    def key_weights(self, layer):
        return self._weights

    def records(self, layer):
        return self._records


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclass
class Coverage:
    retrieved: float  # exact mass on sinks + window + the retrieved cold tokens
    oracle: float  # the same with the exact best cold tokens instead
    hot: float  # sinks + window alone (retrieval off)


def covered_mass(logits: np.ndarray, hot: np.ndarray, retrieved: np.ndarray) -> Coverage:
    """logits [G, n]: exact logits of the group's query heads over all n earlier tokens; hot [n] bool: sinks and
    window; retrieved: indices of the cold tokens picked. The oracle picks as many cold tokens."""
    probs = softmax(logits.astype(np.float64))  # [G, n]
    mean = probs.mean(axis=0)
    hot_mass = float(mean[hot].sum())
    picked = np.zeros_like(hot)
    picked[retrieved] = True
    if (picked & hot).any():
        raise ValueError("retrieved tokens must be cold (neither sinks nor window)")
    cold_mass = np.where(hot, -np.inf, mean)
    best = np.argsort(-cold_mass, kind="stable")[: len(retrieved)]
    return Coverage(retrieved=hot_mass + float(mean[picked].sum()), oracle=hot_mass + float(mean[best].sum()),
                    hot=hot_mass)
