"""Who gets the cores: torch's thread pool and numba's both want every core, and both spin a while after each
parallel region, so when they alternate they fight (measured: a 3 x 1,024 top-k took milliseconds on numba's pool
while torch's threads were still spinning, microseconds on the calling thread).

Policy: small numba work (a decode step's rerank and selection, a short scan) runs on the calling thread, where it
costs less than waking a pool; large work (a prefill block's scan and rerank) uses numba's pool. `configure` gives
torch and numba the same count, the cores this process may run on, unless the user chose (`torch.set_num_threads`,
NUMBA_NUM_THREADS or OMP_NUM_THREADS in the environment).
"""

from __future__ import annotations

import contextlib
import os

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


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure(threads: int | None = None) -> int:
    """Give torch and numba the same number of threads (default: the user's choice, else every available core)."""
    import torch

    if threads is None:
        chosen = os.environ.get("NUMBA_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        threads = int(chosen) if chosen and chosen.isdigit() else available_cores()
    threads = max(1, min(threads, nb.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)
    nb.set_num_threads(threads)
    return threads
