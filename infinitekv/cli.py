"""`ikv`: the command line. Each command is a thin shell over a library function; errors a user can fix are
`IKVError`s printed as one line with exit code 2."""

from __future__ import annotations

import math
import os
import re
import stat
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Optional

import typer

from infinitekv.attention import RetrievalConfig
from infinitekv.tasks import KINDS
from infinitekv.archive import UNPACK_MAX_BYTES
from infinitekv.engine import CHECKPOINT_EVERY
from infinitekv.errors import IKVError
from infinitekv.models import DEFAULT_MODEL
from infinitekv.policies import POLICIES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="InfiniteKV: never drop a token of context.")
archive_app = typer.Typer(no_args_is_help=True, help="Pack, unpack and manage archives.")
bench_app = typer.Typer(no_args_is_help=True, help="Gates and benchmarks; each writes a receipt.")
app.add_typer(archive_app, name="archive")
app.add_typer(bench_app, name="bench")


def fail(message: str) -> None:
    """Print one line and exit 2: the only way a user-facing error leaves the CLI."""
    _end_progress_line()
    print(f"ikv: error: {message}", file=sys.stderr)
    raise typer.Exit(code=2)


@app.command()
def verify(
    files: list[str] = typer.Argument(..., help="Receipt files, e.g. receipts/*.json."),
    rerun: bool = typer.Option(False, "--rerun", help="Run each recorded command again (in a fresh temporary "
                               "directory, after showing it) and compare field by field."),
    yes: bool = typer.Option(False, "--yes", help="With --rerun: run without asking for confirmation."),
    timeout: float | None = typer.Option(None, "--timeout", help="With --rerun: give up on a command (and kill "
                                         "everything it started) after this many seconds."),
    trust: list[Path] = typer.Option([], "--trust", help="Public key file (from ikv keygen); receipts must be "
                                     "signed by one of the keys given. Repeatable."),
    strict: bool = typer.Option(False, "--strict", help="Provenance warnings (dirty tree, unknown commit, other "
                                "version) fail the receipt."),
) -> None:
    """Check receipts are well-formed and not edited since written (the hash: integrity, not authorship; signatures
    with --trust say who vouches for them). Exit 0 only if all pass; --rerun checks they reproduce."""
    from infinitekv.receipts import load_trusted_keys, rerun_receipt, verify_receipt

    all_ok = True
    try:
        trusted = load_trusted_keys(trust) if trust else None
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise IKVError(f"--timeout must be a positive number of seconds, got {timeout}")
        if rerun and not yes and not sys.stdin.isatty():
            raise IKVError("--rerun runs the command a receipt records; pass --yes to run it without being asked "
                           "(stdin is not a terminal)")
        for path in files:
            verdict = verify_receipt(path, trusted=trusted, strict=strict)
            if rerun and verdict.ok:
                print(f"rerunning {path} ...", file=sys.stderr, flush=True)
                report = rerun_receipt(path, timeout_s=timeout, confirm=None if yes else _confirm_rerun)
                print("\n".join(report.lines()), flush=True)
                all_ok &= report.ok
            else:
                print(f"OK  {path}" if verdict.ok else f"FAIL {path}: {verdict.message}", flush=True)
                all_ok &= verdict.ok
            for warning in verdict.warnings if verdict.ok else []:
                print(f"  warning: {warning}", flush=True)
    except IKVError as err:
        fail(str(err))
    if not all_ok:
        raise typer.Exit(code=1)


