"""Who does what when ``reproduce`` runs as several processes (``accelerate launch -m histolab reproduce ...``).

* Training runs: every process, together (histolab.training's loop splits each batch across them).
* Choosing the best configuration, evaluating, the table, the state file: the main process alone; the others
  read the choice back from the state file after a barrier.
* Test-set generations: split by index (process r of w makes items r, r + w, ...), then a barrier, so the main
  process evaluates a complete folder. The other processes are then done and exit.

One process (no launcher, or a launcher with one process) is the same code with rank 0 of 1 and no barriers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    device: str | None = None  # this process's device under a launcher (cuda:LOCAL_RANK), else None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owned(self, n: int) -> range:
        """The item indices this process generates."""
        return range(self.rank, n, self.world)


def from_env(device: str | None) -> Processes:
    """The processes of the launcher that started us (WORLD_SIZE > 1), else a single process.

    accelerate's PartialState joins the process group (gloo on a CPU, NCCL on GPUs) that the training runs'
    Accelerator will use; it is created only under a launcher, so a plain run never touches it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    import torch
    from accelerate import PartialState

    from histolab.errors import InvalidRequest

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    if state.num_processes != world:
        raise InvalidRequest(
            f"launched as {world} processes but accelerate set up {state.num_processes}; launch with "
            "`accelerate launch --num_processes N -m histolab reproduce ...` (add --cpu on a machine without GPUs)"
        )
    return Processes(state.process_index, state.num_processes, state.wait_for_everyone, str(state.device))
