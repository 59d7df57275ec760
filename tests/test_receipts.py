"""Receipts: what `ikv verify` accepts and refuses, and what `ikv verify --rerun` counts as reproduced."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
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


def test_rerun_argv_replaces_the_receipt_path_and_refuses_other_programs(monkeypatch):
    monkeypatch.setenv("HOME", "/home/alice")
    argv = receipts.rerun_argv(["ikv", "run", "--receipt", "receipts/run.json", "--prompt-file", "~/h.txt",
                                "--receipt=x.json", "--archive=~/arch"], "/tmp/new.json")
    assert argv == [sys.executable, "-m", "infinitekv", "run", "--prompt-file", "/home/alice/h.txt",
                    "--archive=/home/alice/arch", "--receipt", "/tmp/new.json"]
    with pytest.raises(receipts.IKVError, match="only ikv commands"):
        receipts.rerun_argv(["rm", "-rf", "/"], "/tmp/new.json")


FAKE_IKV = """
import json, sys
from pathlib import Path
from infinitekv.receipts import content_sha256
Path("argv.json").write_text(json.dumps(sys.argv[1:]))
receipt = json.loads(Path("original.json").read_text())
receipt["metrics"]["decode_ms_per_token"]["value"] *= 2
receipt["command"] = ["ikv", *sys.argv[1:]]
receipt["receipt_sha256"] = content_sha256(receipt)
Path(sys.argv[-1]).write_text(json.dumps(receipt))
"""


def test_rerun_runs_the_recorded_command_and_compares(tmp_path, monkeypatch, fast_environment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake_ikv.py").write_text(FAKE_IKV)
    monkeypatch.setattr(receipts, "_IKV", [sys.executable, str(tmp_path / "fake_ikv.py")])
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    (tmp_path / "haystack.txt").write_text("needle")
    receipt = make_receipt(command=["ikv", "run", "--prompt-file", "haystack.txt", "--receipt", "original.json"],
                           inputs={"prompt_file": file_input("haystack.txt")})
    write_receipt(receipt, "original.json")
    report = receipts.rerun_receipt("original.json", timeout_s=60)
    assert report.ok, report.lines()
    assert json.loads((tmp_path / "argv.json").read_text())[:3] == ["run", "--prompt-file", "haystack.txt"]
    assert any("ratio" in line and "x2 new/old" in line for line in report.lines())
    assert verify_receipt("original.json").ok  # the rerun wrote elsewhere

    (tmp_path / "haystack.txt").write_text("a different haystack")
    report = receipts.rerun_receipt("original.json")
    assert not report.ok and report.message.startswith("not rerun: inputs.prompt_file.sha256")


# ------------------------------------------------------------------------------------------------------ CLI


def ikv_verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infinitekv", "verify", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_ikv_verify_exit_codes(written, tmp_path):
    tampered = tmp_path / "tampered.json"
    tampered.write_text(written.read_text().replace("41.7", "41.8"))
    done = ikv_verify(str(written), str(tampered))
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        f"OK  {written}",
        f"FAIL {tampered}: receipt_sha256: " + verify_receipt(tampered).message.split(": ", 1)[1],
    ]
    done = ikv_verify(str(written))
    assert done.returncode == 0 and done.stdout == f"OK  {written}\n", done.stderr


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
