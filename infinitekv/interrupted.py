"""`ikv bench interrupted`: a long read killed with SIGKILL midway, resumed from its last checkpoint, must give the
answer an uninterrupted read gives; the receipt says how many tokens the checkpoint saved and how many were re-read.

Three real `ikv run` processes on the same document and question: an uninterrupted one, one killed once its
progress bar passes `kill_at` of the chunks, and `--resume` on the killed one's archive.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from infinitekv import receipts
from infinitekv.errors import IKVError

_PROGRESS = re.compile(rb"\] (\d+)/(\d+) chunks, ([\d,]+) tokens")


def _run(args: list[str], work: Path) -> dict:
    """One `ikv run` to completion: its answer and its receipt."""
    receipt = work / f"receipt-{len(list(work.glob('receipt-*')))}.json"
    done = subprocess.run([*receipts.launch_prefix(), "run", *args, "--receipt", str(receipt)], capture_output=True,
                          text=True, cwd=work)
    if done.returncode != 0:
        raise IKVError(f"ikv run exited {done.returncode}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return {"answer": done.stdout.strip(), "receipt": json.loads(receipt.read_text())}


def _run_and_kill(args: list[str], work: Path, kill_at: float) -> tuple[int, int, int]:
    """Start `ikv run`, SIGKILL it once `kill_at` of its prefill chunks are done: (chunks, total, tokens read)."""
    proc = subprocess.Popen([*receipts.launch_prefix(), "run", *args, "--receipt", str(work / "killed.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=work, start_new_session=True)
    seen = b""
    try:
        while True:
            block = os.read(proc.stderr.fileno(), 4096)
            if not block:
                raise IKVError(f"ikv run ended before it could be interrupted: {seen[-300:].decode(errors='replace')}")
            seen += block
            found = _PROGRESS.findall(seen)
            if found:
                done, total, tokens = int(found[-1][0]), int(found[-1][1]), int(found[-1][2].replace(b",", b""))
                if done >= kill_at * total:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return done, total, tokens
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()


def bench_interrupted(prompt_file: Path, question: str, *, model: str, kill_at: float, checkpoint_every: int,
                      max_new_tokens: int) -> dict:
    """Receipt parts: the same answer with and without an interruption, and what the checkpoint saved."""
    prompt = Path(prompt_file).resolve()
    with tempfile.TemporaryDirectory(prefix="ikv-interrupted-") as tmp:
        work = Path(tmp)
        common = ["--model", model, "--prompt-file", str(prompt), "--question", question, "--max-new-tokens",
                  str(max_new_tokens), "--checkpoint-every", str(checkpoint_every)]
        clock = time.perf_counter()
        whole = _run(["--archive", str(work / "whole"), *common], work)
        whole_s = time.perf_counter() - clock
        clock = time.perf_counter()
        chunks, total, read_before_kill = _run_and_kill(["--archive", str(work / "cut"), *common], work, kill_at)
        killed_s = time.perf_counter() - clock
        clock = time.perf_counter()
        resumed = _run(["--archive", str(work / "cut"), "--resume", *common], work)
        resumed_s = time.perf_counter() - clock
    kept = resumed["receipt"]["metrics"]["checkpoint_tokens"]["value"]
    read_again = resumed["receipt"]["metrics"]["prefill_tokens"]["value"]
    whole_read = whole["receipt"]["metrics"]["prefill_tokens"]["value"]
    same = whole["answer"] == resumed["answer"]
    return {
        "config": {"kill_at": kill_at, "checkpoint_every": checkpoint_every, "max_new_tokens": max_new_tokens,
                   "chunk_size": whole["receipt"]["config"]["chunk_size"]},
        "inputs": {"prompt_file": receipts.file_input(prompt_file), "question": receipts.text_input(question)},
        "outputs": {"answer_uninterrupted": whole["answer"], "answer_resumed": resumed["answer"]},
        "metrics": {
            "prompt_tokens": receipts.metric(whole_read, "tokens"),
            "killed_after_chunks": receipts.metric(chunks, "chunks"),
            "total_chunks": receipts.metric(total, "chunks"),
            "tokens_read_before_kill": receipts.metric(read_before_kill, "tokens"),
            "checkpoint_tokens": receipts.metric(kept, "tokens"),
            "reread_tokens": receipts.metric(read_before_kill - kept, "tokens"),
            "resumed_read_tokens": receipts.metric(read_again, "tokens"),
            "uninterrupted_run_s": receipts.metric(round(whole_s, 1), "s"),
            "killed_run_s": receipts.metric(round(killed_s, 1), "s"),
            "resumed_run_s": receipts.metric(round(resumed_s, 1), "s"),
        },
        "gates": {
            "same_answer": receipts.gate(same, "the resumed read answers exactly like the uninterrupted one"),
            "resumed_from_checkpoint": receipts.gate(
                kept > 0 and kept + read_again == whole_read,
                f"{kept:,} tokens kept by the checkpoint + {read_again:,} read after resuming = {whole_read:,}"),
        },
    }
