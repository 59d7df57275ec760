"""Who gets the cores: the engine's forwards drop to fewer threads while the process waits for cores, and try more
again later (threads.CoreShare)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numba
import pytest
import torch

from infinitekv import threads


class Machine:
    """A clock and a run-queue wait the test moves by hand."""

    def __init__(self):
        self.now, self.waited = 0.0, 0

    def stretch(self, share: threads.CoreShare, seconds: float, waiting_share: float) -> None:
        """One stretch of work during which each of the share's threads waited `waiting_share` of the time."""
        share.begin()
        self.now += seconds
        self.waited += int(waiting_share * seconds * share.current * 1e9)
        share.end()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


def test_contended_stretches_halve_the_threads_and_quiet_ones_keep_them(two_threads):
    machine = Machine()
    share = threads.CoreShare(lambda: machine.waited, lambda: machine.now)
    for _ in range(5):
        machine.stretch(share, 0.1, waiting_share=0.02)  # a quiet machine: a little noise
    assert share.current == 2 and torch.get_num_threads() == 2
    machine.stretch(share, 0.1, waiting_share=0.5)  # another process took a core
    assert share.current == 1 and torch.get_num_threads() == 1 and numba.get_num_threads() == 1


def test_fewer_threads_try_more_again_and_keep_them_once_the_cores_are_free(two_threads):
    machine = Machine()
    share = threads.CoreShare(lambda: machine.waited, lambda: machine.now)
    machine.stretch(share, 0.1, waiting_share=0.5)
    assert share.current == 1
    tries = []
    for _ in range(40):  # still busy: each try with 2 threads waits, and the tries get rarer
        machine.stretch(share, 0.1, waiting_share=0.5 if share.current == 2 else 0.0)
        tries.append(share.probing)  # the next stretch tries 2 threads
    gaps = [i for i, trying in enumerate(tries) if trying]
    assert len(gaps) >= 3 and all(b - a < c - b for a, b, c in zip(gaps, gaps[1:], gaps[2:]))  # backing off
    while not share.probing:  # the other process ends; wait for the next try
        machine.stretch(share, 0.1, waiting_share=0.0)
    machine.stretch(share, 0.1, waiting_share=0.0)  # the try does not wait: 2 threads stay
    for _ in range(10):
        machine.stretch(share, 0.1, waiting_share=0.0)
    assert share.current == 2 and torch.get_num_threads() == 2


def test_restore_gives_back_the_threads_it_started_with(two_threads):
    machine = Machine()
    share = threads.CoreShare(lambda: machine.waited, lambda: machine.now)
    machine.stretch(share, 0.1, waiting_share=0.9)
    assert torch.get_num_threads() == 1
    share.restore()
    assert torch.get_num_threads() == 2


def test_without_schedstat_nothing_changes(two_threads):
    clock = iter(range(100))
    share = threads.CoreShare(lambda: None, lambda: float(next(clock)))
    for _ in range(5):
        share.begin()
        share.end()
    assert share.current == 2


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="run-queue wait is read from Linux schedstat")
def test_the_run_queue_wait_is_seen_when_other_processes_hold_every_core(two_threads):
    """Real processes on the real scheduler: with a busy loop on every core, two threads of matrix products wait for
    a core, and the share drops to one thread."""
    share = threads.CoreShare()
    x = torch.randn(600, 600)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        time.sleep(0.5)
        for _ in range(5):
            share.begin()
            for _ in range(30):
                x @ x
            share.end()
            if share.current == 1:
                break
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert share.current == 1
