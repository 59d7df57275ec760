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

from transformers import DynamicCache

from conftest import tiny_model
from infinitekv import threads
from infinitekv.engine import enable


class Machine:
    """A clock and a run-queue wait the test moves by hand."""

    def __init__(self):
        self.now, self.waited = 0.0, 0

    def stretch(self, share: threads.CoreShare, seconds: float, waiting_share: float) -> int:
        """One stretch of work during which each of the share's threads waited `waiting_share` of the time; returns
        the torch threads it ran on."""
        share.begin()
        during = torch.get_num_threads()
        self.now += seconds
        self.waited += int(waiting_share * seconds * during * 1e9)
        share.end()
        return during


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
    assert share.current == 1
    assert machine.stretch(share, 0.1, waiting_share=0.0) == 1  # the next stretch runs on half


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
    during = [machine.stretch(share, 0.1, waiting_share=0.0) for _ in range(10)]
    assert share.current == 2 and during == [2] * 10


def test_a_contended_layer_halves_the_threads_for_the_rest_of_its_forward(two_threads):
    machine = Machine()
    share = threads.CoreShare(lambda: machine.waited, lambda: machine.now)
    share.begin()
    machine.now += 0.1
    machine.waited += int(0.5 * 0.1 * 2 * 1e9)
    share.tick()  # a prefill layer that waited half its time
    assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert share.end(), "the forward counts as run on fewer threads"
    assert torch.get_num_threads() == 2 and numba.get_num_threads() == 2


def test_a_forward_that_starts_on_fewer_threads_counts_even_if_a_layer_tries_all_of_them(two_threads):
    machine = Machine()
    share = threads.CoreShare(lambda: machine.waited, lambda: machine.now)
    machine.stretch(share, 0.1, waiting_share=0.5)
    assert share.current == 1
    share.begin()
    for _ in range(share.countdown):  # quiet layers until the share tries 2 threads again
        machine.now += 0.1
        share.tick()
    assert torch.get_num_threads() == 2
    assert share.end()


def test_restore_gives_back_the_threads_it_started_with_even_inside_a_forward(two_threads):
    machine = Machine()
    share = threads.CoreShare(lambda: machine.waited, lambda: machine.now)
    share.begin()
    machine.now += 0.1
    machine.waited += int(0.9 * 0.1 * 2 * 1e9)
    share.tick()
    assert torch.get_num_threads() == 1
    share.restore()  # enable() exits, as after an interrupted forward
    assert torch.get_num_threads() == 2 and numba.get_num_threads() == 2


def test_without_schedstat_nothing_changes(two_threads):
    clock = iter(range(100))
    share = threads.CoreShare(lambda: None, lambda: float(next(clock)))
    for _ in range(5):
        share.begin()
        share.end()
    assert share.current == 2


class Cores:
    """The run-queue wait and clock for shares the engine makes: each read of the wait is 0.1 s of work, during
    which, while `busy`, each thread in force waited half the time."""

    def __init__(self):
        self.now, self.waited, self.busy, self.reads = 0.0, 0, False, 0

    def wait_ns(self) -> int:
        self.reads += 1
        self.now += 0.1
        if self.busy:
            self.waited += int(0.5 * 0.1 * torch.get_num_threads() * 1e9)
        return self.waited

    def clock(self) -> float:
        return self.now


@pytest.fixture
def engine_shares(two_threads, monkeypatch):
    """The engine's CoreShares on scripted Cores: yields the cores and the list of shares enable() made."""
    cores, shares, make = Cores(), [], threads.CoreShare

    def scripted():
        shares.append(make(cores.wait_ns, cores.clock))
        return shares[-1]

    monkeypatch.setattr(threads, "CoreShare", scripted)
    yield cores, shares


def test_fewer_threads_hold_only_during_the_engines_forwards_not_between_or_in_other_forwards(engine_shares):
    """ikv bench speed runs a full-cache baseline on the same model inside enable(), between the engine's steps:
    it must run on the user's threads, not on what the engine's last forward chose."""
    cores, shares = engine_shares
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    seen = []
    with torch.no_grad(), enable(model, mode="ram") as cache:
        # registered after the engine's pre-hook: sees the count the forward runs on
        handle = model.register_forward_pre_hook(
            lambda *_: seen.append((torch.get_num_threads(), numba.get_num_threads())))
        cores.busy = True
        model(ids, past_key_values=cache)  # contended: the engine's next forwards get half
        between = torch.get_num_threads(), numba.get_num_threads()
        cores.busy = False
        model(ids[:, :1], past_key_values=cache)
        after_engine = torch.get_num_threads(), numba.get_num_threads()
        model(ids, use_cache=False)  # a forward without the engine's cache
        model(ids, past_key_values=DynamicCache(config=model.config))  # a baseline's own cache
        handle.remove()
    assert shares[0].current == 1
    assert seen == [(2, 2), (1, 1), (2, 2), (2, 2)]
    assert between == after_engine == (2, 2)
    assert cache.counters.forwards_on_fewer_threads == 1


def test_a_forward_without_the_engines_cache_leaves_the_share_as_it_was(engine_shares):
    cores, shares = engine_shares
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), enable(model, mode="ram") as cache:
        cores.busy = True
        model(ids, past_key_values=cache)
        share = shares[0]
        assert share.current == 1
        before, reads = dict(vars(share)), cores.reads
        # busy still: measured, these would count down towards a try with 2 threads (or halve again)
        model(ids, use_cache=False)
        model(ids)
        model(ids, past_key_values=DynamicCache(config=model.config))
        assert dict(vars(share)) == before and cores.reads == reads
        model(ids[:, :1], past_key_values=cache)  # the engine's own forward is measured
        assert cores.reads > reads


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
