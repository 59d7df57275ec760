"""Receipts: what `ikv verify` accepts and refuses, and what `ikv verify --rerun` counts as reproduced."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infinitekv import receipts
from infinitekv.receipts import (
    SCHEMA,
    build_receipt,
    compare_receipts,
    content_sha256,
    file_input,
    metric,
    text_input,
    verify_receipt,
    write_receipt,
)

REPO = Path(__file__).resolve().parent.parent
FAKE_ENVIRONMENT = {key: None for key in receipts.ENVIRONMENT_FIELDS} | {
    "os": "Linux", "cpu_model": "Test CPU", "cpu_count": 2, "python": "3.11.7", "infinitekv": "0.1.0",
}


@pytest.fixture
def fast_environment(monkeypatch):
    """Most tests need a receipt, not a real fingerprint (which imports torch)."""
    monkeypatch.setattr(receipts, "environment_fingerprint", lambda: dict(FAKE_ENVIRONMENT))


def make_receipt(**changes) -> dict:
    fields = dict(
        command=["ikv", "run", "--question", "What is the passkey?"],
        config={"hot_window": 1024, "sinks": 4, "top_k_cold": 64, "seed": 0},
        model={"source": "smollm2-135m", "weights_sha256": "ab" * 32},
        inputs={"question": text_input("What is the passkey?")},
        outputs={"answer": "The passkey is 68213.", "token_ids_sha256": "cd" * 32},
        metrics={"decode_ms_per_token": metric(41.7, "ms/token"), "kl_mean": metric(0.0123, "nats")},
        gates={"passkey": {"verdict": "pass", "detail": "5/5 depths"}},
        started_at="2026-11-22T15:40:00Z",
        duration_s=12.5,
    )
    fields.update(changes)
    return build_receipt(**fields)


def rewrite(path: Path, edit) -> None:
    """Apply `edit` to the receipt at `path` and re-hash it, as a careless tool that rewrote it would."""
    receipt = json.loads(path.read_text())
    edit(receipt)
    receipt["receipt_sha256"] = content_sha256(receipt)
    path.write_text(json.dumps(receipt, indent=2))


@pytest.fixture
def written(tmp_path, fast_environment) -> Path:
    return write_receipt(make_receipt(), tmp_path / "receipts" / "run.json")


def test_written_receipt_verifies(written):
    verdict = verify_receipt(written)
    assert verdict.ok, verdict.message
    text = written.read_text()
    assert text.endswith("}\n") and f'"schema": "{SCHEMA}"' in text


def test_one_digit_changed_in_a_metric_fails_on_the_hash(written):
    text = written.read_text()
    assert text.count("41.7") == 1
    written.write_text(text.replace("41.7", "31.7"))
    verdict = verify_receipt(written)
    assert not verdict.ok
    assert verdict.failing_field == "receipt_sha256"
    assert "does not match the content" in verdict.message


def test_newer_schema_is_refused_naming_both_versions(written):
    rewrite(written, lambda r: r.update(schema="infinitekv.receipt/2"))
    verdict = verify_receipt(written)
    assert not verdict.ok and verdict.failing_field == "schema"
    assert "infinitekv.receipt/2" in verdict.message and "infinitekv.receipt/1" in verdict.message


def test_missing_field_is_named(written):
    rewrite(written, lambda r: r.pop("outputs"))
    assert verify_receipt(written).message.startswith("outputs: missing")
    rewrite(written, lambda r: r.update(outputs={}) or r["metrics"]["kl_mean"].pop("unit"))
    verdict = verify_receipt(written)
    assert verdict.failing_field == "metrics.kl_mean.unit"


@pytest.mark.parametrize("bad", ["NaN", "Infinity", '"fast"', "true"])
def test_non_finite_or_non_numeric_metric_is_refused(written, bad):
    text = written.read_text().replace("41.7", bad)
    written.write_text(text)  # the hash check comes after the field checks, so the field is what gets named
    verdict = verify_receipt(written)
    assert verdict.failing_field == "metrics.decode_ms_per_token.value"
    assert "not a finite number" in verdict.message


def test_metric_and_build_refuse_nan(fast_environment):
    with pytest.raises(ValueError, match="finite"):
        metric(math.nan, "nats")
    with pytest.raises(ValueError, match="finite"):
        make_receipt(duration_s=math.inf)


def test_duplicate_key_and_unknown_field_are_refused(written, tmp_path):
    text = written.read_text()
    duplicated = tmp_path / "dup.json"
    duplicated.write_text(text.replace('"outputs": {', '"outputs": {}, "outputs": {', 1))
    assert verify_receipt(duplicated).failing_field == "outputs"
    rewrite(written, lambda r: r.update(notes="hand-written"))
    assert verify_receipt(written).failing_field == "notes"


def test_canonical_hash_ignores_key_order_and_whitespace(written):
    receipt = json.loads(written.read_text())
    reordered = json.loads(json.dumps(receipt, sort_keys=True), object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert list(reordered) != list(receipt)
    assert content_sha256(reordered) == receipt["receipt_sha256"]
    written.write_text(json.dumps(reordered, separators=(",", ":")))  # one line, reversed keys
    assert verify_receipt(written).ok


def test_written_receipt_has_no_home_path_or_environment_variables(tmp_path, monkeypatch):
    home, work = tmp_path / "home" / "alice", tmp_path / "home" / "alice" / "work"
    (home / "data").mkdir(parents=True)
    work.mkdir()
    (home / "data" / "haystack.txt").write_text("needle " * 100)
    (work / "question.txt").write_text("What is the passkey?")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    monkeypatch.setenv("IKV_TEST_SECRET", "hunter2-do-not-record")
    receipt = make_receipt(
        command=receipts.command_line(
            [str(home / ".venv/bin/ikv"), "run", "--prompt-file", str(home / "data/haystack.txt"),
             f"--archive={work}/arch", "--question-file", str(work / "question.txt")]
        ),
        config={"archive": str(work / "arch"), "cache": str(home / ".cache/infinitekv")},
        inputs={"prompt_file": file_input(home / "data/haystack.txt"), "question_file": file_input("question.txt")},
    )
    assert receipt["command"] == [
        "ikv", "run", "--prompt-file", "~/data/haystack.txt", "--archive=arch", "--question-file", "question.txt",
    ]
    assert receipt["inputs"]["prompt_file"]["path"] == "~/data/haystack.txt"
    assert receipt["inputs"]["question_file"]["path"] == "question.txt"
    assert receipt["config"] == {"archive": "arch", "cache": "~/.cache/infinitekv"}
    text = write_receipt(receipt, "receipt.json").read_text()
    assert str(home) not in text and str(tmp_path) not in text
    assert "hunter2-do-not-record" not in text and "IKV_TEST_SECRET" not in text
    assert verify_receipt("receipt.json").ok


def test_real_environment_fingerprint_is_valid_and_free_of_env_vars(monkeypatch):
    monkeypatch.setenv("IKV_TEST_SECRET", "hunter2-do-not-record")
    environment = receipts.environment_fingerprint()
    assert set(environment) == set(receipts.ENVIRONMENT_FIELDS)
    assert environment["cpu_count"] >= 1 and environment["ram_bytes"] > 0 and environment["torch"]
    assert "hunter2-do-not-record" not in json.dumps(environment)


def test_default_receipt_path_is_unique(tmp_path):
    first = receipts.default_receipt_path("run", tmp_path)
    assert first.name.startswith("run-") and first.name.endswith("Z.json")
    first.write_text("{}")
    second = receipts.default_receipt_path("run", tmp_path)
    assert second != first and second.name.endswith("-2.json")


# ------------------------------------------------------------------------------------------ rerun comparison


def failing(checks) -> list[str]:
    return [check.field for check in checks if not check.ok]


def test_rerun_timings_become_ratios_and_never_fail(fast_environment):
    old = make_receipt()
    new = make_receipt(metrics={"decode_ms_per_token": metric(83.4, "ms/token"), "kl_mean": metric(0.0123, "nats")},
                       duration_s=30.0)
    new["environment"]["cpu_model"] = "Slower CPU"
    checks = {check.field: check for check in compare_receipts(old, new)}
    assert failing(checks.values()) == []
    assert checks["metrics.decode_ms_per_token"].kind == "ratio"
    assert "x2 new/old" in checks["metrics.decode_ms_per_token"].note
    assert checks["duration_s"].kind == "ratio"
    assert checks["environment.cpu_model"].kind == "info"
    assert checks["metrics.kl_mean"].kind == "exact" and checks["outputs.answer"].ok


def test_rerun_changed_answer_is_a_failure(fast_environment):
    new = make_receipt(outputs={"answer": "The passkey is 68231.", "token_ids_sha256": "cd" * 32})
    assert failing(compare_receipts(make_receipt(), new)) == ["outputs.answer"]


def test_rerun_changed_gate_verdict_is_a_failure(fast_environment):
    new = make_receipt(gates={"passkey": {"verdict": "fail", "detail": "4/5 depths"}})
    assert failing(compare_receipts(make_receipt(), new)) == ["gates.passkey.verdict"]


def test_rerun_quality_metric_is_exact_unless_the_config_gives_a_tolerance(fast_environment):
    drifted = {"decode_ms_per_token": metric(41.7, "ms/token"), "kl_mean": metric(0.0124, "nats")}
    assert failing(compare_receipts(make_receipt(), make_receipt(metrics=drifted))) == ["metrics.kl_mean"]
    config = {"hot_window": 1024, "sinks": 4, "top_k_cold": 64, "seed": 0, "metric_rtol": {"kl_mean": 0.05}}
    old, new = make_receipt(config=config), make_receipt(config=config, metrics=drifted)
    assert failing(compare_receipts(old, new)) == []
    wider = {"decode_ms_per_token": metric(41.7, "ms/token"), "kl_mean": metric(0.02, "nats")}
    assert failing(compare_receipts(old, make_receipt(config=config, metrics=wider))) == ["metrics.kl_mean"]


def test_rerun_missing_metric_or_changed_model_is_a_failure(fast_environment):
    new = make_receipt(metrics={"decode_ms_per_token": metric(41.7, "ms/token")},
                       model={"source": "smollm2-135m", "weights_sha256": "ef" * 32})
    assert failing(compare_receipts(make_receipt(), new)) == ["model.weights_sha256", "metrics.kl_mean"]


@pytest.mark.parametrize("unit,is_time", [("s", True), ("ms/token", True), ("tokens/s", True), ("MB/s", True),
                                          ("nats", False), ("bytes", False), ("fraction", False)])
def test_time_units(unit, is_time):
    assert receipts.is_time_unit(unit) is is_time


def test_rerun_plan_confines_writes_links_inputs_and_replaces_the_receipt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    plan = receipts.plan_rerun(["ikv", "run", "--receipt", "receipts/run.json", "--prompt-file", "h.txt",
                                "--archive=/var/elsewhere/arch", "--question", "q"], work)
    assert plan.shown == ["ikv", "run", "--prompt-file", "h.txt", "--archive", "out-1", "--question", "q",
                          "--receipt", "receipts/run.json"]
    assert plan.receipt == work / "receipts" / "run.json"
    assert plan.links == {"h.txt": tmp_path / "h.txt"}
    assert plan.notes and "/var/elsewhere/arch" in plan.notes[0]
    assert plan.argv[:3] == [sys.executable, "-I", "-c"] and plan.argv[-len(plan.shown) + 1:] == plan.shown[1:]


@pytest.mark.parametrize("command, why", [
    (["ikv", "verify", "--rerun", "self.json", "--"], "only `ikv run` and `ikv bench"),
    (["ikv", "archive", "unpack", "a.zst", "/tmp/x"], "only `ikv run` and `ikv bench"),
    (["ikv", "haystack", "--out", "/etc/motd"], "only `ikv run` and `ikv bench"),
    (["ikv", "run", "--resume", "--archive", "mem", "--question", "q"], "--resume"),
    (["ikv", "run", "--no-such-option", "1"], "refuses its arguments"),
    (["ikv", "run", "--question", "q", "extra-positional"], "refuses its arguments"),
    (["ikv", "run", "--help"], "--help"),
    (["ikv", "bench", "no-such-bench"], "not a bench"),
    (["rm", "-rf", "/"], "only ikv commands"),
])
def test_rerun_refuses_commands_that_are_not_a_fresh_run_or_bench(tmp_path, command, why):
    with pytest.raises(receipts.IKVError, match=re.escape(why)):
        receipts.plan_rerun(command, tmp_path)


def test_rerun_launch_never_imports_from_the_current_directory_or_pythonpath(tmp_path):
    """A numpy.py or infinitekv/ in a downloaded results folder must not run when its receipt is rerun."""
    evil = tmp_path / "results"
    (evil / "infinitekv").mkdir(parents=True)
    payload = f"open({str(tmp_path / 'pwned')!r}, 'w').write('ran')\n"
    for name in ("numpy.py", "typer.py", "infinitekv/__init__.py", "infinitekv/cli.py"):
        (evil / name).write_text(payload)
    done = subprocess.run([*receipts.launch_prefix(), "run", "--help"], cwd=evil, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(evil)})
    assert done.returncode == 0, done.stderr
    assert "--prompt-file" in done.stdout
    assert not (tmp_path / "pwned").exists()


FAKE_IKV = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["IKV_TEST_REPO"])
from infinitekv.receipts import content_sha256
args = sys.argv[1:]
Path(os.environ["IKV_TEST_LOG"]).write_text(json.dumps({"argv": args, "cwd": os.getcwd(),
                                                        "haystack": Path("haystack.txt").read_text()}))
receipt = json.loads(Path(os.environ["IKV_TEST_ORIGINAL"]).read_text())
receipt["metrics"]["decode_ms_per_token"]["value"] *= 2
receipt["receipt_sha256"] = content_sha256(receipt)
Path(args[-1]).parent.mkdir(parents=True, exist_ok=True)
Path(args[-1]).write_text(json.dumps(receipt))
"""


