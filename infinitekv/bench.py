"""Gates and benchmarks behind `ikv bench ...`. Each returns the parts of a receipt (config, inputs, outputs,
metrics, gates); the CLI adds the command, environment and hash. A gate asserts; a benchmark measures."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numba
import numpy as np
import torch

from infinitekv import adapters, plots, receipts
from infinitekv.attention import RetrievalConfig
from infinitekv.cache import cache_argument, returned_cache
from infinitekv.corpus import english_text
from infinitekv.engine import open_session
from infinitekv.models import LoadedModel, weights_sha256
from infinitekv.needles import passkey, two_facts
from infinitekv.tasks import KINDS, ROOM, make_case, score


def gate_weights(loaded: LoadedModel, config: RetrievalConfig) -> dict:
    """SHA-256 over every weight tensor before enabling and after disabling must be byte-identical."""
    config = RetrievalConfig.for_model(loaded.model.config, **asdict(config))  # the sizes the run uses
    before = weights_sha256(loaded.model)
    ids = loaded.tokenizer(english_text(4000), add_special_tokens=False)["input_ids"][:600]
    with open_session(loaded.model, tokenizer=loaded.tokenizer, config=config, mode="ram", fingerprint=before) as session:
        session.generate(ids, max_new_tokens=8)
    after = weights_sha256(loaded.model)
    return {
        "config": asdict(config),
        "outputs": {"sha256_before": before, "sha256_after": after},
        "metrics": {},
        "gates": {"weights_identical": receipts.gate(before == after, {"tensors": len(loaded.model.state_dict())})},
    }


def gate_equivalence(loaded: LoadedModel, prompt_tokens: int = 1500, new_tokens: int = 32) -> dict:
    """With the hot window covering everything, greedy output equals the unmodified model token for token."""
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer(english_text(prompt_tokens * 8), add_special_tokens=False)["input_ids"][:prompt_tokens]
    with torch.no_grad():
        reference = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
    expected = reference[0, len(ids):].tolist()
    config = RetrievalConfig(hot_window=prompt_tokens + new_tokens + 64)
    with open_session(model, tokenizer=tokenizer, config=config, mode="ram", fingerprint=loaded.weights_sha256) as session:
        got = session.generate(ids, max_new_tokens=new_tokens, stop_ids=set())
    first_difference = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    return {
        "config": {**asdict(config), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens},
        "outputs": {"tokens_sha256": receipts.text_input(" ".join(map(str, got)))["sha256"],
                    "text": tokenizer.decode(got)},
        "metrics": {"matching_tokens": receipts.metric(sum(a == b for a, b in zip(got, expected)), "tokens")},
        "gates": {"greedy_identical": receipts.gate(got == expected, {"first_difference": first_difference})},
    }


def _kl_and_top1(reference_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, bool]:
    p = torch.log_softmax(reference_logits.float(), dim=-1)
    q = torch.log_softmax(logits.float(), dim=-1)
    kl = float(torch.sum(p.exp() * (p - q)))
    return max(kl, 0.0), int(reference_logits.argmax()) == int(logits.argmax())


def bench_quality(loaded: LoadedModel, config: RetrievalConfig, lengths=(2048, 4096, 8192),
                  positions: int = 256) -> dict:
    """Teacher-forced KL and top-1 agreement against the unmodified model over the last `positions` tokens of
    real English text; the last positions go through the decode path, one token at a time, as generation does."""
    config = RetrievalConfig.for_model(loaded.model.config, **asdict(config))  # the sizes the run uses
    metrics, per_length = {}, {}
    for length in lengths:
        ids, reference = quality_text(loaded, length, positions)
        per_length[str(length)] = teacher_forced(loaded, ids, reference, config)
        for name, value in per_length[str(length)].items():
            unit = "nats" if "kl" in name else "tokens per layer and kv-head" if "cold" in name else "fraction"
            metrics[f"{name}_at_{length}"] = receipts.metric(round(value, 6), unit)
    return {
        "config": {**asdict(config), "lengths": list(lengths), "positions": positions,
                   "text": "pydoc_data.topics (Python standard library documentation)"},
        "outputs": {"per_length": per_length},
        "metrics": metrics,
    }


def quality_text(loaded: LoadedModel, length: int, positions: int) -> tuple[list[int], torch.Tensor]:
    """`length` tokens of real English text and the unmodified model's logits for its last `positions` + 1."""
    model = loaded.model
    ids = loaded.tokenizer(english_text(length * 8), add_special_tokens=False)["input_ids"][:length]
    with torch.no_grad():
        reference = model(torch.tensor([ids], device=model.device), use_cache=False,
                          logits_to_keep=positions + 1).logits[0]
    return ids, reference