def _confirm_rerun(plan) -> bool:
    from infinitekv.receipts import shown_command

    print(f"the receipt's command, to run in {plan.workdir}:\n  {shown_command(plan)}", file=sys.stderr)
    for note in plan.notes:
        print(f"  ({note})", file=sys.stderr)
    print("run it? [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


@app.command()
def keygen(out: Path = typer.Argument(..., help="Private key file to create (the public key goes to OUT.pub).")) -> None:
    """Make an ed25519 key pair for signing receipts (ikv sign) and checking them (ikv verify --trust OUT.pub)."""
    from infinitekv.receipts import generate_key, key_fingerprint, load_trusted_keys

    private, public = generate_key(out)
    (key,) = load_trusted_keys([public])
    print(f"private key {private} (keep it secret), public key {public} ({key_fingerprint(key)})")


@app.command()
def sign(
    files: list[Path] = typer.Argument(..., help="Receipts to sign (each must verify first)."),
    key: Path = typer.Option(..., "--key", help="Private key file written by ikv keygen."),
) -> None:
    """Sign receipts with your key, so others can check with ikv verify --trust YOUR.pub that you vouch for them."""
    from infinitekv.receipts import sign_receipt_file

    for path in files:
        print(f"signed {path} ({sign_receipt_file(path, key)})")


def _top_k(value: str) -> int:
    if value == "auto":
        return None  # derived from the model (RetrievalConfig.for_model)
    if not re.fullmatch(r"[0-9]{1,9}", value):
        raise IKVError(f"--top-k-cold must be 'auto' or a whole number >= 0, got '{value}'")
    return int(value)


MAX_PROMPT_BYTES = 256 << 20  # far past any context a model reads; a bound so /dev/zero is not read until memory ends


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str | None:
    if prompt_file is None:
        return prompt
    if prompt is not None:
        raise IKVError("pass either --prompt or --prompt-file, not both")
    try:
        fd = os.open(prompt_file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IKVError(f"prompt file {prompt_file} is not a regular file (a directory, device or pipe); "
                               "pass a text file")
            with os.fdopen(os.dup(fd), "rb") as handle:
                data = handle.read(MAX_PROMPT_BYTES + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise IKVError(f"prompt file {prompt_file} does not exist; check the path") from None
    except OSError as err:
        raise IKVError(f"cannot read prompt file {prompt_file}: {err.strerror}") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise IKVError(f"prompt file {prompt_file} is larger than {MAX_PROMPT_BYTES >> 20} MiB; pass a smaller file")
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError:
        raise IKVError(f"prompt file {prompt_file} is not UTF-8 text; convert it to UTF-8") from None


def _check_run_options(*, mode, archive, resume, read_only, max_new_tokens, temperature, top_p, checkpoint_every):
    """Every refusal `ikv run` can make before loading a model, each as one line naming the fix."""
    if mode not in ("disk", "ram"):
        raise IKVError(f"--mode must be 'disk' or 'ram', got '{mode}'")
    if mode == "disk" and archive is None:
        raise IKVError("--mode disk needs --archive DIR (or use --mode ram)")
    if archive is not None and archive.exists() and not archive.is_dir():
        raise IKVError(f"--archive {archive} is a file, not a directory; pass a new or existing archive directory")
    if resume and archive is None:
        raise IKVError("--resume needs --archive pointing at an existing archive directory")
    if read_only and not resume:
        raise IKVError("--read-only continues a saved conversation without saving; it needs --resume --archive DIR")
    if resume and not archive.is_dir():
        raise IKVError(f"archive directory {archive} does not exist; run once without --resume to create it")
    try:
        taken = not resume and archive is not None and archive.exists() and any(archive.iterdir())
        if taken:
            from infinitekv.archive import never_committed

            taken = not never_committed(archive)
    except OSError as err:
        raise IKVError(f"cannot read archive directory {archive} ({err.strerror or err}); check its permissions") \
            from None
    if taken:
        raise IKVError(f"{archive} already exists and is not empty; pass --resume to continue its conversation "
                       f"or choose a new --archive directory")
    if max_new_tokens < 1:
        raise IKVError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise IKVError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise IKVError(f"--top-p must be in (0, 1], got {top_p}")
    if checkpoint_every < 0:
        raise IKVError(f"--checkpoint-every must be 0 (off) or a number of chunks, got {checkpoint_every}")


def _pending_read(archive: Path) -> dict | None:
    """The interrupted read a disk archive's last checkpoint holds ({inputs, tokens}), or None."""
    from infinitekv.archive import Archive

    with Archive.open(archive, writable=False) as arc:
        meta = arc.load_state()[1]
    return meta.get("pending") if isinstance(meta, dict) else None


@app.command()
def run(
    model: str = typer.Option(DEFAULT_MODEL, help="'smollm2-135m' (embedded), a model directory, a .gguf file or a hub id."),
    device: str = typer.Option("auto", help="Where the model runs: auto (cuda when torch sees a GPU, else cpu), cpu, "
                               "cuda, cuda:N. The cold tier stays in RAM or on disk either way."),
    dtype: str = typer.Option("auto", help="auto (float32 on cpu, bfloat16 on a GPU that has it, else float16), "
                              "float32, bfloat16, float16."),
    archive: Optional[Path] = typer.Option(None, help="Archive directory for the cold tier (created; with --resume, reopened)."),
    mode: str = typer.Option("disk", help="Where cold records live: 'disk' (memory-mapped files under --archive) or 'ram'."),
    prompt: Optional[str] = typer.Option(None, help="Document text to read."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the document from this UTF-8 file."),
    question: Optional[str] = typer.Option(None, help="Question asked after the document."),
    resume: bool = typer.Option(False, help="Continue the conversation saved in --archive without re-reading it "
                                "(or finish a read that was interrupted, from its last checkpoint)."),
    read_only: bool = typer.Option(False, "--read-only", help="With --resume: answer from the archive without "
                                   "writing to it (the turn is not saved)."),
    max_new_tokens: int = typer.Option(64, help="Most tokens to generate."),
    hot_window: Optional[int] = typer.Option(None, help="Most recent tokens kept exact (default: from the model)."),
    sinks: int = typer.Option(RetrievalConfig.sinks, help="First tokens kept exact (attention sinks)."),
    top_k_cold: str = typer.Option("auto", help="Cold tokens retrieved per kv-head per step: auto, N, or 0 to disable."),
    shortlist: Optional[int] = typer.Option(None, help="First-stage candidates per kv-head before rerank (default: "
                                            "16 x top-k-cold)."),
    chunk_size: Optional[int] = typer.Option(None, help="Prefill chunk size in tokens (default: from the model)."),
    dense_up_to: str = typer.Option("auto", help="Exact attention while the whole sequence fits this many tokens: "
                                    "auto (the model's trained window), N, or 0 to retrieve from the start."),
    cluster_segment: int = typer.Option(RetrievalConfig.cluster_segment, help="Past this many cold tokens per layer, "
                                        "cluster each segment of this many and search two-level (0: flat scan only)."),
    checkpoint_every: int = typer.Option(CHECKPOINT_EVERY, help="Commit a disk archive every N prefill chunks, so "
                                         "an interrupted read resumes there (0: only at the end)."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold when temperature > 0."),
    seed: int = typer.Option(0, help="Sampling seed."),
    receipt: Optional[Path] = typer.Option(None, help="Where to write the JSON receipt (default: ikv-receipts/run-<time>.json)."),
) -> None:
    """Read a long document into a retrieval-backed cache and answer a question; the answer goes to stdout."""
    from infinitekv import receipts
    from infinitekv.archive import Archive
    from infinitekv.engine import open_session

    started_at = receipts.utc_now()
    clock = time.perf_counter()
    _check_run_options(mode=mode, archive=archive, resume=resume, read_only=read_only, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, checkpoint_every=checkpoint_every)
    document = _read_prompt(prompt, prompt_file)
    pending = _pending_read(archive) if resume else None
    if not document and not question and not pending:
        raise IKVError("nothing to ask: pass --prompt, --prompt-file and/or --question")
    if cluster_segment != 0 and not 1024 <= cluster_segment <= 1 << 26:
        raise IKVError(f"--cluster-segment must be 0 (flat scan only) or between 1024 and {1 << 26} tokens, "
                       f"got {cluster_segment}")
    config = RetrievalConfig(
        sinks=sinks, hot_window=hot_window, top_k_cold=_top_k(top_k_cold), shortlist=shortlist, chunk_size=chunk_size,
        dense_up_to=_dense_up_to(dense_up_to), cluster_segment=cluster_segment,
    )
    choice = ModelChoice(model, device, dtype)
    loaded = choice.load()
    print(f"model {model} loaded on {next(loaded.model.parameters()).device} ({loaded.weights_sha256[:12]})",
          file=sys.stderr)
    store = str(archive) if archive else None
    if read_only:  # the conversation continues on a RAM copy; the archive directory is only read
        with Archive.open(archive, model_fingerprint=loaded.weights_sha256, writable=False) as on_disk:
            store = on_disk.ram_copy()
    saved_error = None
    with open_session(loaded.model, tokenizer=loaded.tokenizer, archive=store, mode=mode, config=config, resume=resume,
                fingerprint=loaded.weights_sha256) as session:
        session.checkpoint_every = checkpoint_every
        resumed_tokens = len(session.token_ids)
        checkpoint_tokens = resumed_tokens if session.pending_ids else 0
        try:
            answer = session.ask(question, document, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, seed=seed, progress=True)
        except KeyboardInterrupt:
            _interrupted(session.archive if mode == "disk" and not read_only else None, archive)
        if not read_only:
            try:
                session.commit()
            except IKVError as err:  # the answer is not lost: it is printed below, then why it was not saved
                saved_error = err
        bill = session.memory_bill()
        counters = session.counters
        config = session.config  # with the sizes derived from the model: what actually ran
    print(answer.strip(), flush=True)
    if saved_error is not None:
        fix = f"; ikv run --archive {archive} --resume --read-only asks without saving" if archive else ""
        raise IKVError(f"the answer above was not saved: {saved_error}{fix}")
    print(
        f"tokens {bill['tokens']:,} (cold {bill['cold_tokens']:,}); hot tier {bill['hot_tier_bytes'] / 2**20:.1f} MiB; "
        f"cold index {bill['cold_index_bytes_resident'] / 2**20:.2f} MiB resident; cold records "
        f"{bill['cold_record_bytes'] / 2**20:.1f} MiB on {bill['cold_records_where']}; fp16 KV replaced "
        f"{bill['fp16_kv_bytes_replaced'] / 2**20:.1f} MiB"
        + (f"; mirrored on the GPU {bill['device_mirror_bytes'] / 2**20:.1f} MiB" if bill["device_mirror_bytes"] else ""),
        file=sys.stderr,
    )
    inputs = {}
    if prompt_file is not None:
        inputs["prompt_file"] = receipts.file_input(prompt_file)
    elif document:
        inputs["prompt"] = receipts.text_input(document)
    if question:
        inputs["question"] = receipts.text_input(question)
    decode_ms = 1000 * counters.decode_seconds / max(counters.decode_steps, 1)
    record = receipts.build_receipt(
        command=receipts.command_line(),
        config={**asdict(config), "mode": mode, "resume": resume, "read_only": read_only, "seed": seed,
                "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "checkpoint_every": checkpoint_every},
        model=model_record(choice, loaded),
        inputs=inputs,
        outputs={"answer": answer, "answer_sha256": receipts.text_input(answer)["sha256"]},
        metrics={
            "prefill_tokens": receipts.metric(counters.prefill_tokens, "tokens"),
            "resumed_tokens": receipts.metric(resumed_tokens, "tokens"),
            "checkpoint_tokens": receipts.metric(checkpoint_tokens, "tokens"),
            "checkpoints": receipts.metric(counters.checkpoints, "commits"),
            "forwards_on_fewer_threads": receipts.metric(counters.forwards_on_fewer_threads, "forwards"),
            "prefill_seconds": receipts.metric(round(counters.prefill_seconds, 3), "s"),
            "cold_tokens_per_step": receipts.metric(round(counters.cold_tokens_per_step(), 2),
                                                    "tokens per layer and kv-head"),
            "decode_ms_per_token": receipts.metric(round(decode_ms, 2), "ms/token"),
            "total_tokens": receipts.metric(bill["tokens"], "tokens"),
            "cold_tokens": receipts.metric(bill["cold_tokens"], "tokens"),
            "hot_tier_bytes": receipts.metric(bill["hot_tier_bytes"], "bytes"),
            "cold_index_bytes_resident": receipts.metric(bill["cold_index_bytes_resident"], "bytes"),
            "cold_record_bytes": receipts.metric(bill["cold_record_bytes"], "bytes"),
            "fp16_kv_bytes_replaced": receipts.metric(bill["fp16_kv_bytes_replaced"], "bytes"),
            "device_mirror_bytes": receipts.metric(bill["device_mirror_bytes"], "bytes"),
        },
        started_at=started_at,
        duration_s=time.perf_counter() - clock,
    )
    path = receipts.write_receipt(record, receipt or receipts.default_receipt_path("run", directory="ikv-receipts"))
    print(f"receipt {path}", file=sys.stderr)


def _interrupted(store, archive: Path | None) -> None:
    """Ctrl-C during a turn: say what the archive kept and how to go on, exit 130 (the shell's code for SIGINT)."""
    _end_progress_line()
    if store is not None and store.committed_tokens:
        kept = (f"the archive keeps {store.committed_tokens:,} tokens from its last checkpoint; "
                f"ikv run --archive {archive} --resume continues the read")
    elif store is not None:
        kept = f"nothing was committed yet; a plain ikv run --archive {archive} starts again"
    else:
        kept = "nothing was saved"
    print(f"ikv: interrupted; {kept}", file=sys.stderr, flush=True)
    global _INTERRUPT_REPORTED
    _INTERRUPT_REPORTED = True
    raise typer.Exit(code=130)


_INTERRUPT_REPORTED = False


def _end_progress_line() -> None:
    engine = sys.modules.get("infinitekv.engine")  # not imported yet: no progress line can be open
    if engine is not None:
        engine.end_progress_line()


def main() -> None:
    try:
        app()
    except IKVError as err:
        _end_progress_line()
        print(f"ikv: error: {err}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as done:  # typer turns Ctrl-C into a silent exit 130; say so unless the command already did
        if done.code == 130 and not _INTERRUPT_REPORTED:
            _end_progress_line()
            print("ikv: interrupted", file=sys.stderr)
        raise


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Archive directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
) -> None:
    """What an archive holds: format, model, layout, tokens, bytes per tier and file; verifies every checksum."""
    import json

    from infinitekv.archive import inspect_archive

    try:
        info = inspect_archive(path)
    except IKVError as err:
        fail(str(err))
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        lay, tiers = info["layout"], info["tiers"]
        print(f"archive    {info['path']} (format {info['format_version']}, uuid {info['archive_uuid'][:8]})")
        print(f"model      {info['model_fingerprint']}")
        print(f"layout     {lay['n_layers']} layers x {lay['n_kv_heads']} kv-heads x {lay['record_bytes']}-byte records "
              f"(head_dim {lay['head_dim']}): {info['bytes_per_token']:,} bytes per token")
        print(f"tokens     {info['committed_tokens']:,} committed (commit {info['commits']:,})")
        print(f"cold tier  {_size(tiers['cold_records'])} of records on disk")
        print(f"hot tier   {_size(tiers['hot_state'])} of engine state on disk")
        print(f"index      {_size(tiers['signature_index_ram'])} of signatures and weights in RAM once opened")
        print(f"files      {len(info['files'])}, {_size(sum(info['files'].values()))}: "
              + ", ".join(f"{name} {_size(size)}" for name, size in info["files"].items()))
        if info["recovered"]:
            print(f"recovery   {info['recovered']}")
        print(f"integrity  {'ok: every checksum verified' if info['integrity'] == 'ok' else 'FAILED'}")
    if info["integrity"] != "ok":
        fail(info["integrity"])


@archive_app.command("pack")
def archive_pack(
    src: Path = typer.Argument(..., help="Archive directory."),
    dst: Path = typer.Argument(..., help="Pack file to write, e.g. mem.ikv.zst."),
) -> None:
    """Pack an archive's committed data into one zstd-compressed file, with checksums."""
    from infinitekv.archive import pack

    try:
        info = pack(src, dst)
    except IKVError as err:
        fail(str(err))
    print(f"packed {src} ({info['committed_tokens']:,} tokens, {_size(info['bytes'])}) into {dst} "
          f"({_size(info['packed_bytes'])}, {info['ratio']:.2f}x)")


@archive_app.command("unpack")
def archive_unpack(
    src: Path = typer.Argument(..., help="Pack file written by `ikv archive pack` (possibly by someone else)."),
    dst: Path = typer.Argument(..., help="New or empty directory for the archive."),
    max_bytes: int = typer.Option(UNPACK_MAX_BYTES, help="Refuse a pack that declares more than this many bytes "
                                  "(it is refused anyway if it does not fit in the free space)."),
) -> None:
    """Unpack a pack into a new archive directory, verifying every checksum; sizes are bounded before writing."""
    from infinitekv.archive import unpack

    if max_bytes < 1:
        fail(f"--max-bytes must be positive, got {max_bytes}")
    try:
        info = unpack(src, dst, max_bytes=max_bytes)
    except IKVError as err:
        fail(str(err))
    print(f"unpacked {src} into {dst}: {info['committed_tokens']:,} tokens, {_size(info['bytes'])}, checksums verified")


@app.command()
def haystack(
    out: Path = typer.Option(Path("haystack.txt"), help="Where to write the document."),
    tokens: int = typer.Option(12000, help="Document length in SmolLM2 tokens."),
    depth: float = typer.Option(0.5, help="Where the needle sits, 0 (start) to 1 (end)."),
    seed: int = typer.Option(0, help="Chooses the 5-digit number."),
) -> None:
    """Write a long natural-text document (the stdlib's own docs) with a 5-digit magic number hidden in it."""
    from infinitekv.models import load_model
    from infinitekv.needles import passkey

    if not 0.0 <= depth <= 1.0:
        raise IKVError(f"--depth must be between 0 and 1, got {depth}")
    needle = passkey(load_model().tokenizer, tokens, depth, seed=seed)
    out.write_text(needle.document, encoding="utf-8")
    print(f"wrote {out}: about {tokens:,} tokens, magic number {needle.answer} at depth {depth}", file=sys.stderr)
    print(f"ask: {needle.question}", file=sys.stderr)


# ---- gates and benchmarks: each writes a receipt ----------------------------------------------------------------

def _bench_config(hot_window: Optional[int], top_k_cold: str, shortlist: Optional[int], chunk_size: Optional[int],
                  dense_up_to: str = "auto") -> RetrievalConfig:
    return RetrievalConfig(hot_window=hot_window, top_k_cold=_top_k(top_k_cold), shortlist=shortlist,
                           chunk_size=chunk_size, dense_up_to=_dense_up_to(dense_up_to))


def _dense_up_to(value: str) -> Optional[int]:
    if value == "auto":
        return None
    try:
        return max(0, int(value))
    except ValueError:
        fail(f"--dense-up-to must be 'auto' (the model's trained window) or a number of tokens, got {value!r}")


class ModelChoice(NamedTuple):
    """What --model, --device and --dtype name."""

    source: str
    device: str = "auto"
    dtype: str = "auto"

    def load(self):
        from infinitekv.models import load_model

        return load_model(self.source, self.dtype, self.device)


def model_record(choice: ModelChoice, loaded) -> dict:
    """The receipt's `model`: what was asked for, the weights' hash, and where and in what precision it ran."""
    parameter = next(loaded.model.parameters())
    return {"source": choice.source, "weights_sha256": loaded.weights_sha256, "device": str(parameter.device),
            "dtype": str(parameter.dtype).removeprefix("torch.")}


def _bench(kind: str, model: ModelChoice, receipt: Optional[Path], work) -> None:
    """Load the model, run `work(loaded) -> receipt parts`, write the receipt, print its gates and metrics."""
    from infinitekv import receipts

    started_at = receipts.utc_now()
    clock = time.perf_counter()
    loaded = model.load()
    parts = work(loaded)
    record = receipts.build_receipt(
        command=receipts.command_line(),
        config=parts["config"],
        model=model_record(model, loaded),
        inputs=parts.get("inputs", {}),
        outputs=parts["outputs"],
        metrics=parts["metrics"],
        gates=parts.get("gates"),
        started_at=started_at,
        duration_s=time.perf_counter() - clock,
    )
    path = receipts.write_receipt(record, receipt or receipts.default_receipt_path(kind))
    for name, verdict in (parts.get("gates") or {}).items():
        print(f"gate {name}: {verdict['verdict']}")
    for name, value in parts["metrics"].items():
        print(f"{name}: {value['value']} {value['unit']}")
    print(f"receipt {path}", file=sys.stderr)
    if any(v["verdict"] != "pass" for v in (parts.get("gates") or {}).values()):
        raise typer.Exit(code=1)


def _model_free_bench(kind: str, receipt: Optional[Path], work) -> tuple[dict, Path]:
    """Run `work() -> receipt parts` (a bench that loads no model), write its receipt, print its metrics."""
    from infinitekv import receipts

    started_at, clock = receipts.utc_now(), time.perf_counter()
    parts = work()
    record = receipts.build_receipt(command=receipts.command_line(), config=parts["config"],
                                    model={"source": None, "weights_sha256": None}, inputs={},
                                    outputs=parts["outputs"], metrics=parts["metrics"], gates=parts.get("gates"),
                                    started_at=started_at, duration_s=time.perf_counter() - clock)
    path = receipts.write_receipt(record, receipt or receipts.default_receipt_path(kind))
    for name, value in parts["metrics"].items():
        print(f"{name}: {value['value']} {value['unit']}")
    return parts, path


_MODEL = typer.Option(DEFAULT_MODEL, help="Model to measure (see `ikv run --help`).")
_DEVICE = typer.Option("auto", help="Where the model runs: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, "
                       "cuda:N.")
_DTYPE = typer.Option("auto", help="Model weights and activations: auto (float32 on cpu, bfloat16 on a GPU that has "
                      "it, else float16), float32, bfloat16, float16.")
_RECEIPT = typer.Option(None, help="Where to write the receipt (default: receipts/<kind>-<time>.json).")
_HOT = typer.Option(None, help="Hot window (default: from the model).")
_TOPK = typer.Option("auto", help="Cold tokens retrieved per kv-head: auto, N, or 0.")
_SHORT = typer.Option(None, help="First-stage shortlist per kv-head (default: 16 x top-k).")
_CHUNK = typer.Option(None, help="Prefill chunk size (default: from the model).")
_DENSE = typer.Option("auto", help="Exact attention up to this many tokens: auto (the model's trained window), N, 0.")


@bench_app.command("weights")
def bench_weights(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT) -> None:
    """Gate: SHA-256 over every weight tensor is identical before enabling and after disabling."""
    from infinitekv import bench

    _bench("weights", ModelChoice(model, device, dtype), receipt, lambda loaded: bench.gate_weights(loaded, RetrievalConfig()))


@bench_app.command("equivalence")
def bench_equivalence(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT,
                      prompt_tokens: int = typer.Option(1500, help="Prompt length."),
                      new_tokens: int = typer.Option(32, help="Greedy tokens compared.")) -> None:
    """Gate: with the hot window covering everything, greedy output equals the unmodified model's."""
    from infinitekv import bench

    _bench("equivalence", ModelChoice(model, device, dtype), receipt, lambda loaded: bench.gate_equivalence(loaded, prompt_tokens, new_tokens))


@bench_app.command("quality")
def bench_quality(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT, hot_window: Optional[int] = _HOT,
                  top_k_cold: str = _TOPK, shortlist: Optional[int] = _SHORT, chunk_size: Optional[int] = _CHUNK, dense_up_to: str = _DENSE,
                  lengths: str = typer.Option("2048,4096,8192", help="Context lengths, comma-separated."),
                  positions: int = typer.Option(256, help="Teacher-forced positions at the end of each text.")) -> None:
    """KL divergence and top-1 agreement against the unmodified model on real English text."""
    from infinitekv import bench

    config = _bench_config(hot_window, top_k_cold, shortlist, chunk_size, dense_up_to)
    sizes = _lengths(lengths, "--lengths")
    _bench("quality", ModelChoice(model, device, dtype), receipt, lambda loaded: bench.bench_quality(loaded, config, sizes, positions))


@bench_app.command("passkey")
def bench_passkey(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT, hot_window: Optional[int] = _HOT,
                  top_k_cold: str = _TOPK, shortlist: Optional[int] = _SHORT, chunk_size: Optional[int] = _CHUNK, dense_up_to: str = _DENSE,
                  lengths: str = typer.Option("4096,12288", help="Context lengths, comma-separated."),
                  depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9", help="Needle depths, comma-separated."),
                  heatmap: Optional[Path] = typer.Option(None, help="PNG heatmap path (default: beside the receipt).")) -> None:
    """Needle retrieval over a grid of lengths x depths, retrieval on and off, and the unmodified model."""
    from infinitekv import bench, receipts

    config = _bench_config(hot_window, top_k_cold, shortlist, chunk_size, dense_up_to)
    path = receipt or receipts.default_receipt_path("passkey")
    picture = heatmap or path.with_suffix(".png")
    sizes = _lengths(lengths, "--lengths")  # checked before the model loads
    _bench("passkey", ModelChoice(model, device, dtype), path, lambda loaded: bench.bench_passkey(
        loaded, config, sizes, tuple(float(x) for x in depths.split(",")), heatmap=picture))


@bench_app.command("fork")
def bench_fork(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT,
               tokens: int = typer.Option(12288, help="Document length in tokens."),
               max_new_tokens: int = typer.Option(24, help="Most tokens per answer.")) -> None:
    """Two questions about one long document, each on a fork of the cache through plain model.generate: the
    document is read once into a disk archive; each question feeds only its own tokens."""
    import tempfile

    from infinitekv import bench

    with tempfile.TemporaryDirectory(prefix="ikv-fork-") as scratch:
        _bench("fork", ModelChoice(model, device, dtype), receipt, lambda loaded: bench.bench_fork(
            loaded, RetrievalConfig(), Path(scratch) / "mem", tokens=tokens, max_new_tokens=max_new_tokens))


@bench_app.command("tasks")
def bench_tasks(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT, hot_window: Optional[int] = _HOT,
                top_k_cold: str = _TOPK, shortlist: Optional[int] = _SHORT, chunk_size: Optional[int] = _CHUNK, dense_up_to: str = _DENSE,
                lengths: str = typer.Option("4096,8192,12288,32768", help="Context lengths, comma-separated."),
                kinds: str = typer.Option(",".join(KINDS), help="Task kinds, comma-separated."),
                cases: int = typer.Option(1, help="Cases per kind and length."),
                seed: int = typer.Option(0, help="Draws the cases: names, values, depths, text.")) -> None:
    """The task suite: keys among distractors, several values, several questions, a sentence, a two-step lookup;
    the engine against retrieval off and the unmodified model."""
    from infinitekv import bench

    config = _bench_config(hot_window, top_k_cold, shortlist, chunk_size, dense_up_to)
    unknown = sorted(set(kinds.split(",")) - set(KINDS))
    if unknown:
        fail(f"unknown task kind {unknown[0]!r}; choose from {', '.join(KINDS)}")
    sizes = _lengths(lengths, "--lengths")
    _bench("tasks", ModelChoice(model, device, dtype), receipt, lambda loaded: bench.bench_tasks(
        loaded, config, sizes, tuple(kinds.split(",")), cases, seed))


@bench_app.command("coverage")
def bench_coverage(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT, hot_window: Optional[int] = _HOT,
                   top_k_cold: str = _TOPK, shortlist: Optional[int] = _SHORT,
                   lengths: str = typer.Option("2048,4096,8192,12288", help="Context lengths, comma-separated."),
                   queries: int = typer.Option(16, help="Query positions measured per length, near the end."),
                   heatmap: Optional[Path] = typer.Option(None, help="PNG path (default: beside the receipt).")) -> None:
    """Share of the exact attention mass that sinks + window + retrieved tokens cover, per layer and kv-head."""
    from infinitekv import bench, receipts

    config = _bench_config(hot_window, top_k_cold, shortlist, None)
    path = receipt or receipts.default_receipt_path("coverage")
    sizes = _lengths(lengths, "--lengths")
    _bench("coverage", ModelChoice(model, device, dtype), path, lambda loaded: bench.bench_coverage(
        loaded, config, sizes, queries, heatmap=heatmap or path.with_suffix(".png")))


@bench_app.command("memory")
def bench_memory(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT, hot_window: Optional[int] = _HOT,
                 top_k_cold: str = _TOPK, shortlist: Optional[int] = _SHORT, chunk_size: Optional[int] = _CHUNK,
                 tokens: int = typer.Option(12288, help="Tokens to read into a disk archive."),
                 points: int = typer.Option(8, min=1, help="Context lengths on the way at which the bill is drawn."),
                 plot: Optional[Path] = typer.Option(None, help="PNG path (default: beside the receipt).")) -> None:
    """The memory bill: bytes on device, resident in RAM, on disk, against the fp16 KV cache; and as a picture."""
    from infinitekv import bench, receipts

    config = _bench_config(hot_window, top_k_cold, shortlist, chunk_size)
    path = receipt or receipts.default_receipt_path("memory")
    _bench("memory", ModelChoice(model, device, dtype), path, lambda loaded: bench.bench_memory(loaded, config, tokens, points,
                                                                     plot or path.with_suffix(".png")))


@bench_app.command("baselines")
def bench_baselines(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT,
                    budget: int = typer.Option(1100, min=1, help="Resident tokens per layer and kv-head, for all."),
                    systems: str = typer.Option(",".join([*POLICIES, "infinitekv"]), help="Comma-separated."),
                    lengths: str = typer.Option("4096,12288,32768", help="Passkey context lengths ('' skips)."),
                    depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9", help="Passkey depths, comma-separated."),
                    task_lengths: str = typer.Option("4096,8192,12288", help="Task-suite lengths ('' skips)."),
                    kinds: str = typer.Option(",".join(KINDS), help="Task kinds, comma-separated."),
                    cases: int = typer.Option(1, min=1, help="Cases per task kind and length."),
                    quality_lengths: str = typer.Option("2048,4096,8192", help="KL/top-1 lengths ('' skips)."),
                    positions: int = typer.Option(256, min=1, help="Teacher-forced positions per text."),
                    kl_budgets: str = typer.Option("256,512,1100", help="Budgets of the KL-vs-budget sweep."),
                    full_up_to: int = typer.Option(12288, help="Longest context keep_all (the full cache) runs."),
                    top_k_cold: str = _TOPK, shortlist: Optional[int] = _SHORT,
                    chunk_size: Optional[int] = _CHUNK) -> None:
    """Eviction policies and InfiniteKV side by side at one resident budget: passkey grid, task suite, KL/top-1
    against the unmodified model, resident bytes and ms/token; one receipt and PNG plots beside it."""
    from infinitekv import baselines, receipts

    numbers = lambda text, kind=int: tuple(kind(x) for x in text.split(",") if x.strip())  # noqa: E731
    unknown = sorted(set(systems.split(",")) - set(baselines.SYSTEMS)) + sorted(set(kinds.split(",")) - set(KINDS))
    if unknown:
        fail(f"unknown system or task kind {unknown[0]!r}; systems: {', '.join(baselines.SYSTEMS)}; kinds: "
             f"{', '.join(KINDS)}")
    grid = dict(lengths=numbers(lengths), depths=numbers(depths, float), task_lengths=numbers(task_lengths),
                kinds=tuple(kinds.split(",")), cases=cases, quality_lengths=numbers(quality_lengths),
                positions=positions, kl_budgets=numbers(kl_budgets), full_up_to=full_up_to)
    config = _bench_config(None, top_k_cold, shortlist, chunk_size)
    path = receipt or receipts.default_receipt_path("baselines")
    _bench("baselines", ModelChoice(model, device, dtype), path, lambda loaded: baselines.bench_baselines(
        loaded, config, budget, tuple(systems.split(",")), **grid, plots_beside=path))


@bench_app.command("speed")
def bench_speed(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT, hot_window: Optional[int] = _HOT,
                top_k_cold: str = _TOPK, shortlist: Optional[int] = _SHORT, chunk_size: Optional[int] = _CHUNK,
                lengths: str = typer.Option("4096,12288,32768", help="Context lengths, comma-separated."),
                baseline_up_to: int = typer.Option(12288, help="Longest context the full-cache baseline runs."),
                decode_steps: int = typer.Option(16, help="Decode steps timed per length (median)."),
                busy_at: str = typer.Option("", help="Lengths measured again, quiet and with one other busy process "
                                            "on the machine, comma-separated (empty: none).")) -> None:
    """Prefill and decode speed against the unmodified full-cache model, side by side in one run."""
    from infinitekv import bench

    config = _bench_config(hot_window, top_k_cold, shortlist, chunk_size)
    sizes, busy = _lengths(lengths, "--lengths"), _lengths(busy_at, "--busy-at") if busy_at.strip() else ()
    _bench("speed", ModelChoice(model, device, dtype), receipt, lambda loaded: bench.bench_speed(loaded, config, sizes, baseline_up_to,
                                                                     decode_steps, busy))


def _lengths(text: str, option: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise IKVError(f"{option} takes positive token counts separated by commas (e.g. 4096,12288), got {text!r}")
    return sizes


@bench_app.command("recall")
def bench_recall(model: str = _MODEL, device: str = _DEVICE, dtype: str = _DTYPE, receipt: Optional[Path] = _RECEIPT,
                 tokens: int = typer.Option(6000, help="Tokens of English text."),
                 queries: int = typer.Option(32, help="Query positions (the last ones) measured."),
                 k: int = typer.Option(32, help="Size of the exact top-k whose recall is measured."),
                 segment: int = typer.Option(0, help="Also measure the two-level index with segments of this many "
                                             "cold tokens (0: flat designs only).")) -> None:
    """Recall of the exact top-k cold tokens against shortlist size, for each signature design."""
    from infinitekv import bench

    if segment and not 1024 <= segment <= tokens:
        raise IKVError(f"--segment must be 0 or between 1024 and --tokens ({tokens}), got {segment}")
    _bench("recall", ModelChoice(model, device, dtype), receipt, lambda loaded: bench.bench_recall(loaded, tokens, queries, k=k, segment=segment))


# ---- the OpenAI-compatible server --------------------------------------------------------------------------------

@app.command()
def serve(
    model: str = typer.Option(DEFAULT_MODEL, help="Model to serve (see `ikv run --help`); clients send this name (a local path's last component)."),
    device: str = _DEVICE,
    dtype: str = _DTYPE,
    archives: Path = typer.Option(Path("conversations"), help="Directory holding one archive per conversation id."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback needs --api-key."),
    port: int = typer.Option(8000, help="Port (0 picks a free one; the address is printed)."),
    api_key: Optional[str] = typer.Option(None, envvar="IKV_API_KEY", help="Clients must send 'Authorization: Bearer KEY'."),
    max_body_bytes: int = typer.Option(4 << 20, help="Largest request body accepted (413 beyond)."),
    max_tokens_limit: int = typer.Option(2048, help="Largest max_tokens a request may ask for."),
    max_queue: int = typer.Option(64, help="Turns waiting or running at once; more get 503."),
    hot_window: Optional[int] = typer.Option(None, help="Most recent tokens kept exact (default: from the model)."),
    top_k_cold: str = typer.Option("auto", help="Cold tokens retrieved per kv-head per step: auto, N, or 0."),
    chunk_size: Optional[int] = typer.Option(None, help="Prefill chunk size in tokens (default: from the model)."),
) -> None:
    """OpenAI-compatible chat server (/v1/chat/completions, /v1/models, /health) whose conversations are archives.

    Name a conversation with the header X-Conversation-Id (or the body field conversation_id): each request repeats
    the conversation and adds a user message; only the new messages are read, the rest is resumed from its archive.
    """
    from infinitekv.server import ServeOptions
    from infinitekv.server import serve as run_server

    config = RetrievalConfig(hot_window=hot_window, top_k_cold=_top_k(top_k_cold), chunk_size=chunk_size)
    run_server(ServeOptions(model=model, device=device, dtype=dtype, archives=archives, host=host, port=port, api_key=api_key,
                            max_body_bytes=max_body_bytes, max_tokens_limit=max_tokens_limit, max_queue=max_queue,
                            config=config))


@bench_app.command("serve-load")
def bench_serve_load(
    model: str = _MODEL,
    receipt: Optional[Path] = _RECEIPT,
    clients: int = typer.Option(8, help="Concurrent clients, each one conversation."),
    requests: int = typer.Option(5, help="Turns per client."),
    max_tokens: int = typer.Option(12, help="max_tokens of each request."),
) -> None:
    """Load test: start `ikv serve` on 127.0.0.1, run concurrent conversations against it, latency p50/p95."""
    import tempfile

    from infinitekv import receipts
    from infinitekv.server import load_receipt_parts, load_test, request_json, spawn_server

    if clients < 1 or requests < 1 or max_tokens < 1:
        raise IKVError("--clients, --requests and --max-tokens must each be at least 1")
    started_at, clock = receipts.utc_now(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ikv-serve-load-") as scratch:
        log = Path(scratch) / "server.log"
        server = spawn_server(["--model", model, "--archives", str(Path(scratch) / "conversations"), "--port", "0"],
                              log)
        try:
            _, _, health = request_json(server.url, "GET", "/health")
            print(f"server up at {server.url}; {clients} clients x {requests} requests", file=sys.stderr, flush=True)
            result = load_test(server.url, server.model_id, clients=clients, requests=requests, max_tokens=max_tokens)
        finally:
            server.stop()
    parts = load_receipt_parts(result, clients=clients, requests=requests)
    record = receipts.build_receipt(
        command=receipts.command_line(),
        config={"clients": clients, "requests": requests, "max_tokens": max_tokens, "temperature": 0.0,
                "retrieval": asdict(RetrievalConfig()), "queue": "one worker, first come first served"},
        model={"source": model, "weights_sha256": health["weights_sha256"]},
        inputs={},
        outputs=parts["outputs"],
        metrics=parts["metrics"],
        gates=parts["gates"],
        extra=parts["extra"],
        started_at=started_at,
        duration_s=time.perf_counter() - clock,
    )
    path = receipts.write_receipt(record, receipt or receipts.default_receipt_path("serve-load"))
    for name, verdict in parts["gates"].items():
        print(f"gate {name}: {verdict['verdict']} ({verdict['detail']})")
    for name, value in parts["metrics"].items():
        print(f"{name}: {value['value']} {value['unit']}")
    print(f"receipt {path}", file=sys.stderr)
    if any(v["verdict"] != "pass" for v in parts["gates"].values()):
        raise typer.Exit(code=1)


@bench_app.command("fuzz")
def bench_fuzz(
    minutes: float = typer.Option(30.0, help="How long to fuzz (wall clock)."),
    seed: int = typer.Option(0, help="Seeds the mutations."),
    receipt: Optional[Path] = _RECEIPT,
) -> None:
    """Random and mutated packs, archives and receipts against unpack, inspect/open and verify: any traceback, hang
    or write outside the case directory is a finding. Needs no model."""
    from infinitekv import fuzz

    if not math.isfinite(minutes) or minutes <= 0:
        raise IKVError(f"--minutes must be a positive number, got {minutes}")
    parts, path = _model_free_bench("fuzz", receipt, lambda: fuzz.fuzz(minutes, seed))
    for finding in parts["outputs"]["findings"]:
        print(f"finding {finding['target']}: {finding['problem']} ({finding['mutation']}) at {finding['where']}")
    print(f"gate no_traceback_hang_or_escape: {parts['gates']['no_traceback_hang_or_escape']['verdict']}")
    print(f"receipt {path}", file=sys.stderr)
    if parts["gates"]["no_traceback_hang_or_escape"]["verdict"] != "pass":
        raise typer.Exit(code=1)


@bench_app.command("scan")
def bench_scan(
    sizes: str = typer.Option("12000,131072,1000000", help="Cold tokens for the flat-scan bandwidth, comma-separated."),
    index_sizes: str = typer.Option("12000,131072,1000000",
                                    help="Cold tokens for flat vs two-level per-step time and recall."),
    repeat: int = typer.Option(5, help="Best of this many timed calls."),
    segment: int = typer.Option(RetrievalConfig().cluster_segment,
                                help="Cold tokens the two-level index clusters together (--cluster-segment)."),
    receipt: Optional[Path] = _RECEIPT,
) -> None:
    """The cold tier's index alone (synthetic keys, real records, real scan, rerank and select): memcpy and scan
    bandwidth per backend, and per-layer step time and recall of the flat scan and the two-level index up to 1M
    tokens. Needs no model."""
    from infinitekv import scanbench

    counts = {}
    for name, text in (("--sizes", sizes), ("--index-sizes", index_sizes)):
        try:
            counts[name] = tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            counts[name] = ()
        if not counts[name] or min(counts[name]) < 1024 or max(counts[name]) > 1 << 26:
            raise IKVError(f"{name} must be comma-separated token counts between 1024 and {1 << 26}, got {text!r}")
    if repeat < 1:
        raise IKVError(f"--repeat must be at least 1, got {repeat}")
    if segment < 1024:
        raise IKVError(f"--segment must be at least 1024 tokens, got {segment}")
    _, path = _model_free_bench("scan", receipt, lambda: scanbench.bench_scan(
        counts["--sizes"], counts["--index-sizes"], repeat, segment=segment))
    print(f"receipt {path}", file=sys.stderr)


@bench_app.command("interrupted")
def bench_interrupted(
    prompt_file: Path = typer.Option(..., help="The document to read (e.g. receipts/haystack-32k.txt)."),
    question: str = typer.Option("What is the magic number mentioned in the text? Answer with the number.",
                                 help="The question asked after it."),
    model: str = _MODEL,
    receipt: Optional[Path] = _RECEIPT,
    kill_at: float = typer.Option(0.6, help="Kill the read (SIGKILL) once this fraction of its chunks is done."),
    checkpoint_every: int = typer.Option(CHECKPOINT_EVERY, help="Prefill chunks between checkpoints."),
    max_new_tokens: int = typer.Option(16, help="Most tokens to generate."),
) -> None:
    """A long read killed midway and resumed from its last checkpoint answers exactly like an uninterrupted one."""
    from infinitekv.interrupted import bench_interrupted as measure

    if not 0 < kill_at < 1:
        raise IKVError(f"--kill-at must be between 0 and 1, got {kill_at}")
    if checkpoint_every < 1:
        raise IKVError(f"--checkpoint-every must be at least 1 chunk here, got {checkpoint_every}")
    _read_prompt(None, prompt_file)  # one line now, not after the first run, if the file is unreadable
    _bench("interrupted", ModelChoice(model), receipt, lambda loaded: measure(
        prompt_file, question, model=model, kill_at=kill_at, checkpoint_every=checkpoint_every,
        max_new_tokens=max_new_tokens))