def fake_launcher(monkeypatch, tmp_path, script: str) -> Path:
    (tmp_path / "fake_ikv.py").write_text(script)
    monkeypatch.setattr(receipts, "launch_prefix", lambda: [sys.executable, str(tmp_path / "fake_ikv.py")])
    monkeypatch.setenv("IKV_TEST_REPO", str(REPO))
    monkeypatch.setenv("IKV_TEST_LOG", str(tmp_path / "log.json"))
    return tmp_path / "log.json"


def test_rerun_runs_the_recorded_command_in_a_fresh_directory_and_compares(tmp_path, monkeypatch, fast_environment):
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.chdir(user)
    log = fake_launcher(monkeypatch, tmp_path, FAKE_IKV)
    monkeypatch.setenv("IKV_TEST_ORIGINAL", str(user / "original.json"))
    (user / "haystack.txt").write_text("needle")
    receipt = make_receipt(command=["ikv", "run", "--prompt-file", "haystack.txt", "--question", "q", "--archive",
                                    "/tmp/somewhere", "--receipt", "original.json"],
                           inputs={"prompt_file": file_input("haystack.txt")})
    write_receipt(receipt, "original.json")
    before = sorted(p.name for p in user.iterdir())
    seen = []
    report = receipts.rerun_receipt("original.json", timeout_s=60, confirm=lambda plan: seen.append(plan) or True)
    assert report.ok, report.lines()
    ran = json.loads(log.read_text())
    assert ran["argv"] == ["run", "--prompt-file", "haystack.txt", "--question", "q", "--archive", "out-1",
                           "--receipt", "original.json"]
    assert Path(ran["cwd"]).name.startswith("ikv-rerun-") and not Path(ran["cwd"]).exists()  # fresh, then removed
    assert ran["haystack"] == "needle" and seen[0].shown[0] == "ikv"
    assert any("ratio" in line and "x2 new/old" in line for line in report.lines())
    assert sorted(p.name for p in user.iterdir()) == before and verify_receipt("original.json").ok

    log.unlink()
    assert receipts.rerun_receipt("original.json", confirm=lambda plan: False).message == "not rerun: declined"
    assert not log.exists()
    (user / "haystack.txt").write_text("a different haystack")
    report = receipts.rerun_receipt("original.json")
    assert not report.ok and report.message.startswith("not rerun: inputs.prompt_file.sha256")


