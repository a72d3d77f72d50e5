"""torch.distributed for capture: rank, world size and barriers, nothing home-made.

Under ``torchrun`` (RANK/WORLD_SIZE set) the process group is started with gloo
on CPU (NCCL when the model runs on CUDA) unless the caller already started one, and
torn down on exit only if this context started it.
"""

from __future__ import annotations

import os

import torch.distributed as tdist


class Dist:
    def __init__(self, backend: str = "gloo"):
        self.rank, self.world, self._owned, self.backend = 0, 1, False, backend

    def __enter__(self) -> "Dist":
        if tdist.is_available() and tdist.is_initialized():
            self.rank, self.world = tdist.get_rank(), tdist.get_world_size()
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and tdist.is_available():
            if self.backend == "nccl":  # each rank on its own GPU (LOCAL_RANK), as torchrun intends
                import torch
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            tdist.init_process_group(backend=self.backend)
            self._owned = True
            self.rank, self.world = tdist.get_rank(), tdist.get_world_size()
        return self

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def __exit__(self, *exc) -> None:
        if self._owned:
            tdist.destroy_process_group()
