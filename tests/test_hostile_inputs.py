"""Hostile and broken inputs to every command: one `ikv: error:` line, exit code 2, nothing outside the target
touched. A tiny random model with a real (small, trained here) tokenizer stands in for SmolLM2, so the whole
`ikv run` path runs in seconds."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import xxhash
import zstandard

import archive_writer as writer
from infinitekv import archive as archive_module
from infinitekv.archive import MANIFEST_NAME, Archive, pack, unpack
from infinitekv.errors import IKVError

REPO = Path(__file__).resolve().parent.parent
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama and a byte-level BPE tokenizer trained on a paragraph, saved as a model directory."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (REPO / "README.md").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                     bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-model")
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ikv_here(monkeypatch, *args, cwd=None):
    """`ikv ARGS` in this process (the same main() the command runs; an exception that escapes it fails the test):
    (exit code, stdout, stderr)."""
    import contextlib

    from infinitekv import cli

    if cwd is not None:
        monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["ikv", *map(str, args)])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main()
            code = 0
        except SystemExit as done:
            code = done.code
    return code, out.getvalue(), err.getvalue()


def ikv(*args, cwd=None, env=None):
    done = subprocess.run([sys.executable, "-m", "infinitekv", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(code, stderr, *needles):
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "ikv: error:" in line]
    assert len(lines) == 1 and lines[0].startswith("ikv: error:"), stderr  # never glued to a progress bar
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(root: Path) -> dict:
    """Every path under root with its size and mtime: to show a failed command touched nothing."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------------------------- ikv run


