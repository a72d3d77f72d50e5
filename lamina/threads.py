"""``limit_threads``: torch and every BLAS/OpenMP pool at a set number of threads, for a block of code.

On shared machines the intra-op threads of torch and of numpy's BLAS wait on
each other: on two shared cores a second thread made the probe 3x slower and
scikit-learn 20x slower. Stages whose kernels are small (the probe) or whose
timing must be reproducible (``lamina bench --threads``) run inside this.
"""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.lru_cache(maxsize=1)
def _controller():
    """threadpoolctl's view of the loaded BLAS/OpenMP libraries (scanning them costs ~3 ms, so once);
    numpy's BLAS and torch's OpenMP are loaded at import, before any call."""
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController()


@contextlib.contextmanager
def limit_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads and ``n`` threads in every BLAS/OpenMP pool.

    None leaves everything as it is. The previous settings come back afterwards,
    also on error. Process-wide, like ``torch.set_num_threads`` itself.
    """
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with _controller().limit(limits=n):
            yield
    finally:
        torch.set_num_threads(previous)
