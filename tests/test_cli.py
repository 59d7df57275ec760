"""`ikv` as a user meets it: bad input gets one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def ikv(*args, cwd=None):
    done = subprocess.run([sys.executable, "-m", "infinitekv", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(code, stderr, *needles):
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("ikv: error:")]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_prompt_file_names_the_file(tmp_path):
    code, _, err = ikv("run", "--mode", "ram", "--prompt-file", str(tmp_path / "nope.txt"), "--question", "q")
    assert_one_line_error(code, err, "nope.txt", "does not exist")


def test_disk_mode_without_archive_says_how_to_fix():
    code, _, err = ikv("run", "--prompt", "hello")
    assert_one_line_error(code, err, "--archive")


def test_resume_of_a_missing_archive_is_refused(tmp_path):
    code, _, err = ikv("run", "--archive", str(tmp_path / "missing"), "--resume", "--question", "q")
    assert_one_line_error(code, err, "does not exist", "without --resume")


def test_existing_directory_is_not_overwritten_without_resume(tmp_path):
    (tmp_path / "mem").mkdir()
    (tmp_path / "mem" / "notes.txt").write_text("mine")
    code, _, err = ikv("run", "--archive", str(tmp_path / "mem"), "--prompt", "hello")
    assert_one_line_error(code, err, "not empty", "--resume")
    assert (tmp_path / "mem" / "notes.txt").read_text() == "mine"


def test_bad_top_k_value_is_refused():
    code, _, err = ikv("run", "--mode", "ram", "--prompt", "hi", "--top-k-cold", "lots")
    assert_one_line_error(code, err, "--top-k-cold")


def test_unknown_model_path_is_refused(tmp_path):
    code, _, err = ikv("run", "--mode", "ram", "--prompt", "hi", "--model", str(tmp_path / "no-such-model"))
    assert_one_line_error(code, err, "not found")


def test_directory_without_config_is_not_a_model(tmp_path):
    code, _, err = ikv("run", "--mode", "ram", "--prompt", "hi", "--model", str(tmp_path))
    assert_one_line_error(code, err, "no config.json")


def test_unsupported_architecture_is_one_line(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    code, _, err = ikv("run", "--mode", "ram", "--prompt", "hi", "--model", str(tmp_path / "gpt2"))
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'")


def test_inspect_of_a_non_archive_is_one_line(tmp_path):
    code, _, err = ikv("inspect", str(tmp_path))
    assert_one_line_error(code, err)


def test_scan_bench_refuses_bad_sizes_in_one_line():
    code, _, err = ikv("bench", "scan", "--sizes", "12k")
    assert_one_line_error(code, err, "--sizes must be comma-separated token counts")


def test_scan_bench_writes_a_receipt_that_verifies(tmp_path):
    receipt = tmp_path / "scan.json"
    code, _, err = ikv("bench", "scan", "--sizes", "2048", "--index-sizes", "4096", "--repeat", "1",
                       "--receipt", str(receipt))
    assert code == 0, err
    record = json.loads(receipt.read_text())
    metrics = record["metrics"]
    assert metrics["memcpy_gb_per_s"]["value"] > 0
    # 4,096 cold tokens are less than one segment: nothing is clustered, the two-level step is the flat one
    for data in ("random", "clustered"):
        assert metrics[f"two_level_recall_{data}_at_4096"] == metrics[f"flat_recall_{data}_at_4096"]
    assert record["outputs"]["index"][0]["clustered_tokens"] == 0
    assert ikv("verify", str(receipt))[0] == 0


def test_scan_bench_clusters_complete_segments_and_keeps_recall_on_clustered_keys(tmp_path):
    receipt = tmp_path / "scan.json"
    code, _, err = ikv("bench", "scan", "--sizes", "2048", "--index-sizes", "8192", "--segment", "2048",
                       "--repeat", "1", "--receipt", str(receipt))
    assert code == 0, err
    record = json.loads(receipt.read_text())
    rows = {row["data"]: row for row in record["outputs"]["index"]}
    assert rows["clustered"]["clustered_tokens"] == 8192
    # keys gathered around centres are what clusters find; random keys give them nothing to find
    assert rows["clustered"]["two_level_recall"] > rows["random"]["two_level_recall"]


def test_run_refuses_a_cluster_segment_too_small_to_hold_clusters():
    code, _, err = ikv("run", "--mode", "ram", "--prompt", "hello", "--cluster-segment", "100")
    assert_one_line_error(code, err, "--cluster-segment must be 0")


def test_recall_bench_refuses_a_segment_it_cannot_fill():
    code, _, err = ikv("bench", "recall", "--tokens", "6000", "--segment", "8000")
    assert_one_line_error(code, err, "--segment must be 0 or between 1024 and --tokens")