@pytest.mark.parametrize("args, needles", [
    (["--top-k-cold", "²"], ["--top-k-cold"]),
    (["--temperature", "1", "--top-p", "0"], ["--top-p"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["--max-new-tokens", "-5"], ["--max-new-tokens"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every"]),
    (["--read-only"], ["--read-only", "--resume"]),
    (["--prompt-file", "/dev/zero"], ["/dev/zero", "not a regular file"]),
    (["--prompt-file", "."], ["not a regular file"]),
])
def test_bad_run_options_are_one_line(tmp_path, monkeypatch, args, needles):
    before = snapshot(tmp_path)
    prompt = [] if "--prompt-file" in args else ["--prompt", "hi"]
    code, _, err = ikv_here(monkeypatch, "run", "--mode", "ram", *prompt, *args, cwd=tmp_path)
    assert_one_line_error(code, err, *needles)
    assert snapshot(tmp_path) == before


def test_archive_that_is_a_file_is_one_line_and_left_alone(tmp_path, monkeypatch):
    (tmp_path / "mem").write_text("my notes")
    code, _, err = ikv_here(monkeypatch, "run", "--archive", tmp_path / "mem", "--prompt", "hi")
    assert_one_line_error(code, err, "is a file, not a directory")
    assert (tmp_path / "mem").read_text() == "my notes"


def test_garbage_gguf_is_one_line_and_leaves_no_cache(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + os.urandom(4096))
    cache = tmp_path / "cache"
    monkeypatch.setenv("IKV_CACHE_DIR", str(cache))
    code, _, err = ikv_here(monkeypatch, "run", "--mode", "ram", "--prompt", "hi", "--model", tmp_path / "model.gguf")
    assert_one_line_error(code, err, "cannot read", "as a GGUF model")
    assert not any(cache.rglob("*.safetensors")) if cache.exists() else True


def test_tiny_model_run_resume_and_read_only_resume(tiny_model_dir, tmp_path, monkeypatch):
    mem = tmp_path / "mem"
    common = ["--model", tiny_model_dir, "--max-new-tokens", "4", "--hot-window", "64", "--chunk-size", "32",
              "--receipt", tmp_path / "r.json"]
    code, answer, err = ikv_here(monkeypatch, "run", "--archive", mem, "--prompt", "word " * 300, "--question", "q?",
                                 *common)
    assert code == 0, err
    before = snapshot(mem)
    code, again, err = ikv_here(monkeypatch, "run", "--archive", mem, "--resume", "--read-only", "--question",
                                "more?", *common)
    assert code == 0, err
    assert snapshot(mem) == before  # --read-only answered without writing to the archive
    code, _, err = ikv_here(monkeypatch, "run", "--archive", mem, "--resume", "--question", "more?", *common)
    assert code == 0, err
    receipt = json.loads((tmp_path / "r.json").read_text())
    # the new turn only (its length depends on how the first answer ended), not the 300-word document again
    assert receipt["metrics"]["prefill_tokens"]["value"] < 40 and receipt["config"]["resume"] is True


def state_writes_fail_with_a_full_disk(monkeypatch):
    """Every state-file write of the archive raises ENOSPC, as on a full disk; records still write."""
    import errno

    real = archive_module._write_file_durably

    def full_disk(path, data):
        if path.name.startswith("state-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(archive_module, "_write_file_durably", full_disk)


def test_failed_commit_prints_the_answer_before_saying_why_it_was_not_saved(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    """The disk fills up as the turn is saved: the answer still reaches stdout, then one line says why it was not
    saved and how to ask without saving."""
    from infinitekv import cli

    state_writes_fail_with_a_full_disk(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["ikv", "run", "--archive", str(tmp_path / "mem"), "--prompt", "word " * 200,
                                      "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--hot-window", "64",
                                      "--chunk-size", "32", "--temperature", "1", "--seed", "1", "--checkpoint-every", "0",
                                      "--receipt", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit) as done:
        cli.main()
    out, err = capsys.readouterr()
    assert done.value.code == 2
    assert out.strip(), (out, err)
    assert_one_line_error(2, err, "the answer above was not saved", "disk full", "--read-only")
    assert not (tmp_path / "r.json").exists()


def test_resume_of_a_killed_first_run_and_a_plain_run_over_it(tiny_model_dir, tmp_path, monkeypatch):
    """A first run killed before its first checkpoint: --resume says so, a plain run takes the directory."""
    from infinitekv.adapters import layout
    from infinitekv.models import load_model

    loaded = load_model(str(tiny_model_dir))
    Archive.create(tmp_path / "mem", layout(loaded.model), loaded.weights_sha256).close()  # what it leaves
    common = ["--model", tiny_model_dir, "--max-new-tokens", "2", "--receipt", tmp_path / "r.json"]
    code, _, err = ikv_here(monkeypatch, "run", "--archive", tmp_path / "mem", "--resume", "--question", "q", *common)
    assert_one_line_error(code, err, "run once without --resume")
    code, _, err = ikv_here(monkeypatch, "run", "--archive", tmp_path / "mem", "--prompt", "hello", *common)
    assert code == 0, err


# -------------------------------------------------------------------------------------------- ikv inspect


def small_archive(path: Path, tokens: int = 40) -> None:
    with Archive.create(path, writer.LAYOUT, writer.FINGERPRINT, block_tokens=writer.BLOCK_TOKENS) as arc:
        for layer in range(writer.LAYOUT.n_layers):
            arc.set_key_mean(layer, writer.expected_key_mean(layer))
            arc.append(layer, writer.expected_records(layer, 0, tokens))
        arc.commit(*writer.expected_state(tokens))


def state_file(path: Path) -> Path:
    return next(path.glob("state-*.safetensors"))


@pytest.mark.parametrize("damage, needle", [
    (lambda p: (p / "layer-001.ikv").unlink() or (p / "layer-001.ikv").mkdir(), "not a regular file"),
    (lambda p: (s := state_file(p)).unlink() or s.mkdir(), "not a regular file"),
    (lambda p: (p / MANIFEST_NAME).unlink() or (p / MANIFEST_NAME).mkdir(), "not a regular file"),
    (lambda p: (p / "layer-000.ikv").unlink() or (p / "layer-000.ikv").symlink_to(p.parent / "victim"),
     "symbolic link"),
    (lambda p: (p / MANIFEST_NAME).unlink(), "lost its MANIFEST"),
])
def test_inspect_of_a_damaged_archive_is_one_line(tmp_path, monkeypatch, damage, needle):
    small_archive(tmp_path / "mem")
    (tmp_path / "victim").write_bytes(b"v" * 5000)
    damage(tmp_path / "mem")
    code, _, err = ikv_here(monkeypatch, "inspect", tmp_path / "mem")
    assert_one_line_error(code, err, needle)
    assert (tmp_path / "victim").read_bytes() == b"v" * 5000


def test_lock_that_is_a_link_is_refused_before_anything_is_written(tmp_path):
    small_archive(tmp_path / "mem")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "mem" / "LOCK").unlink(missing_ok=True)
    (tmp_path / "mem" / "LOCK").symlink_to(victim)
    with pytest.raises(IKVError, match="symbolic link"):
        Archive.open(tmp_path / "mem")
    (tmp_path / "mem" / "LOCK").unlink()
    os.link(victim, tmp_path / "mem" / "LOCK")
    with pytest.raises(IKVError, match="hard link shared"):
        Archive.open(tmp_path / "mem")
    assert victim.read_text() == "precious"


def test_a_damaged_manifest_is_refused_before_a_lock_is_created(tmp_path):
    small_archive(tmp_path / "mem")
    (tmp_path / "mem" / "LOCK").unlink(missing_ok=True)
    raw = bytearray((tmp_path / "mem" / MANIFEST_NAME).read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "mem" / MANIFEST_NAME).write_bytes(bytes(raw))
    with pytest.raises(IKVError, match="checksum mismatch"):
        Archive.open(tmp_path / "mem")
    assert not (tmp_path / "mem" / "LOCK").exists()


# --------------------------------------------------------------------------------------------- ikv unpack


def forged_pack(path: Path, members: list[tuple[str, bytes]], index: list[dict], *, declared_size=None) -> None:
    """A pack written by hand: an index naming `index`, then members whose tar headers give their real size."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        body = json.dumps({"pack_version": 1, "format_version": archive_module.FORMAT_VERSION, "committed_tokens": 0,
                           "files": index}).encode()
        for name, data in [("IKVPACK.json", body), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(zstandard.ZstdCompressor(level=19, write_checksum=True).compress(raw.getvalue()))


def test_unpack_of_a_decompression_bomb_stops_at_the_declared_size_with_bounded_memory(tmp_path):
    import resource

    small_archive(tmp_path / "mem")
    manifest = (tmp_path / "mem" / MANIFEST_NAME).read_bytes()
    bomb = b"\0" * (300 << 20)  # 300 MB of zeros compress to a few kB
    index = [{"name": MANIFEST_NAME, "bytes": len(manifest), "xxh3": f"{xxhash.xxh3_64_intdigest(manifest):016x}"},
             {"name": "layer-000.ikv", "bytes": 4096, "xxh3": "0" * 16}]
    forged_pack(tmp_path / "bomb.zst", [(MANIFEST_NAME, manifest), ("layer-000.ikv", bomb)], index)
    del bomb
    assert (tmp_path / "bomb.zst").stat().st_size < 100_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(IKVError, match="pack .*bomb.zst"):
        unpack(tmp_path / "bomb.zst", tmp_path / "out")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 << 10  # KiB: under 64 MiB more
    assert not (tmp_path / "out").exists()


def test_unpack_refuses_an_index_that_disagrees_with_its_manifest_or_exceeds_the_cap(tmp_path, monkeypatch):
    small_archive(tmp_path / "mem")
    pack(tmp_path / "mem", tmp_path / "good.zst")
    with pytest.raises(IKVError, match="more than the 1,000 allowed"):
        unpack(tmp_path / "good.zst", tmp_path / "out", max_bytes=1000)
    assert not (tmp_path / "out").exists()
    manifest = (tmp_path / "mem" / MANIFEST_NAME).read_bytes()
    huge = __import__("shutil").disk_usage(tmp_path).free + 1
    index = [{"name": MANIFEST_NAME, "bytes": len(manifest), "xxh3": f"{xxhash.xxh3_64_intdigest(manifest):016x}"},
             {"name": "layer-000.ikv", "bytes": huge, "xxh3": "0" * 16}]
    forged_pack(tmp_path / "liar.zst", [(MANIFEST_NAME, manifest)], index)
    code, _, err = ikv_here(monkeypatch, "archive", "unpack", tmp_path / "liar.zst", tmp_path / "out2")
    assert_one_line_error(code, err, "needs", "free")  # 1 TiB will not fit in the test machine's free space
    index[1]["bytes"] = 4096
    forged_pack(tmp_path / "liar2.zst", [(MANIFEST_NAME, manifest), ("layer-000.ikv", b"\0" * 4096)], index)
    code, _, err = ikv_here(monkeypatch, "archive", "unpack", tmp_path / "liar2.zst", tmp_path / "out3")
    assert_one_line_error(code, err, "does not list the files its MANIFEST implies")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


# ------------------------------------------------------------------------------------ interrupted reads, for real


def start_run(args, env=None) -> subprocess.Popen:
    """`ikv run ARGS` as a user's terminal starts it: with Ctrl-C's default action even when this test runs in a
    background job (which inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored)."""
    import signal

    return subprocess.Popen([sys.executable, "-m", "infinitekv", "run", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_chunks(proc: subprocess.Popen, chunks: int) -> bytes:
    """Read stderr until the progress bar reports `chunks` prefill chunks (or the process ends)."""
    import re

    seen = b""
    while proc.poll() is None:
        seen += os.read(proc.stderr.fileno(), 4096)
        done = [int(n) for n in re.findall(rb"\] (\d+)/\d+ chunks", seen)]
        if done and done[-1] >= chunks:
            return seen
    pytest.fail(f"ikv run ended before {chunks} chunks: {seen[-500:]!r}")


@pytest.fixture(scope="module")
def long_prompt(tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("prompt") / "book.txt"
    words = (REPO / "README.md").read_text().split()
    path.write_text(" ".join(words[i % len(words)] for i in range(1500)))
    args = ["--model", tiny_model_dir, "--prompt-file", path, "--question", "Who?", "--chunk-size", "32",
            "--hot-window", "64", "--max-new-tokens", "6", "--checkpoint-every", "4",
            "--dense-up-to", "0"]  # retrieval throughout: a resume inside the exact span decodes int8/4-bit records
    done = subprocess.run([sys.executable, "-m", "infinitekv", "run", "--mode", "ram", *map(str, args),
                           "--receipt", path.parent / "whole.json"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    whole = json.loads((path.parent / "whole.json").read_text())["metrics"]["prefill_tokens"]["value"]
    return args, done.stdout, whole


@pytest.mark.slow  # five fresh `ikv run` processes: a minute or two on 2 cores
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_a_read_killed_midway_resumes_from_its_checkpoint_with_the_uninterrupted_answer(long_prompt, tmp_path, sig):
    import signal

    args, expected, whole_read = long_prompt
    proc = start_run(["--archive", tmp_path / "mem", *args, "--receipt", tmp_path / "r1.json"])
    wait_for_chunks(proc, 10)
    proc.send_signal(getattr(signal, sig))
    _, rest = proc.communicate(timeout=120)
    if sig == "SIGINT":
        assert proc.returncode == 130
        last = rest.decode().strip().splitlines()[-1]
        assert last.startswith("ikv: interrupted; the archive keeps") and "--resume" in last, rest
    else:
        assert proc.returncode == -signal.SIGKILL
    code, _, err = ikv("run", "--archive", tmp_path / "mem", *args)  # not --resume: refused, the read is kept
    assert_one_line_error(code, err, "--resume")
    code, answer, err = ikv("run", "--archive", tmp_path / "mem", "--resume", *args, "--receipt", tmp_path / "r2.json")
    assert code == 0, err
    assert answer == expected
    metrics = json.loads((tmp_path / "r2.json").read_text())["metrics"]
    kept, read = metrics["checkpoint_tokens"]["value"], metrics["prefill_tokens"]["value"]
    assert kept >= 8 * 32  # at least two checkpoints were kept, not re-read
    assert kept + read == whole_read


def test_a_failed_checkpoint_is_one_line_on_its_own_line_after_the_progress_bar(tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    state_writes_fail_with_a_full_disk(monkeypatch)
    code, _, err = ikv_here(monkeypatch, "run", "--archive", tmp_path / "mem", "--prompt", "word " * 300,
                            "--model", tiny_model_dir, "--chunk-size", "32", "--hot-window", "64",
                            "--checkpoint-every", "2")
    assert_one_line_error(code, err, "disk full")
    assert "prefill [" in err  # the bar was drawn, and the error still starts its own line


def test_converted_model_cache_is_keyed_by_the_files_sha256(tiny_model_dir, tmp_path, monkeypatch):
    """Two .gguf files with the same name and size but different bytes must not share a converted copy. (The GGUF
    reader is replaced by one that derives the weights from the file's bytes: the cache keying is under test.)"""
    import torch

    from infinitekv import models

    monkeypatch.setenv("IKV_CACHE_DIR", str(tmp_path / "cache"))
    real, conversions = models._from_pretrained, []

    def gguf_reader(location, gguf_file, dtype):
        if gguf_file is None:
            return real(location, None, dtype)
        content = (Path(location) / gguf_file).read_bytes()
        conversions.append(content)
        model, tokenizer = real(str(tiny_model_dir), None, dtype)
        with torch.no_grad():
            model.lm_head.weight.add_(content[-1])
        return model, tokenizer

    monkeypatch.setattr(models, "_from_pretrained", gguf_reader)
    for name, last in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.gguf").write_bytes(b"GGUF" + bytes(100) + bytes([last]))
    first = models.load_model(str(tmp_path / "a" / "model.gguf")).weights_sha256
    second = models.load_model(str(tmp_path / "b" / "model.gguf")).weights_sha256
    again = models.load_model(str(tmp_path / "a" / "model.gguf")).weights_sha256
    assert len(conversions) == 2 and first != second and again == first


# ------------------------------------------------------------------------------- the other commands' options


@pytest.mark.parametrize("args, needle", [
    (["bench", "fuzz", "--minutes", "0"], "--minutes"),
    (["bench", "fuzz", "--minutes", "nan"], "--minutes"),
    (["bench", "interrupted", "--prompt-file", "README.md", "--kill-at", "1.5"], "--kill-at"),
    (["bench", "interrupted", "--prompt-file", "/dev/zero"], "not a regular file"),
    (["bench", "interrupted", "--prompt-file", "README.md", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["archive", "unpack", ".", "out"], "is not a file"),
    (["archive", "unpack", "README.md", "out", "--max-bytes", "0"], "--max-bytes"),
    (["archive", "pack", "no-such-archive", "x.zst"], "does not exist"),
    (["sign", "--key", "README.md", "README.md"], "cannot read private key"),
    (["verify", "--timeout", "-1", "README.md"], "--timeout"),
    (["verify", "--trust", "README.md", "README.md"], "not a public key file"),
    (["keygen", "README.md"], "already exists"),
])
def test_bad_options_of_every_other_command_are_one_line(monkeypatch, args, needle):
    before = snapshot(REPO / "receipts")
    code, _, err = ikv_here(monkeypatch, *args, cwd=REPO)
    assert_one_line_error(code, err, needle)
    assert snapshot(REPO / "receipts") == before and not (REPO / "out").exists()


def test_a_short_fuzz_run_finds_no_traceback_hang_or_escape(tmp_path):
    from infinitekv.fuzz import fuzz

    parts = fuzz(0.1, seed=7, work_root=tmp_path)
    assert parts["outputs"]["findings"] == [], parts["outputs"]["findings"]
    assert all(parts["metrics"][f"{t}_cases"]["value"] > 0 for t in ("unpack", "inspect", "verify"))
    assert list(tmp_path.iterdir()) == []  # the work directory is removed
