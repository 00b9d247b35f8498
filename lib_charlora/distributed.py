"""Several processes (GPUs, machines) through Hugging Face ``accelerate``: ``accelerate launch -m
lib_charlora train …`` (or ``cast``). Each process loads the model on its own device and trains on its
share of every batch; the gradients are summed through accelerate's collective ops (DESIGN.md §12: no
home-made process groups). One process writes files and prints."""
import os


def launched():
    """True when started by ``accelerate launch`` (or torchrun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


class AccelerateParallel:
    """The trainer's data-parallel interface (``engine/parallel.py``) over ``accelerate.PartialState``."""

    def __init__(self):
        import torch
        from accelerate import PartialState
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        self.state = PartialState(cpu=cpu)  # without GPUs: gloo over the CPU processes
        self.world, self.rank = self.state.num_processes, self.state.process_index
        if self.world < 2:
            from .engine.errors import CharLoraError
            raise CharLoraError(f"started as {os.environ.get('WORLD_SIZE')} processes, but accelerate set up "
                                f"{self.world} ({self.state.distributed_type}); check `accelerate config`")
        self.is_main, self.is_local_main = self.state.is_main_process, self.state.is_local_main_process
        self.device = self.state.device

    def positions(self, n):
        return list(range(self.rank, n, self.world))

    def sum(self, tensor):
        from accelerate.utils import reduce
        return reduce(tensor.contiguous(), reduction="sum")

    def barrier(self):
        self.state.wait_for_everyone()

    def any(self, flag):
        import torch
        return bool(self.sum(torch.tensor([1.0 if flag else 0.0], device=self.device)).item() > 0)
