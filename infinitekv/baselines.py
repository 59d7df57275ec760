"""`ikv bench baselines`: the field side by side. Every eviction policy (`infinitekv.policies`) and InfiniteKV hold
the same resident budget of tokens per layer and kv-head, read the same prompts through the same attention path and
the same session (chunked prefill, then one token at a time), and are measured with the benches' own grids: the
passkey grid, the task suite, teacher-forced KL/top-1 against the unmodified model (also at other budgets), resident
bytes and ms/token. One receipt, and PNG plots beside it (plots.py).

InfiniteKV at a budget: sinks + retrieved (top_k_cold) + a hot window that overshoots by at most evict_batch - 1
before a batch moves cold, so its device-resident tokens never exceed the budget; it retrieves from the first spill
(dense_up_to 0), since exact attention inside the trained window keeps every token. Its cold records are counted
apart (on disk in a real run; in RAM here, to time the engine rather than the disk); its cold index is resident.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from infinitekv import plots, receipts
from infinitekv.attention import RetrievalConfig
from infinitekv.bench import passkey_grid, quality_text, task_cases, teacher_forced
from infinitekv.engine import check_budget, open_session
from infinitekv.errors import IKVError
from infinitekv.models import LoadedModel
from infinitekv.policies import POLICIES, EvictingCache, Policy, check_policy, make_policy
from infinitekv.tasks import KINDS, score

SYSTEMS = tuple(POLICIES) + ("infinitekv",)


@dataclass(frozen=True)
class System:
    """One contender at one budget: retrieval settings, and the eviction policy (None: InfiniteKV)."""

    name: str
    budget: int | None  # None: keep_all, which has none
    config: RetrievalConfig
    policy: Policy | None


def system_at_budget(model, name: str, config: RetrievalConfig, budget: int) -> System:
    """`name` holding at most `budget` tokens per layer and kv-head; refused in one line if that cannot fit."""
    far_gap = config.far_gap  # None: derived for the hot window this budget leaves, so the layout fits the reach
    config = RetrievalConfig.for_model(model.config, **asdict(config))
    if name not in SYSTEMS:
        raise IKVError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    if name != "infinitekv":
        policy = make_policy(name, budget)
        check_policy(policy, model, config.chunk_size)
        return System(name, policy.budget, config, policy)
    hot = budget - config.sinks - config.top_k_cold - (config.evict_batch - 1)
    if hot < 1:
        raise IKVError(f"budget {budget} leaves no hot window beside {config.sinks} sinks, {config.top_k_cold} "
                       f"retrieved and an evict batch of {config.evict_batch}; raise --budget or lower --top-k-cold")
    config = RetrievalConfig.for_model(model.config, **{**asdict(config), "hot_window": hot, "dense_up_to": 0,
                                                        "far_gap": far_gap})
    check_budget(model, config)
    return System(name, budget, config, None)


def resident(cache) -> tuple[int, int]:
    """(most tokens any layer and kv-head holds, bytes held) at the end of a read. A policy: its keys and values and
    the positions and scores beside them. InfiniteKV: sinks + window + retrieved keys and values, and the cold index
    (signatures and key weights) kept in RAM; not the cold records."""
    bill = cache.memory_bill()
    if isinstance(cache, EvictingCache):
        return bill["resident_tokens"], bill["kv_bytes"] + bill["bookkeeping_bytes"]
    layout = cache.layout
    retrieved = min(cache.config.top_k_cold, bill["cold_tokens"])
    tokens = max(m.sink_k.shape[1] + m.window_len for m in cache.memories) + retrieved
    element = torch.finfo(cache.dtype).bits // 8
    retrieved_bytes = retrieved * layout.n_layers * layout.n_kv_heads * layout.head_dim * 2 * element
    return tokens, bill["hot_tier_bytes"] + retrieved_bytes + bill["cold_index_bytes_resident"]


def ask(loaded: LoadedModel, case, system: System, max_new_tokens: int) -> dict:
    """One chat turn (document and question) on a fresh cache of `system`: the reply and what it cost."""
    with open_session(loaded.model, tokenizer=loaded.tokenizer, config=system.config, mode="ram",
                      fingerprint=loaded.weights_sha256, policy=system.policy) as session:
        answer = session.ask(case.question, case.document, max_new_tokens=max_new_tokens)
        tokens, resident_bytes = resident(session.cache)
        counters = session.counters
        return {"answer": answer, "prompt_tokens": counters.prefill_tokens, "tokens": len(session.token_ids),
                "resident_tokens": tokens,
                "resident_bytes": resident_bytes,
                "prefill_ms_per_token": 1000 * counters.prefill_seconds / max(counters.prefill_tokens, 1),
                "decode_ms_per_token": 1000 * counters.decode_seconds / max(counters.decode_steps, 1)}


def bench_baselines(loaded: LoadedModel, config: RetrievalConfig, budget: int = 1100, systems=SYSTEMS,
                    lengths=(4096, 12288, 32768), depths=(0.1, 0.3, 0.5, 0.7, 0.9), task_lengths=(4096, 8192, 12288),
                    kinds=KINDS, cases: int = 1, quality_lengths=(2048, 4096, 8192), positions: int = 256,
                    kl_budgets=(256, 512, 1100), full_up_to: int = 12288, plots_beside: Path | None = None) -> dict:
    """Every system in `systems` at `budget` resident tokens: passkey grid, task suite, KL/top-1 (also at each of
    `kl_budgets`), resident bytes and ms/token. keep_all (the full cache) runs only up to `full_up_to` tokens.
    `plots_beside`: the receipt's path, beside which the PNGs go."""
    model = loaded.model
    # every setting is checked before any work is done
    setups = {(name, b): system_at_budget(model, name, config, b) for name in systems for b in {budget, *kl_budgets}}
    at_budget = [setups[name, budget] for name in systems]
    fits = lambda system, length: system.name != "keep_all" or length <= full_up_to  # noqa: E731
    cells, rows, quality = [], [], []
    for length, depth, needle in passkey_grid(loaded.tokenizer, lengths, depths):
        for system in (s for s in at_budget if fits(s, length)):
            cell = {"system": system.name, "length": length, "depth": depth, "key": needle.answer,
                    **ask(loaded, needle, system, max_new_tokens=24)}
            cell["found"] = needle.answer in cell["answer"]
            cells.append(cell)
            print(f"passkey {system.name} {length} {depth}: {'found' if cell['found'] else 'missed'}",
                  file=sys.stderr)
    for length, kind, index, case in task_cases(loaded.tokenizer, task_lengths, kinds, cases):
        for system in (s for s in at_budget if fits(s, length)):
            row = {"system": system.name, "length": length, "kind": kind, "case": index,
                   **ask(loaded, case, system, max_new_tokens=48)}
            row["score"] = score(case, row["answer"])
            rows.append(row)
            print(f"task {system.name} {length} {kind}: {row['score']:.2f}", file=sys.stderr)
    swept = {(s.name, s.budget): s for s in setups.values()}  # keep_all (no budget) once
    for length in quality_lengths:
        ids, reference = quality_text(loaded, length, positions)
        for system in (swept[key] for key in sorted(swept, key=lambda k: (k[0], k[1] or 0))
                       if fits(swept[key], length)):
            values = teacher_forced(loaded, ids, reference, system.config, system.policy)
            quality.append({"system": system.name, "budget": system.budget, "length": length, **values})
            print(f"quality {system.name} budget {system.budget} {length}: median KL {values['median_kl']:.4g}",
                  file=sys.stderr)
    pictures = (plots.draw_baselines(systems, cells, rows, quality, budget, plots_beside)
                if plots_beside is not None else {})
    return {"config": {"budget": budget, "systems": list(systems), "lengths": list(lengths), "depths": list(depths),
                       "task_lengths": list(task_lengths), "kinds": list(kinds), "cases": cases,
                       "quality_lengths": list(quality_lengths), "positions": positions,
                       "kl_budgets": list(kl_budgets), "full_up_to": full_up_to, "archive": "ram",
                       "settings": {s.name: {**asdict(s.config), "policy": _describe(s.policy)} for s in at_budget},
                       "torch_threads": torch.get_num_threads()},
            "outputs": {"passkey": cells, "tasks": rows, "quality": quality,
                        "plots": {kind: receipts.portable_path(path) for kind, path in pictures.items()}},
            "metrics": _metrics(systems, cells, rows, quality, budget)}