def teacher_forced(loaded: LoadedModel, ids: list[int], reference: torch.Tensor, config: RetrievalConfig,
                   policy=None) -> dict:
    """KL and top-1 against `reference` (quality_text) at each of its positions but the last: the text before them
    read in chunks, then one token at a time. `policy`: an eviction baseline instead of retrieval."""
    positions = reference.shape[0] - 1
    kls, agree = [], []
    with open_session(loaded.model, tokenizer=loaded.tokenizer, config=config, mode="ram",
                      fingerprint=loaded.weights_sha256, policy=policy) as s:
        logits = s.feed(ids[: len(ids) - positions])
        for offset in range(positions):
            kl, same = _kl_and_top1(reference[offset], logits)
            kls.append(kl)
            agree.append(same)
            logits = s.feed([ids[len(ids) - positions + offset]])
        cold_per_step = s.counters.cold_tokens_per_step()
    kls_array = np.array(kls)
    return {"median_kl": float(np.median(kls_array)), "mean_kl": float(kls_array.mean()),
            "p90_kl": float(np.percentile(kls_array, 90)), "top1": float(np.mean(agree)),
            "cold_tokens_per_step": cold_per_step}


def _answer(loaded: LoadedModel, needle, config: RetrievalConfig, archive_dir: Path | None = None,
            max_new_tokens: int = 24) -> tuple[str, int, float]:
    """(reply, tokens read, cold tokens attended per step) through the engine."""
    mode = "disk" if archive_dir else "ram"
    with open_session(loaded.model, tokenizer=loaded.tokenizer, config=config, archive=str(archive_dir) if archive_dir
                else None, mode=mode, fingerprint=loaded.weights_sha256) as session:
        answer = session.ask(needle.question, needle.document, max_new_tokens=max_new_tokens)
        return answer, len(session.token_ids), session.counters.cold_tokens_per_step()


def _unmodified_answer(loaded: LoadedModel, needle, max_new_tokens: int = 24) -> str:
    tokenizer = loaded.tokenizer
    messages = [{"role": "user", "content": needle.document + "\n\n" + needle.question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"].to(loaded.model.device)
    with torch.no_grad():
        out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def passkey_grid(tokenizer, lengths, depths):
    """(length, depth, needle) for each cell of the passkey grid; each cell's needle is the same in every bench."""
    for length in lengths:
        for depth in depths:
            yield length, depth, passkey(tokenizer, length, depth, seed=int(depth * 1000) + length)


def bench_passkey(loaded: LoadedModel, config: RetrievalConfig, lengths=(4096, 12288), depths=(0.1, 0.3, 0.5, 0.7, 0.9),
                  unmodified_up_to: int = 8192, heatmap: Path | None = None) -> dict:
    """A grid of lengths x depths: retrieval on (disk archive), retrieval off (--top-k-cold 0), and the unmodified
    model where the length fits its trained window."""
    config = RetrievalConfig.for_model(loaded.model.config, **asdict(config))  # the sizes the run uses
    cells = []
    off = RetrievalConfig(**{**asdict(config), "top_k_cold": 0})
    with tempfile.TemporaryDirectory(prefix="ikv-passkey-") as scratch:
        for length, depth, needle in passkey_grid(loaded.tokenizer, lengths, depths):
            cell = {"length": length, "depth": depth, "key": needle.answer}
            archive_dir = Path(scratch) / f"{length}-{depth}"
            cell["on"], cell["tokens"], cell["cold_tokens_per_step"] = _answer(loaded, needle, config, archive_dir)
            shutil.rmtree(archive_dir, ignore_errors=True)
            cell["on_found"] = needle.answer in cell["on"]
            cell["off"], _, _ = _answer(loaded, needle, off)
            cell["off_found"] = needle.answer in cell["off"]
            if length <= unmodified_up_to:
                cell["unmodified"] = _unmodified_answer(loaded, needle)
                cell["unmodified_found"] = needle.answer in cell["unmodified"]
            cells.append(cell)
    metrics = {}
    for length in lengths:
        row = [c for c in cells if c["length"] == length]
        metrics[f"found_on_at_{length}"] = receipts.metric(sum(c["on_found"] for c in row), "of %d" % len(row))
        metrics[f"found_off_at_{length}"] = receipts.metric(sum(c["off_found"] for c in row), "of %d" % len(row))
        if length <= unmodified_up_to:
            metrics[f"found_unmodified_at_{length}"] = receipts.metric(
                sum(c["unmodified_found"] for c in row), "of %d" % len(row))
    metrics["cold_tokens_per_step"] = receipts.metric(
        round(float(np.mean([c["cold_tokens_per_step"] for c in cells])), 2), "tokens per layer and kv-head")
    if heatmap is not None:
        _draw_heatmap(cells, lengths, depths, heatmap)
    return {"config": {**asdict(config), "lengths": list(lengths), "depths": list(depths)},
            "outputs": {"cells": cells, "heatmap": receipts.portable_path(heatmap) if heatmap else None},
            "metrics": metrics}


def bench_fork(loaded: LoadedModel, config: RetrievalConfig, archive_dir: Path, tokens: int = 12288,
               max_new_tokens: int = 24) -> dict:
    """Several questions about one long document, each on its own fork of the cache, through plain
    `model.generate(..., past_key_values=fork)`: the document is read once into a disk archive and committed; each
    question then feeds only its own tokens, and no answer leaks into the next (each is also asked again on the
    document's own cache after `crop`, which must give the same reply)."""
    from infinitekv.engine import enable

    config = RetrievalConfig.for_model(loaded.model.config, **asdict(config))
    model, tokenizer = loaded.model, loaded.tokenizer
    document, needles = two_facts(tokenizer, tokens)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": document + "\n\n" + n.question}],
                                             add_generation_prompt=True, return_tensors="pt", return_dict=True)
               ["input_ids"].to(model.device) for n in needles]
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0][0].tolist(), prompts[1][0].tolist())) if a != b)
    generate = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    rows = []
    with enable(model, archive=str(archive_dir), config=config, fingerprint=loaded.weights_sha256) as cache:
        start = time.perf_counter()
        with torch.no_grad():
            model(prompts[0][:, :shared], logits_to_keep=1, **{cache_argument(model): cache})
        cache.commit()
        read_seconds = time.perf_counter() - start
        for needle, ids in zip(needles, prompts):
            fork = cache.fork()
            before = len(fork.token_ids)
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, **{cache_argument(model): fork}, **generate)
            seconds = time.perf_counter() - start
            reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            rows.append({"question": needle.question, "expected": needle.answer, "reply": reply,
                         "correct": needle.answer in reply, "prefill_tokens": ids.shape[1] - before,
                         "seconds": round(seconds, 2)})
        for row, ids in zip(reversed(rows), reversed(prompts)):  # again on the document's cache, newest first
            cache.crop(shared)
            with torch.no_grad():
                out = model.generate(ids, **{cache_argument(model): cache}, **generate)
            row["same_reply_after_crop"] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == \
                row["reply"]
        cold = len(cache.archive.signatures(0))
    reference_tokens = min(tokens, adapters.trained_window(model.config) - REFERENCE_ROOM)
    reference = unmodified_two_facts(loaded, reference_tokens, max_new_tokens)
    metrics = {
        "document_tokens": {"value": shared, "unit": "tokens"},
        "cold_tokens": {"value": cold, "unit": "tokens"},
        "read_seconds": {"value": round(read_seconds, 1), "unit": "s"},
        "max_question_prefill_tokens": {"value": max(r["prefill_tokens"] for r in rows), "unit": "tokens"},
        "correct": {"value": sum(r["correct"] for r in rows), "unit": f"of {len(rows)}"},
        "unmodified_correct_inside_window": {"value": sum(r["correct"] for r in reference), "unit": f"of {len(rows)}"},
    }
    gates = {
        "answers_from_forks": receipts.gate(all(r["correct"] for r in rows), "every forked question answered correctly"),
        "no_reread": receipts.gate(all(r["prefill_tokens"] < 64 for r in rows),
                           "each question fed fewer than 64 tokens (the document was not re-read)"),
        "no_leak": receipts.gate(all(r["same_reply_after_crop"] for r in rows),
                         "each reply equals the reply on the document's own cache cropped back to the commit"),
    }
    return {"config": {**asdict(config), "tokens": tokens, "max_new_tokens": max_new_tokens, "archive": "disk",
                       "text": "pydoc_data.topics (Python standard library documentation) with two planted facts"},
            "outputs": {"questions": rows, "unmodified_inside_window": {"tokens": reference_tokens,
                                                                          "questions": reference}},
            "metrics": metrics, "gates": gates,
            "inputs": {"document": {"sha256": hashlib.sha256(document.encode()).hexdigest(),
                                    "bytes": len(document.encode())}}}


