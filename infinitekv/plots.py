"""Pictures of what benches measured (matplotlib, PNG): the memory bill against context length, and the eviction
baselines beside InfiniteKV. Optional: without matplotlib nothing is drawn, and the receipt still holds every number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def draw_memory_bill(series: list[dict], path: Path) -> None:
    """The memory bill (`InfiniteKVCache.memory_bill`, one per length read) against context length: hot tier,
    resident cold index, cold records, and the fp16 KV cache the cold tier replaces."""
    plt = _pyplot()
    if plt is None:
        return
    tokens = [bill["tokens"] for bill in series]
    fig, axis = plt.subplots(figsize=(6.5, 4))
    for key, label in (("hot_tier_bytes", "hot tier (device)"), ("cold_index_bytes_resident", "cold index (RAM)"),
                       ("cold_record_bytes", f"cold records ({series[-1]['cold_records_where']})"),
                       ("fp16_kv_bytes_replaced", "fp16 KV the cold tier replaces")):
        axis.plot(tokens, [bill[key] / 2**20 for bill in series], "o-", label=label)
    axis.set_xlabel("context tokens")
    axis.set_ylabel("MiB")
    axis.set_title("memory bill vs context length", fontsize=10)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_baselines(systems, cells: list[dict], rows: list[dict], quality: list[dict], budget: int,
                   receipt: Path) -> dict:
    """Three PNGs beside the receipt (`baselines.bench_baselines`' cells, rows and quality): accuracy vs context,
    KL vs budget, resident bytes per context token. Returns {kind: path} of those drawn."""
    plt = _pyplot()
    if plt is None:
        return {}
    paths = {kind: receipt.with_name(f"{receipt.stem}-{kind}.png") for kind in ("accuracy", "kl", "bytes")}
    panels = [(items, key, title) for items, key, title in ((cells, "found", "passkey: fraction of depths found"),
                                                            (rows, "score", "task suite: mean score")) if items]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False)
    for axis, (items, key, title) in zip(axes[0], panels):  # a part of the grid that was skipped gets no panel
        for name in systems:
            mine = [c for c in items if c["system"] == name]
            lengths = sorted({c["length"] for c in mine})
            if lengths:
                axis.plot(lengths, [np.mean([c[key] for c in mine if c["length"] == n]) for n in lengths], "o-",
                          label=name)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens")
        axis.set_ylim(-0.05, 1.05)
        axis.set_title(f"{title} (budget {budget:,})", fontsize=10)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["accuracy"], dpi=100)
    plt.close(fig)

    lengths = sorted({q["length"] for q in quality})
    fig, axes = plt.subplots(1, max(1, len(lengths)), figsize=(4.2 * max(1, len(lengths)), 3.8), squeeze=False)
    for axis, length in zip(axes[0], lengths):
        for name in systems:
            points = sorted((q["budget"], q["median_kl"]) for q in quality
                            if q["system"] == name and q["length"] == length and q["budget"] is not None)
            if points:
                # a log axis cannot show 0: an exact match is drawn at 1e-8
                axis.plot([b for b, _ in points], [max(kl, 1e-8) for _, kl in points], "o-", label=name)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("resident tokens per layer and kv-head")
        axis.set_title(f"median KL vs the full model at {length:,} tokens", fontsize=9)
    axes[0][0].set_ylabel("nats (keep_all: exact, not drawn)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["kl"], dpi=100)
    plt.close(fig)

    fig, axis = plt.subplots(figsize=(6, 4))
    for name in systems:
        by_tokens = sorted({(c["tokens"], c["resident_bytes"]) for c in cells + rows if c["system"] == name})
        if by_tokens:
            axis.plot([t for t, _ in by_tokens], [b / t for t, b in by_tokens], "o-", label=name)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("context tokens")
    axis.set_ylabel("resident bytes per context token")
    axis.set_title(f"memory held per token read (budget {budget:,})", fontsize=10)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["bytes"], dpi=100)
    plt.close(fig)
    return paths