def _describe(policy: Policy | None) -> dict | None:
    return None if policy is None else {"name": policy.name, **asdict(policy),
                                        "attention_decay": policy.attention_decay}


def _metrics(systems, cells, rows, quality, budget: int) -> dict:
    metrics = {}
    for name in systems:
        mine = [c for c in cells if c["system"] == name]
        for length in sorted({c["length"] for c in mine}):
            at = [c for c in mine if c["length"] == length]
            metrics[f"passkey_{name}_at_{length}"] = receipts.metric(sum(c["found"] for c in at), f"of {len(at)}")
            metrics[f"resident_bytes_{name}_at_{length}"] = receipts.metric(
                int(np.median([c["resident_bytes"] for c in at])), "bytes")
            metrics[f"resident_tokens_{name}_at_{length}"] = receipts.metric(
                int(max(c["resident_tokens"] for c in at)), "tokens per layer and kv-head")
        task_rows = [r for r in rows if r["system"] == name]
        for length in sorted({r["length"] for r in task_rows}):
            at = [r["score"] for r in task_rows if r["length"] == length]
            metrics[f"tasks_{name}_at_{length}"] = receipts.metric(round(float(np.mean(at)), 4),
                                                                  f"mean of {len(at)} cases")
        timed = mine + task_rows
        if timed:
            metrics[f"decode_ms_per_token_{name}"] = receipts.metric(
                round(float(np.median([c["decode_ms_per_token"] for c in timed])), 2), "ms/token")
            metrics[f"prefill_ms_per_token_{name}"] = receipts.metric(
                round(float(np.median([c["prefill_ms_per_token"] for c in timed])), 3), "ms/token")
        for q in quality:
            if q["system"] == name and q["budget"] in (budget, None):
                metrics[f"median_kl_{name}_at_{q['length']}"] = receipts.metric(round(q["median_kl"], 6), "nats")
                metrics[f"top1_{name}_at_{q['length']}"] = receipts.metric(round(q["top1"], 4), "fraction")
    return metrics
