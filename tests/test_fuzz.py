"""The fuzz run's own judge: a case that spins is a hang, a case slowed by a busy machine is not."""

from __future__ import annotations

import signal
import time

from infinitekv import fuzz


def judge(run, tmp_path, monkeypatch, cpu_seconds=1):
    monkeypatch.setattr(fuzz, "CASE_SECONDS", cpu_seconds)
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    tally = fuzz.Tally()
    old = {sig: signal.signal(sig, fuzz._alarm) for sig in (signal.SIGALRM, signal.SIGPROF)}
    try:
        fuzz._one_case("verify", run, "a test case", tally, tmp_path, (), sentinel, fuzz._tree_state(sentinel))
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return tally


def test_a_case_that_spins_on_the_cpu_is_a_hang(tmp_path, monkeypatch):
    def spin():
        while True:
            pass

    tally = judge(spin, tmp_path, monkeypatch)
    assert [f.problem.split(":")[0] for f in tally.findings] == ["hang"]


def test_a_case_waiting_longer_than_its_cpu_budget_is_not_a_hang(tmp_path, monkeypatch):
    tally = judge(lambda: time.sleep(1.5), tmp_path, monkeypatch)  # as a starved process would: no CPU used
    assert tally.findings == []
    assert tally.cases["verify"] == 1
