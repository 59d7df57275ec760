"""Two-level index for long contexts: cold tokens clustered by key, centroids scanned first, then only the members
of the best clusters.

A flat scan (search.search_many) reads every cold signature every step, so its cost grows with the context. Here a
layer's cold tier is cut into segments of `segment` consecutive tokens; once a segment is complete its dequantised
keys x = R (k - mu) are clustered per kv-head (k-means, about CLUSTER_TOKENS tokens per cluster) and never touched
again. A query row scores every centroid (one small matmul: a centroid per ~128 tokens), walks the clusters best
first and takes their members until it has `budget` candidates; the tokens after the last complete segment are
scanned flat, as before. The caller reranks both with the int8 keys, so what changes is only which tokens reach the
rerank.

Why clusters and not blocks of consecutive tokens (the InfLLM / Quest idea): measured on a real 32k-token SmolLM2
archive with the decode queries of a passkey question (development capture, 360 layer-steps), the share of the exact
int8 top-64 that reaches the rerank with 1,024 candidates was 0.14 for 64-token block sums, 0.14 for Quest-style
per-block min/max bounds (0.31 with 16-token blocks), 0.79 for the flat signature scan and 0.80-0.84 for k-means
clusters: the keys a query wants are scattered through the text, not gathered in a few blocks, but they do sit near
each other in key space. `ikv bench scan` measures the index's per-step time and recall on synthetic keys.

    index = ClusterIndex(segment=16384)
    index.sync(archive, layer)                    # cluster every newly completed segment (and forget rolled-back ones)
    ids = index.candidates(queries, budget)       # queries [Q, H, G, D] rotated -> ids [Q, H, M] ascending
    ... plus search_many(..., exclude_before=index.covered) for the tail
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from infinitekv import codec
from infinitekv.search import order_key

CLUSTER_TOKENS = 128  # tokens per cluster on average: a centroid read per 128 tokens replaces 128 signature reads
ROUNDS = 4  # Lloyd iterations per segment (recall changed by < 0.01 between 3 and 8 in the capture above)


@dataclass
class Segment:
    """One clustered segment of a layer, per kv-head: centroids, and its token ids grouped by cluster."""

    centroids: np.ndarray  # float32 [H, C, D]
    members: np.ndarray  # int64 [H, segment]: token ids, cluster by cluster, ascending within a cluster
    starts: np.ndarray  # int64 [H, C + 1]: cluster c's members are members[h, starts[h, c] : starts[h, c + 1]]


def cluster_keys(x: np.ndarray, n_clusters: int, rounds: int = ROUNDS) -> tuple[np.ndarray, np.ndarray]:
    """k-means of keys x float32 [n, D]: (centroids [C, D], assignment int64 [n]). Deterministic: the first centroids
    are evenly spaced tokens (text drifts, so they cover it), and a cluster that empties keeps its centroid."""
    n = len(x)
    n_clusters = max(1, min(n_clusters, n))
    centroids = x[np.linspace(0, n - 1, n_clusters).astype(np.int64)].copy()
    nearest = lambda: np.argmax(x @ centroids.T - 0.5 * (centroids * centroids).sum(axis=1), axis=1)  # noqa: E731
    for _ in range(rounds):  # nearest by squared distance (argmax of x.c - |c|^2 / 2), then move to the mean
        assignment = nearest()
        counts = np.bincount(assignment, minlength=n_clusters)
        sums = np.zeros_like(centroids)
        _add_rows(sums, assignment, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, nearest()


@nb.njit(cache=True)
def _add_rows(sums, assignment, x):
    for i in range(len(assignment)):
        sums[assignment[i]] += x[i]


def build_segment(x: np.ndarray, first_token: int, cluster_tokens: int = CLUSTER_TOKENS) -> Segment:
    """Cluster one segment: x float32 [n, H, D], the keys of tokens first_token .. first_token + n - 1."""
    n, n_heads, head_dim = x.shape
    n_clusters = max(1, n // cluster_tokens)
    centroids = np.empty((n_heads, n_clusters, head_dim), np.float32)
    members = np.empty((n_heads, n), np.int64)
    starts = np.empty((n_heads, n_clusters + 1), np.int64)
    for h in range(n_heads):
        centroids[h], assignment = cluster_keys(np.ascontiguousarray(x[:, h]), n_clusters)
        members[h] = first_token + np.argsort(assignment, kind="stable")  # stable: ascending ids within a cluster
        starts[h] = np.concatenate([[0], np.cumsum(np.bincount(assignment, minlength=n_clusters))])
    return Segment(centroids, members, starts)


class ClusterIndex:
    """One layer's clustered segments (see the module docstring). `covered` tokens are clustered; the rest is the
    caller's to scan flat."""

    def __init__(self, segment: int, cluster_tokens: int = CLUSTER_TOKENS):
        if segment < cluster_tokens:
            raise ValueError(f"segment ({segment}) must hold at least one cluster of {cluster_tokens} tokens")
        self.segment, self.cluster_tokens = segment, cluster_tokens
        self.segments: list[Segment] = []
        self._rollbacks = 0
        self._joined = None  # (centroids [H, K, D], members [H, T], starts [H, K + 1]) over all segments

    @classmethod
    def from_keys(cls, x: np.ndarray, segment: int, cluster_tokens: int = CLUSTER_TOKENS) -> "ClusterIndex":
        """An index of keys already decoded: x float32 [n, H, D] (rotated basis), token i = row i; every complete
        segment is clustered (`ikv bench recall` measures it on captured keys)."""
        index = cls(segment, cluster_tokens)
        for begin in range(0, len(x) - segment + 1, segment):
            index.segments.append(build_segment(np.ascontiguousarray(x[begin : begin + segment]), begin, cluster_tokens))
        return index

    @property
    def covered(self) -> int:
        return len(self.segments) * self.segment

    def sync(self, archive, layer: int) -> None:
        """Cluster the layer's newly completed segments. Records past the archive's committed point can be rolled back
        and rewritten (cache.crop, a fork taking over the tail): after a rollback, segments reaching past the
        committed point are rebuilt from what the archive holds now."""
        if archive.rollbacks != self._rollbacks:
            self._rollbacks = archive.rollbacks
            keep = archive.committed_tokens // self.segment
            if keep < len(self.segments):
                del self.segments[keep:]
                self._joined = None
        records = archive.records(layer)
        head_dim = archive.rotation.shape[0]
        while self.covered + self.segment <= len(records):
            begin = self.covered
            x = codec.decode_keys_rotated(np.asarray(records[begin : begin + self.segment]), head_dim)
            self.segments.append(build_segment(x, begin, self.cluster_tokens))
            self._joined = None

    def _all(self):
        if self._joined is None:
            offsets = np.cumsum([0] + [seg.members.shape[1] for seg in self.segments[:-1]])
            self._joined = (
                np.ascontiguousarray(np.concatenate([seg.centroids for seg in self.segments], axis=1).transpose(0, 2, 1)),
                np.concatenate([seg.members for seg in self.segments], axis=1),
                np.concatenate([seg.starts[:, :-1] + off for seg, off in zip(self.segments, offsets)]
                               + [np.full((self.segments[0].starts.shape[0], 1), self.covered)], axis=1),
            )
        return self._joined

    def candidates(self, queries: np.ndarray, budget: int) -> np.ndarray:
        """The members of each query row's best clusters: queries float32 [Q, H, G, D] (rotated basis; G query heads
        share a kv-head, and a cluster's score is its best over them) -> token ids int64 [Q, H, M] ascending,
        M = min(budget, covered). Clusters are taken best first until M are in; the last one taken may be cut."""
        n_queries, n_heads = queries.shape[:2]
        budget = min(budget, self.covered)
        out = np.empty((n_queries, n_heads, budget), np.int64)
        if not budget:
            return out
        centroids_t, members, starts = self._all()  # centroids_t [H, D, K]
        # every kv-head's centroids in one product (it runs per layer and decode step: a loop over heads cost more
        # in calls than in arithmetic)
        scores = (queries @ centroids_t).max(axis=2)  # [Q, H, G, K] -> [Q, H, K]
        _take_best_clusters(np.ascontiguousarray(scores, np.float32), starts, members, out,
                            2 * (budget // self.cluster_tokens) + 16)
        out.sort(axis=-1)  # numpy's vectorised sort: 3x faster here than numba's
        return out


@nb.njit(cache=True)
def _take_best_clusters(scores, starts, members, out, first_guess):
    # out[q, h] = the members of head h's clusters in order of scores[q, h] (best first, equal scores to the lower
    # cluster, as a stable argsort of -scores orders them) until it is full. Only the best few clusters are ever
    # needed (about budget / CLUSTER_TOKENS): they are found by a partition of unique keys (score order, then
    # cluster index) and only those sorted, a larger guess taken when they fall short (a full argsort per row was
    # most of a decode step's two-level probe at 128k)
    n_clusters = scores.shape[2]
    budget = out.shape[2]
    keys = np.empty(n_clusters, np.uint64)
    for q in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            bits = (scores[q, h] + np.float32(0.0)).view(np.int32)  # -0.0 and +0.0 tie, as in argsort
            for c in range(n_clusters):
                keys[c] = (np.uint64(order_key(bits[c])) << np.uint64(32)) | np.uint64(0xFFFFFFFF - c)
            m = min(n_clusters, first_guess)
            while True:
                best = np.sort(np.partition(keys, n_clusters - m)[n_clusters - m :])  # the best m, ascending
                held = 0
                for key in best:
                    c = np.int64(0xFFFFFFFF - (key & np.uint64(0xFFFFFFFF)))
                    held += starts[h, c + 1] - starts[h, c]
                if held >= budget or m == n_clusters:
                    break
                m = min(n_clusters, 2 * m)
            row = out[q, h]
            filled = 0
            for j in range(m - 1, -1, -1):
                c = np.int64(0xFFFFFFFF - (best[j] & np.uint64(0xFFFFFFFF)))
                take = min(starts[h, c + 1] - starts[h, c], budget - filled)
                row[filled : filled + take] = members[h, starts[h, c] : starts[h, c] + take]
                filled += take
                if filled == budget:
                    break
