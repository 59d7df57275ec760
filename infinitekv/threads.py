"""Who gets the cores: torch's thread pool, numba's and numpy's BLAS (OpenBLAS) all want every core, and all spin a
while after each parallel region, so when they alternate they fight (measured: a 3 x 1,024 top-k took milliseconds
on numba's pool while torch's threads were still spinning, microseconds on the calling thread; and every numpy
matrix product, a 64 x 64 rotation here, left OpenBLAS's threads spinning against the torch operations after it).

Policy: small numba work (a decode step's rerank and selection, a short scan) runs on the calling thread, where it
costs less than waking a pool; large work (a prefill block's scan and rerank) uses numba's pool. `configure` gives
torch and numba the same count, torch's (OMP_NUM_THREADS or torch.set_num_threads choose it); numpy's BLAS gets one
thread: it only multiplies small matrices here, where a pool costs more than it saves.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import numba as nb

SERIAL_CELLS = 1 << 17  # below this many inner-loop cells (about a millisecond of work) the pool costs more


@contextlib.contextmanager
def numba_threads_for(cells: int):
    """Run the numba kernels inside on the calling thread when the work is small."""
    if cells >= SERIAL_CELLS or nb.get_num_threads() == 1:
        yield
        return
    threads = nb.get_num_threads()
    nb.set_num_threads(1)
    try:
        yield
    finally:
        nb.set_num_threads(threads)


def configure() -> int:
    """numba gets as many threads as torch uses (torch's default counts physical cores, numba's logical ones, and
    hyperthreads only add contention here), numpy's BLAS one (its products here are 64 x 64 rotations, and its
    threads spin after each one against torch's). Set torch.set_num_threads(n) first to choose n."""
    import torch

    from threadpoolctl import threadpool_limits

    threads = max(1, min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS))
    nb.set_num_threads(threads)
    threadpool_limits(1, user_api="blas")
    return threads


CONTENDED = 0.25  # a stretch whose threads waited for a core this share of its wall time shares the cores
SHORTEST_STRETCH_S = 0.005  # shorter stretches are too short to judge: they run on into the next
PROBE_AFTER = (2, 64)  # stretches on fewer threads before trying more again: at first, and at most (doubling)


def run_queue_wait_ns() -> int | None:
    """Nanoseconds this process's threads have spent runnable but not running (Linux schedstat); None elsewhere."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    total = 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total


class CoreShare:
    """torch's and numba's thread counts for the engine's forwards: all the threads the user gave them while the
    process gets the cores, half as many while its threads wait for them.

    Every parallel region waits at its end for its slowest thread, so when another process holds a core, each of a
    chunk's hundreds of small regions waits for a descheduled thread (measured on 2 cores with one busy process: the
    last 4,096 tokens of a 12k read took 55 s on 2 threads and 24 s on 1; quiet, 10.5 s and 15 s). The signal is
    the time our threads spent runnable but not running during a stretch of work (a forward, or one layer of a
    prefill forward; Linux schedstat): it is 0 on a quiet machine and near 0 on fewer threads beside the other
    process, so after some stretches on fewer threads one stretch tries more again, and keeps them if they did not
    wait. Without schedstat nothing changes.

    The chosen count (`current`) holds only inside a measured forward, from `begin` to `end`; `end` gives the user's
    counts back, and the next `begin` takes the chosen one up again. So between the engine's forwards, and in any
    forward it does not measure (a baseline model's own cache beside it in `ikv bench speed`), torch and numba run
    on the counts the user set.
    """

    def __init__(self, wait_ns: Callable[[], int | None] = run_queue_wait_ns,
                 clock: Callable[[], float] = time.perf_counter):
        import torch

        self.wait_ns, self.clock = wait_ns, clock  # tests pass their own
        self.full = torch.get_num_threads()
        self.full_numba = nb.get_num_threads()  # given back as it was: the user may have set it apart from torch's
        self.current = self.full  # the count the engine's forwards run on
        self.patience = PROBE_AFTER[0]  # stretches on fewer threads before the next try with more
        self.countdown = 0
        self.probing = False
        self.started: tuple[int, float] | None = None
        self.in_forward = False
        self.fewer = False  # the forward in progress ran on fewer threads than the user's at some point

    def begin(self) -> None:
        """A measured forward begins, on the count chosen by the forwards before it."""
        self.in_forward, self.fewer = True, self.current < self.full
        self._apply(self.current)
        self._start()

    def tick(self) -> None:
        """End one measured stretch and begin the next (a long forward is measured layer by layer, so it can leave
        the threads it started with before it ends)."""
        if not self.in_forward:
            return
        if self.started is not None and self.clock() - self.started[1] < SHORTEST_STRETCH_S:
            return
        self._judge()
        self._start()

    def end(self) -> bool:
        """A measured forward ends: its last stretch chooses the count for the next one, and the user's counts are
        back until then. True when the forward ran on fewer threads than the user's, at its start or later."""
        if not self.in_forward:  # a forward whose begin never ran (an earlier pre-hook raised)
            return False
        self.in_forward = False
        fewer = self.fewer
        self._judge()
        self.restore()
        return fewer

    def restore(self) -> None:
        """The user's counts, as they were when this share was made."""
        self._set(self.full, self.full_numba)

    def _start(self) -> None:
        if self.full == 1:  # nothing to give back: no need to read the run queue every forward
            self.started = None
            return
        wait = self.wait_ns()
        self.started = None if wait is None else (wait, self.clock())

    def _judge(self) -> None:
        started, self.started = self.started, None
        if started is None:
            return
        wait = self.wait_ns()
        wall = self.clock() - started[1]
        if wait is None or wall <= 0:
            return
        contended = (wait - started[0]) / 1e9 / (wall * self.current) > CONTENDED
        if self.probing:  # this stretch tried more threads
            self.probing = False
            if contended:
                self.patience = min(2 * self.patience, PROBE_AFTER[1])
                self._use(max(1, self.current // 2))
            else:
                self.patience = PROBE_AFTER[0]
            self.countdown = self.patience
        elif contended and self.current > 1:
            self._use(max(1, self.current // 2))
            self.countdown = self.patience
        elif self.current < self.full:
            self.countdown -= 1
            if self.countdown <= 0:
                self.probing = True
                self._use(min(self.full, 2 * self.current))

    def _use(self, threads: int) -> None:
        self.current = threads
        if self.in_forward:  # a layer's tick: the rest of this forward runs on the new count
            self.fewer = self.fewer or threads < self.full
            self._apply(threads)

    def _apply(self, threads: int) -> None:
        numba = self.full_numba if threads >= self.full else max(1, min(threads, self.full_numba))
        self._set(threads, numba)

    @staticmethod
    def _set(torch_threads: int, numba_threads: int) -> None:
        import torch

        # only what differs: on a quiet machine the engine's forwards never touch the pools
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        if nb.get_num_threads() != numba_threads:
            nb.set_num_threads(numba_threads)
