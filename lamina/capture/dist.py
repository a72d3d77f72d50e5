"""torch.distributed for capture: rank, world size and barriers, nothing home-made.

Under ``torchrun`` (RANK/WORLD_SIZE set) the process group is started with gloo
on CPU (NCCL when CUDA is used) unless the caller already started one, and
torn down on exit only if this context started it.
"""

from __future__ import annotations

import os

import torch.distributed as tdist


class Dist:
    def __init__(self):
        self.rank, self.world, self._owned = 0, 1, False

    def __enter__(self) -> "Dist":
        if tdist.is_available() and tdist.is_initialized():
            self.rank, self.world = tdist.get_rank(), tdist.get_world_size()
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and tdist.is_available():
            tdist.init_process_group(backend="gloo")
            self._owned = True
            self.rank, self.world = tdist.get_rank(), tdist.get_world_size()
        return self

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def __exit__(self, *exc) -> None:
        if self._owned:
            tdist.destroy_process_group()