FORKING_IKV = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(os.environ["IKV_TEST_LOG"], "w").write(str(child.pid))
time.sleep(300)
"""


def test_rerun_timeout_kills_the_command_and_everything_it_started(tmp_path, monkeypatch, fast_environment):
    monkeypatch.chdir(tmp_path)
    log = fake_launcher(monkeypatch, tmp_path, FORKING_IKV)
    write_receipt(make_receipt(command=["ikv", "bench", "weights"]), "r.json")
    report = receipts.rerun_receipt("r.json", timeout_s=5)
    assert not report.ok and "did not finish within 5 s" in report.message
    grandchild = int(log.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} started by the rerun outlived its timeout")


# ------------------------------------------------------------------------------------- signatures and provenance


def test_signed_receipt_verifies_only_against_a_trusted_key(written, tmp_path):
    key, public = receipts.generate_key(tmp_path / "keys" / "me")
    other, other_public = receipts.generate_key(tmp_path / "keys" / "other")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    fingerprint = receipts.sign_receipt_file(written, key)
    mine, theirs = receipts.load_trusted_keys([public]), receipts.load_trusted_keys([other_public])
    verdict = verify_receipt(written, trusted=mine)
    assert verdict.ok and verdict.signer == fingerprint
    verdict = verify_receipt(written, trusted=theirs)
    assert not verdict.ok and verdict.failing_field == "signature" and "not among the trusted keys" in verdict.message
    # anyone can re-hash an edit; nobody without the key can re-sign it
    rewrite(written, lambda r: r["outputs"].update(answer="The passkey is 11111."))
    verdict = verify_receipt(written)
    assert not verdict.ok and verdict.failing_field == "signature"


def test_unsigned_receipt_fails_when_a_trusted_key_is_required(written, tmp_path):
    _, public = receipts.generate_key(tmp_path / "k")
    verdict = verify_receipt(written, trusted=receipts.load_trusted_keys([public]))
    assert not verdict.ok and "missing" in verdict.message


def test_keygen_never_overwrites_and_bad_key_files_are_one_line(tmp_path):
    receipts.generate_key(tmp_path / "k")
    with pytest.raises(receipts.IKVError, match="already exists"):
        receipts.generate_key(tmp_path / "k")
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(receipts.IKVError, match="not a public key file"):
        receipts.load_trusted_keys([tmp_path / "junk.pub"])


@pytest.mark.parametrize("change, warning", [
    ({"git_dirty": True, "git_commit": "0" * 12}, "uncommitted changes"),
    ({"git_commit": "0123456789ab", "git_dirty": False}, "not in this checkout's history"),
    ({"git_commit": None}, "records no git commit"),
    ({"infinitekv": "0.0.1"}, "made by infinitekv 0.0.1"),
])
def test_provenance_doubts_are_warnings_and_failures_under_strict(written, change, warning):
    rewrite(written, lambda r: r["environment"].update(change))
    verdict = verify_receipt(written)
    assert verdict.ok and any(warning in w for w in verdict.warnings), verdict.warnings
    strict = verify_receipt(written, strict=True)
    assert not strict.ok and strict.failing_field == "provenance"


def test_receipt_made_at_this_checkouts_head_on_a_clean_tree_has_no_provenance_warning(written):
    commit, dirty = receipts._git_state()
    if commit is None:
        pytest.skip("infinitekv is not imported from a git checkout")
    rewrite(written, lambda r: r["environment"].update(git_commit=commit, git_dirty=False))
    assert verify_receipt(written, strict=True).ok


# ------------------------------------------------------------------------------------------ hostile files


@pytest.mark.parametrize("content, why", [
    ("[" * 100000 + "]" * 100000, "nested deeper"),
    ('{"a":' * 200 + "1" + "}" * 200, "nested deeper"),
    ("1" * 5000, "not a receipt"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_hostile_receipt_files_fail_with_one_reason(tmp_path, content, why):
    path = tmp_path / "hostile.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    verdict = verify_receipt(path)
    assert not verdict.ok and why in verdict.message, verdict.message


def test_oversized_and_non_regular_receipts_are_refused_without_reading_them(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as out:
        out.truncate(receipts.MAX_RECEIPT_BYTES + 1)
    assert "larger than" in verify_receipt(big).message
    assert "not a regular file" in verify_receipt(tmp_path).message
    assert "not a regular file" in verify_receipt("/dev/zero").message
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert "not a regular file" in verify_receipt(fifo).message  # and it did not hang


# ------------------------------------------------------------------------------------------------------ CLI


def ikv_here(monkeypatch, *args) -> subprocess.CompletedProcess:
    """`ikv ARGS` in this process, through the same main() the command runs."""
    import contextlib
    import io

    from infinitekv import cli

    monkeypatch.setattr(sys, "argv", ["ikv", *map(str, args)])
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main()
        except SystemExit as done:
            code = done.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def ikv_verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infinitekv", "verify", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_ikv_verify_exit_codes(written, tmp_path):
    tampered = tmp_path / "tampered.json"
    tampered.write_text(written.read_text().replace("41.7", "41.8"))
    done = ikv_verify(str(written), str(tampered))
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stdout.splitlines() if not line.startswith("  warning: ")]
    assert lines == [
        f"OK  {written}",
        f"FAIL {tampered}: receipt_sha256: " + verify_receipt(tampered).message.split(": ", 1)[1],
    ]
    done = ikv_verify(str(written))
    assert done.returncode == 0 and done.stdout.splitlines()[0] == f"OK  {written}", done.stderr
    assert "  warning: records no git commit" in done.stdout  # the fake environment has none


def test_ikv_verify_keeps_checking_after_a_hostile_file_and_strict_fails_on_provenance(written, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200000)
    done = ikv_verify(str(deep), str(written))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stdout.splitlines()[0].startswith(f"FAIL {deep}: ") and f"OK  {written}" in done.stdout
    done = ikv_verify("--strict", str(written))
    assert done.returncode == 1 and f"FAIL {written}: provenance: " in done.stdout


def test_ikv_verify_rerun_asks_unless_yes_and_never_reruns_itself(written, tmp_path, monkeypatch):
    ikv_verify = lambda *a: ikv_here(monkeypatch, "verify", *a)  # noqa: E731
    done = ikv_verify("--rerun", str(written))  # stdin is not a terminal here
    assert done.returncode == 2 and done.stderr.count("ikv: error:") == 1 and "--yes" in done.stderr
    rewrite(written, lambda r: r.update(command=["ikv", "verify", "--rerun", "--yes", str(written), "--"]))
    done = ikv_verify("--rerun", "--yes", "--timeout", "60", str(written))
    assert done.returncode == 1, done.stderr
    assert "not rerun: only `ikv run` and `ikv bench ...` commands are rerun" in done.stdout


def test_ikv_keygen_sign_and_verify_trust(written, tmp_path, monkeypatch):
    run = lambda *a: ikv_here(monkeypatch, *a)  # noqa: E731
    ikv_verify = lambda *a: ikv_here(monkeypatch, "verify", *a)  # noqa: E731
    assert run("keygen", str(tmp_path / "me")).returncode == 0
    done = run("keygen", str(tmp_path / "me"))
    assert done.returncode == 2 and "already exists" in done.stderr and "Traceback" not in done.stderr
    assert run("sign", "--key", str(tmp_path / "me"), str(written)).returncode == 0
    done = ikv_verify("--trust", str(tmp_path / "me.pub"), str(written))
    assert done.returncode == 0 and "signed by ed25519:" in verify_receipt(written).message
    done = ikv_verify("--trust", str(tmp_path / "nope.pub"), str(written))
    assert done.returncode == 2 and "cannot read trusted key file" in done.stderr


def test_every_receipt_in_the_repository_verifies():
    paths = sorted(glob.glob(str(REPO / "receipts" / "*.json")))
    if not paths:
        pytest.skip("no receipts in receipts/ yet")
    done = ikv_verify(*paths)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_published_receipt_with_one_metric_digit_changed_fails_verify(tmp_path):
    """Tamper with a copy of a real receipt from receipts/: verify must name the hash."""
    import json
    import re

    paths = sorted(glob.glob(str(REPO / "receipts" / "*.json")))
    if not paths:
        pytest.skip("no receipts in receipts/ yet")
    record = json.loads(open(paths[0]).read())
    name, entry = next((n, m) for n, m in record["metrics"].items() if re.search(r"[1-9]", repr(m["value"])))
    text = repr(entry["value"])
    digit = re.search(r"[1-9]", text)
    changed = text[: digit.start()] + str((int(digit.group()) % 9) + 1) + text[digit.end():]
    entry["value"] = type(entry["value"])(float(changed) if isinstance(entry["value"], float) else int(changed))
    copy = tmp_path / "tampered.json"
    copy.write_text(json.dumps(record, indent=2, sort_keys=True))
    done = ikv_verify(str(copy))
    assert done.returncode == 1
    assert "receipt_sha256" in done.stdout


@pytest.mark.smollm2
@pytest.mark.parametrize("name", ["weights.json"])  # the published receipts cheap enough to rerun on every CI run
def test_cheap_published_receipt_reproduces_at_head(name):
    """CI reruns the cheap published receipts with the code at HEAD, through the same safe rerun a user gets."""
    path = REPO / "receipts" / name
    if not path.exists():
        pytest.skip(f"receipts/{name} is not published")
    done = subprocess.run([sys.executable, "-m", "infinitekv", "verify", "--rerun", "--yes", "--timeout", "1200",
                           str(path)], cwd=REPO, capture_output=True, text=True, timeout=1300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"REPRODUCED {path}"), done.stdout


def test_rerun_whose_recorded_paths_collide_is_refused_in_one_line(tmp_path, monkeypatch, fast_environment):
    monkeypatch.chdir(tmp_path)
    fake_launcher(monkeypatch, tmp_path, "raise SystemExit('must not run')")
    (tmp_path / "a").write_text("x")  # --model a is a file, so a/b.txt cannot be laid out beside it
    write_receipt(make_receipt(command=["ikv", "run", "--model", "a", "--prompt-file", "a/b.txt"]), "r.json")
    monkeypatch.setattr(receipts, "_check_input_files", lambda receipt: [])
    report = receipts.rerun_receipt("r.json", timeout_s=30)
    assert not report.ok and report.message.startswith("not rerun: its paths cannot be laid out"), report.message