REFERENCE_ROOM = 512  # tokens left inside the trained window for the question and the answer


def unmodified_two_facts(loaded: LoadedModel, tokens: int, max_new_tokens: int) -> list[dict]:
    """The same two facts asked of the unmodified model (full cache) in a document short enough for its trained
    window: what the model itself answers, so a miss past the window can be told from a question it never gets."""
    model, tokenizer = loaded.model, loaded.tokenizer
    _, needles = two_facts(tokenizer, tokens)
    rows = []
    for needle in needles:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": needle.document + "\n\n" + needle.question}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        rows.append({"question": needle.question, "expected": needle.answer, "reply": reply,
                     "correct": needle.answer in reply})
    return rows


def task_cases(tokenizer, lengths, kinds=KINDS, cases: int = 1, seed: int = 0):
    """(length, kind, index, case) for the task suite: each case leaves ROOM tokens of `length` for the answer."""
    for length in lengths:
        for kind in kinds:
            for index in range(cases):
                yield length, kind, index, make_case(tokenizer, kind, length - ROOM, seed * 1000 + index)


def bench_tasks(loaded: LoadedModel, config: RetrievalConfig, lengths=(4096, 8192, 12288, 32768), kinds=KINDS,
                cases: int = 1, seed: int = 0, unmodified_up_to: int | None = None) -> dict:
    """The task suite (`tasks.py`) at each length (the whole conversation, answer included, fits it): the engine, the
    engine with cold retrieval off (sinks + window), and the unmodified model where the prompt fits its trained
    window. Scores are fractions of expected values."""
    config = RetrievalConfig.for_model(loaded.model.config, **asdict(config))  # the sizes the run uses
    from infinitekv.adapters import trained_window

    unmodified_up_to = unmodified_up_to or trained_window(loaded.model.config)
    off = RetrievalConfig(**{**asdict(config), "top_k_cold": 0})
    rows = []
    for length, kind, index, case in task_cases(loaded.tokenizer, lengths, kinds, cases, seed):
        row = {"length": length, "kind": kind, "case": index, "question": case.question, "answers": case.answers}
        row["on"], row["tokens"], row["cold_tokens_per_step"] = _answer(loaded, case, config, max_new_tokens=48)
        row["off"], _, _ = _answer(loaded, case, off, max_new_tokens=48)
        row["on_score"], row["off_score"] = score(case, row["on"]), score(case, row["off"])
        if row["tokens"] <= unmodified_up_to:
            row["unmodified"] = _unmodified_answer(loaded, case, max_new_tokens=48)
            row["unmodified_score"] = score(case, row["unmodified"])
        rows.append(row)
    metrics = {}
    for length in lengths:
        at = [r for r in rows if r["length"] == length]
        for system in ("on", "off", "unmodified"):
            scored = [r[f"{system}_score"] for r in at if f"{system}_score" in r]
            if scored:
                metrics[f"score_{system}_at_{length}"] = receipts.metric(round(float(np.mean(scored)), 4),
                                                                        f"mean of {len(scored)} cases")
    metrics["cold_tokens_per_step"] = receipts.metric(
        round(float(np.mean([r["cold_tokens_per_step"] for r in rows])), 2), "tokens per layer and kv-head")
    return {"config": {**asdict(config), "lengths": list(lengths), "kinds": list(kinds), "cases": cases,
                       "seed": seed, "unmodified_up_to": unmodified_up_to},
            "outputs": {"rows": rows}, "metrics": metrics}


