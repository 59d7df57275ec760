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