def _capture_qk(model, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pre-RoPE queries [Hq, L, D] and keys [Hk, L, D] of every layer, from one pass of the unmodified model.

    The model's attention modules project, normalise and rotate as always; an attention function registered for
    this pass records what they hand over, undoes RoPE with the cos/sin the module used, and attends with SDPA.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from infinitekv.attention import unrotate

    tables, captured, hooks = {}, {}, []

    def remember_tables(module, args, kwargs):
        tables[module] = kwargs["position_embeddings"]

    def capture(module, query, key, value, attention_mask, **kwargs):
        cos, sin = (t[0].float() for t in tables[module])
        captured[module] = (unrotate(query[0].float(), cos, sin), unrotate(key[0].float(), cos, sin))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE, capture)
    AttentionMaskInterface.register(_CAPTURE, sdpa_mask)
    modules = adapters.attention_modules(model)
    previous = model.config._attn_implementation
    hooks = [attn.register_forward_pre_hook(remember_tables, with_kwargs=True) for attn in modules]
    model.set_attn_implementation(_CAPTURE)
    try:
        with torch.no_grad():
            model(torch.tensor([ids], device=model.device), use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
        for hook in hooks:
            hook.remove()
    return [captured[m][0] for m in modules], [captured[m][1] for m in modules]


_CAPTURE = "infinitekv_capture"


def bench_coverage(loaded: LoadedModel, config: RetrievalConfig, lengths=(2048, 4096, 8192, 12288),
                   queries: int = 16, heatmap: Path | None = None) -> dict:
    """Share of the exact softmax mass on sinks + window + retrieved tokens, per layer and kv-head, for decode
    queries and prefill blocks, against the oracle (the exact best cold tokens, as many) and the hot tier alone.
    Retrieval is measured at every length, also inside `dense_up_to` where the engine itself attends exactly."""
    config = RetrievalConfig.for_model(loaded.model.config, **asdict(config))  # the sizes the run uses
    from infinitekv import codec
    from infinitekv.attention import Rope, select_blocks, select_cold, selection_queries
    from infinitekv.coverage import ColdRecords, covered_mass

    model, tokenizer = loaded.model, loaded.tokenizer
    n_layers = model.config.num_hidden_layers
    text_ids = tokenizer(english_text(max(lengths) * 8), add_special_tokens=False)["input_ids"]
    rope = Rope(adapters.rotary_embedding(model), torch.float32, "cpu")
    s, w, block = config.sinks, config.hot_window, config.select_block
    per_length, metrics = {}, {}
    for length in lengths:
        ids = text_ids[:length]
        all_q, all_k = _capture_qk(model, ids)
        n_kv, _, head_dim = all_k[0].shape
        rotation = codec.rotation_matrix(head_dim, config.rotation_seed)
        positions = np.linspace(length - 8 * block, length - 1, queries).astype(int)
        table = {mode: {part: np.zeros((n_layers, n_kv)) for part in ("retrieved", "oracle", "hot")}
                 for mode in ("decode", "prefill")}
        for layer, attn in enumerate(adapters.attention_modules(model)):
            q_pre, k_pre = all_q[layer], all_k[layer]
            key_mean = k_pre[:, s : s + w + config.evict_batch].mean(dim=1).numpy()
            centred = ((k_pre[:, s:].numpy() - key_mean[:, None]) @ rotation.T).transpose(1, 0, 2)  # [n, Hk, D]
            values = all_k[layer].new_zeros(centred.shape).numpy()  # values do not enter the softmax
            records = codec.encode_records(centred.reshape(-1, head_dim), values.reshape(-1, head_dim)).reshape(
                centred.shape[0], n_kv, -1)
            keys_roped = rope.rotate(k_pre, 0)  # [Hk, L, D] at true positions
            for mode in ("decode", "prefill"):
                for t in positions:
                    first = t if mode == "decode" else t - block + 1  # the block's first query
                    n_cold = first - w - s
                    retrieved = min(config.top_k_cold, n_cold)
                    q_block = q_pre[:, first : t + 1]  # [Hq, C, D]
                    q_grouped = selection_queries(q_block, w + (retrieved + 1) // 2, rope, n_kv).cpu().numpy()
                    picked = select_cold(ColdRecords(records[:n_cold], head_dim, rotation), layer, q_grouped,
                                         select_blocks(q_block.shape[1], block), config, retrieved)
                    q_last = rope.rotate(q_pre[:, t : t + 1], int(t))[:, 0]  # [Hq, D]: the block's last query
                    logits = (q_last.view(n_kv, -1, head_dim) @ keys_roped[:, : t + 1].transpose(1, 2)).numpy()
                    hot = np.zeros(t + 1, dtype=bool)
                    hot[:s] = True
                    hot[first - w :] = True
                    for h in range(n_kv):
                        shares = covered_mass(logits[h] * attn.scaling, hot, s + picked[h, -1])
                        for part in ("retrieved", "oracle", "hot"):
                            table[mode][part][layer, h] += getattr(shares, part) / len(positions)
        per_length[str(length)] = {mode: {part: grid.round(4).tolist() for part, grid in parts.items()}
                                   for mode, parts in table.items()}
        for mode, parts in table.items():
            for part, grid in parts.items():
                metrics[f"{mode}_{part}_mass_at_{length}"] = receipts.metric(round(float(grid.mean()), 4),
                                                                             "fraction")
        del all_q, all_k
    if heatmap is not None:
        _draw_coverage(per_length, heatmap)
    return {"config": {**asdict(config), "lengths": list(lengths), "queries": queries,
                       "text": "pydoc_data.topics (Python standard library documentation)"},
            "outputs": {"per_length": per_length,
                        "heatmap": receipts.portable_path(heatmap) if heatmap else None},
            "metrics": metrics}


def _draw_coverage(per_length: dict, path: Path) -> None:
    """Layer x kv-head maps of covered mass at each length: decode retrieved, prefill retrieved, oracle."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional; the receipt holds every number
        return
    panels = [("decode", "retrieved"), ("prefill", "retrieved"), ("decode", "oracle"), ("decode", "hot")]
    fig, axes = plt.subplots(len(per_length), len(panels), figsize=(2.6 * len(panels), 3.2 * len(per_length)),
                             squeeze=False)
    for row, (length, table) in enumerate(per_length.items()):
        for col, (mode, part) in enumerate(panels):
            axis = axes[row][col]
            image = axis.imshow(np.array(table[mode][part]), cmap="viridis", vmin=0, vmax=1, aspect="auto")
            axis.set_title(f"{int(length):,}: {mode} {part}", fontsize=8)
            axis.set_xlabel("kv-head", fontsize=7)
            axis.set_ylabel("layer", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="exact softmax mass covered")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _draw_heatmap(cells, lengths, depths, path: Path) -> None:
    """Found (1) / missed (0) per length x depth, retrieval on and off side by side, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional; the receipt holds every cell
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3 + 0.3 * len(lengths)))
    for axis, key, title in ((axes[0], "on_found", "retrieval on"), (axes[1], "off_found", "retrieval off")):
        grid = np.array([[next(c[key] for c in cells if c["length"] == n and c["depth"] == d) for d in depths]
                         for n in lengths], dtype=float)
        axis.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        axis.set_xticks(range(len(depths)), [f"{d:.1f}" for d in depths])
        axis.set_yticks(range(len(lengths)), [f"{n:,}" for n in lengths])
        axis.set_xlabel("needle depth")
        axis.set_ylabel("context tokens")
        axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench_memory(loaded: LoadedModel, config: RetrievalConfig, tokens: int = 12288, points: int = 8,
                 plot: Path | None = None) -> dict:
    """The memory bill after reading `tokens` tokens of text into a disk archive, and at `points` lengths on the way
    (drawn as a PNG at `plot`: the bill vs context length)."""
    config = RetrievalConfig.for_model(loaded.model.config, **asdict(config))  # the sizes the run uses
    ids = loaded.tokenizer(english_text(tokens * 8), add_special_tokens=False)["input_ids"][:tokens]
    # stops on chunk boundaries, so the pieces are read in exactly the chunks one feed of every token would use
    chunks = -(-len(ids) // config.chunk_size)
    stops = sorted({min(len(ids), config.chunk_size * -(-chunks * i // points)) for i in range(1, points + 1)})
    series = []
    with tempfile.TemporaryDirectory(prefix="ikv-memory-") as scratch:
        archive_dir = Path(scratch) / "mem"
        with open_session(loaded.model, tokenizer=loaded.tokenizer, config=config, archive=str(archive_dir),
                    fingerprint=loaded.weights_sha256) as session:
            for begin, end in zip([0] + stops, stops):
                session.feed(ids[begin:end])
                series.append(session.memory_bill())
            session.commit()
            bill = session.memory_bill()
        disk = sum(p.stat().st_blocks * 512 for p in archive_dir.iterdir() if p.is_file())
    bill["archive_disk_bytes_allocated"] = disk
    metrics = {name: receipts.metric(value, "bytes") for name, value in bill.items()
               if name.endswith("bytes") or name.endswith("bytes_resident") or name.endswith("allocated")}
    metrics["tokens"] = receipts.metric(bill["tokens"], "tokens")
    metrics["cold_tokens"] = receipts.metric(bill["cold_tokens"], "tokens")
    metrics["resident_fraction_of_fp16"] = receipts.metric(round(bill["resident_fraction_of_fp16"], 6), "fraction")
    if plot is not None:
        plots.draw_memory_bill(series, plot)
    return {"config": {**asdict(config), "tokens": tokens, "points": points},
            "outputs": {"bill": bill, "series": series, "plot": receipts.portable_path(plot) if plot else None},
            "metrics": metrics,
            "gates": {"resident_at_most_1_25_of_fp16": receipts.gate(
                bill["resident_fraction_of_fp16"] <= 1 / 25 + 1e-12,
                {"fraction": bill["resident_fraction_of_fp16"]})}}




FLOOR_CONTEXT = 512  # tokens of context for the model's own decode step, the speed floor


def bench_speed(loaded: LoadedModel, config: RetrievalConfig, lengths=(4096, 12288, 32768),
                baseline_up_to: int = 12288, decode_steps: int = 16, busy_at: tuple[int, ...] = ()) -> dict:
    """Prefill time and decode latency, InfiniteKV against the unmodified full-cache model, side by side in one run,
    and the floor: the model's own decode step at a FLOOR_CONTEXT-token context.

    The baseline runs only up to `baseline_up_to` tokens: past that its cache outgrows what we want to hold, and
    past 8,192 its answers are gibberish anyway. Decode latency is the median over `decode_steps` greedy steps, the
    engine's and the full cache's steps taken in turns so that both see the same machine.
    busy_at: lengths measured again with one other busy process on the machine (a CPU-bound loop started for the
    purpose): how much worse the engine's ratios to the full cache get when the cores are not all ours."""
    config = RetrievalConfig.for_model(loaded.model.config, **asdict(config))  # the sizes the run uses
    model, tokenizer = loaded.model, loaded.tokenizer
    text_ids = tokenizer(english_text(max(lengths + tuple(busy_at)) * 8), add_special_tokens=False)["input_ids"]
    rows, metrics = [], {}
    warm = warm_up(loaded, config, text_ids)
    metrics["warm_up_s"] = receipts.metric(round(warm["seconds"], 3), "s")
    # the floor: the model's own decode step with a short full cache, what no cache strategy can beat
    floor = _FullCache(model, text_ids[:FLOOR_CONTEXT])
    floor_ms = 1000 * float(np.median([floor.step() for _ in range(decode_steps)]))
    metrics[f"floor_decode_ms_at_{FLOOR_CONTEXT}"] = receipts.metric(round(floor_ms, 3), "ms/token")
    for length in lengths:
        row = _side_by_side(loaded, config, text_ids[:length], decode_steps, baseline=length <= baseline_up_to)
        rows.append(row)
        _speed_metrics(metrics, row, "")
        metrics[f"decode_over_floor_at_{length}"] = receipts.metric(round(row["ikv_decode_ms"] / floor_ms, 3),
                                                                    "ms/ms")
    busy_rows = []
    for length in busy_at:
        quiet = _side_by_side(loaded, config, text_ids[:length], decode_steps, baseline=True)
        with busy_process():
            busy = _side_by_side(loaded, config, text_ids[:length], decode_steps, baseline=True)
        busy_rows.append({"quiet": quiet, "busy": busy})
        _speed_metrics(metrics, busy, "busy_")
        for phase, key in (("prefill", "prefill_speedup"), ("decode", "decode_speedup")):
            worsening = quiet[key] / busy[key]  # speedup = full / engine, so this is the ratio engine/full, busy/quiet
            metrics[f"busy_{phase}_ratio_worsening_at_{length}"] = receipts.metric(round(worsening, 3), "x")
    return {"config": {**asdict(config), "lengths": list(lengths), "baseline_up_to": baseline_up_to,
                       "decode_steps": decode_steps, "busy_at": list(busy_at), "torch_threads": torch.get_num_threads(),
                       "numba_threads": numba.get_num_threads()},
            "outputs": {"warm_up": warm, "rows": rows, "busy_rows": busy_rows}, "metrics": metrics}


def warm_up(loaded: LoadedModel, config: RetrievalConfig, text_ids: list[int]) -> dict:
    """One short untimed read and a few steps through every path the timed rows take (exact, retrieval, the
    two-level index) and through the full cache: the first timed row must not carry the process's one-time costs
    (numba loading its compiled kernels, first calls into torch), which the full cache, timed after the engine in
    each row, would not (measured at 762c04e: the first 4,096-token row read in 10.0 s, the same length later in the
    same run 7.4 s). Returns its row, with the seconds the whole warm-up took."""
    window = config.hot_window
    small = replace(config, dense_up_to=min(config.dense_up_to, window),
                    cluster_segment=min(config.cluster_segment, window))
    start = time.perf_counter()
    row = _side_by_side(loaded, small, text_ids[: 3 * window + config.chunk_size], decode_steps=2, baseline=True)
    return {**row, "seconds": time.perf_counter() - start}


def _speed_metrics(metrics: dict, row: dict, prefix: str) -> None:
    length = row["length"]
    for name, value in row.items():
        if name not in ("length", "load_average", "prefill_speedup", "decode_speedup"):
            unit = ("s" if name.endswith("_s") else "tokens per layer and kv-head" if "cold" in name
                    else "forwards" if "forwards" in name else "ms/token")
            metrics[f"{prefix}{name}_at_{length}"] = receipts.metric(round(value, 3), unit)
    if "full_prefill_s" in row:
        for name in ("prefill_speedup", "decode_speedup"):
            metrics[f"{prefix}{name}_at_{length}"] = receipts.metric(round(row[name], 3), "s/s")


def _side_by_side(loaded: LoadedModel, config: RetrievalConfig, ids: list[int], decode_steps: int,
                  baseline: bool) -> dict:
    """The engine's prefill, the full cache's, then their decode steps in turns (the medians)."""
    row = {"length": len(ids), "load_average": os.getloadavg()[0]}
    with open_session(loaded.model, tokenizer=loaded.tokenizer, config=config, mode="ram",
                      fingerprint=loaded.weights_sha256) as session, torch.no_grad():
        start = time.perf_counter()
        logits = session.feed(ids)
        row["ikv_prefill_s"] = finished(start, loaded.model)
        full = _FullCache(loaded.model, ids) if baseline else None
        ikv_steps, full_steps = [], []
        for _ in range(decode_steps):
            start = time.perf_counter()
            logits = session.feed([int(logits.argmax())])
            ikv_steps.append(finished(start, loaded.model))
            if full is not None:
                full_steps.append(full.step())
        row["ikv_decode_ms"] = 1000 * float(np.median(ikv_steps))
        row["cold_tokens_per_step"] = session.counters.cold_tokens_per_step()
        row["forwards_on_fewer_threads"] = session.counters.forwards_on_fewer_threads
    if full is not None:
        row["full_prefill_s"] = full.prefill_s
        row["full_decode_ms"] = 1000 * float(np.median(full_steps))
        row["prefill_speedup"] = row["full_prefill_s"] / row["ikv_prefill_s"]
        row["decode_speedup"] = row["full_decode_ms"] / row["ikv_decode_ms"]
    return row


@contextlib.contextmanager
def busy_process():
    """One other CPU-bound process on the machine for the duration (a pure-Python loop: it holds one core)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)  # running before the measurement starts
        yield hog
    finally:
        hog.kill()
        hog.wait()


def finished(start: float, model) -> float:
    """Seconds since `start` once the model's device has done the work queued so far (a GPU runs behind the host)."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - start


class _FullCache:
    """The unmodified model with its own cache: its prefill is timed on creation, then `step` times one greedy
    decode step at a time, so a caller can take its steps in turns with the engine's."""

    def __init__(self, model, ids: list[int]):
        with torch.no_grad():
            start = time.perf_counter()
            out = model(torch.tensor([ids], device=model.device), use_cache=True, logits_to_keep=1)
            self.prefill_s = finished(start, model)
        self.model, self.cache, self.token = model, returned_cache(out), out.logits[0, -1].argmax()

    def step(self) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            out = self.model(self.token.view(1, 1), use_cache=True, logits_to_keep=1,
                             **{cache_argument(self.model): self.cache})
            seconds = finished(start, self.model)
        self.cache, self.token = returned_cache(out), out.logits[0, -1].argmax()
        return seconds


def _weighted_estimate(x: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The weighted first stage's score of keys x [n, D] for one query [D]: mean|x| * sum_d q_d * sign(x_d)."""
    return np.abs(x).mean(1) * (np.where(x < 0, -1.0, 1.0) @ query)


def _two_level_recall(captured, span, exact: dict, segment: int, shortlists) -> dict:
    """One layer's recall of the exact top-k (`exact[(t, h)]`, a set of cold-token indices) through the two-level
    index (see bench_recall)."""
    from infinitekv import codec
    from infinitekv.attention import PROBE
    from infinitekv.index import ClusterIndex

    k_pre, q, mean, rotation = captured
    sinks, hot_window, first, last = span
    n_kv, head_dim = k_pre.shape[1], k_pre.shape[2]
    x = ((k_pre - mean) @ rotation.T).astype(np.float32)
    records = codec.encode_records(x.reshape(-1, head_dim), np.zeros((x.shape[0] * n_kv, head_dim), np.float32))
    decoded = codec.decode_keys_rotated(records, head_dim).reshape(x.shape)  # what the archive's records hold
    clusters = ClusterIndex.from_keys(decoded[sinks : first - hot_window], segment)
    hits = {size: [] for size in shortlists}
    for t in range(first, last):
        cold_end = t - hot_window
        turned = q[t] @ rotation.T  # [Hk, D]
        for h in range(n_kv):
            want = exact[(t, h)]
            tail = decoded[sinks + clusters.covered : cold_end, h]
            estimate = _weighted_estimate(tail, turned[h])
            order = clusters.covered + np.lexsort((np.arange(len(estimate)), -estimate))
            for size in shortlists:  # the engine's split: the tail's share of L in proportion to its tokens, and
                # the clusters' places filled from PROBE times as many members, ranked by the same signature score
                tail_k = -(-size * len(tail) // (cold_end - sinks))
                probed = clusters.candidates(turned[None, :, None, :], PROBE * (size - tail_k))[0, h]
                by_signature = _weighted_estimate(decoded[sinks + probed, h], turned[h])
                picked = probed[np.lexsort((probed, -by_signature))[: size - tail_k]]
                hits[size].append(len(want & (set(picked) | set(order[:tail_k]))) / len(want))
    return {str(size): float(np.mean(v)) for size, v in hits.items()}


def bench_recall(loaded: LoadedModel, tokens: int = 6000, queries: int = 32, hot_window: int = 512, k: int = 32,
                 layers=(0, 5, 10, 15, 20, 25, 29), shortlists=(32, 64, 128, 256, 512, 1024), segment: int = 0) -> dict:
    """Recall of the exact top-k cold tokens (by GQA-summed pre-RoPE q.k) in the first-stage shortlist, for the
    signature designs we considered, on real English text through the unmodified model.

    segment > 0 adds the two-level index as the engine runs it (index.py, attention.select_cold_blocks): complete
    segments of that many cold tokens clustered by their int8-decoded keys, the shortlist of L shared between the
    best clusters' members (PROBE times as many probed, the best kept by signature score) and the weighted scan of
    the tokens after the last complete segment, in proportion to the tokens each holds."""
    from infinitekv import codec

    model, tokenizer = loaded.model, loaded.tokenizer
    config = model.config
    ids = tokenizer(english_text(tokens * 8), add_special_tokens=False)["input_ids"][:tokens]
    captured_q, captured_k = _capture_qk(model, ids)  # [Hq, L, D], [Hk, L, D] per layer
    n_kv, head_dim = config.num_key_value_heads, config.head_dim
    group = config.num_attention_heads // n_kv
    rotation = codec.rotation_matrix(head_dim, 0)
    sinks = 4
    table = {}
    for layer in layers:
        q = captured_q[layer].transpose(0, 1).reshape(-1, n_kv, group, head_dim).sum(2).numpy()
        k_pre = captured_k[layer].transpose(0, 1).numpy()
        mean = k_pre[:1024].mean(0)
        designs = {
            "sign(k), hamming": (k_pre, None, "hamming"),
            "sign(k - mu), hamming": (k_pre - mean, None, "hamming"),
            "sign(R(k - mu)), hamming": ((k_pre - mean) @ rotation.T, rotation, "hamming"),
            "sign(k - mu), weighted": (k_pre - mean, None, "weighted"),
            "sign(R(k - mu)), weighted [chosen]": ((k_pre - mean) @ rotation.T, rotation, "weighted"),
        }
        positions = range(len(ids) - queries, len(ids))
        exact = {(t, h): set(np.lexsort((np.arange(t - hot_window - sinks),
                                         -(k_pre[sinks : t - hot_window, h] @ q[t, h])))[:k])
                 for t in positions for h in range(n_kv)}  # the top-k each design is measured against
        for name, (x, turn, mode) in designs.items():
            hits = {size: [] for size in shortlists}
            for t in positions:
                cold_end = t - hot_window
                for h in range(n_kv):
                    query = turn @ q[t, h] if turn is not None else q[t, h]
                    xs = x[sinks:cold_end, h]
                    if mode == "hamming":
                        estimate = -((xs < 0) != (query < 0)).sum(1).astype(np.float64)
                    else:
                        estimate = _weighted_estimate(xs, query)
                    order = np.lexsort((np.arange(len(estimate)), -estimate))
                    for size in shortlists:
                        hits[size].append(len(exact[(t, h)] & set(order[:size])) / k)
            table.setdefault(name, {})[str(layer)] = {str(size): float(np.mean(v)) for size, v in hits.items()}
        if segment:
            name = f"two-level: clusters of {segment}-token segments + weighted tail, L shared"
            table.setdefault(name, {})[str(layer)] = _two_level_recall(
                (k_pre, q, mean, rotation), (sinks, hot_window, positions.start, positions.stop), exact, segment,
                shortlists)
    metrics = {}
    for name, per_layer in table.items():
        for size in shortlists:
            value = float(np.mean([per_layer[str(layer)][str(size)] for layer in layers]))
            metrics[f"recall@{size} {name}"] = receipts.metric(round(value, 4), "fraction")
    return {"config": {"tokens": tokens, "queries": queries, "hot_window": hot_window, "k": k, "layers": list(layers),
                       "shortlists": list(shortlists), "sinks": sinks, "segment": segment,
                       "text": "pydoc_data.topics (Python standard library documentation)"},
            "outputs": {"per_layer": table}, "metrics": metrics}
