"""Devices, precision and process ranks: what training and inference both need, and nothing else.

``resolve_device("auto")`` picks CUDA when present; ``autocast_for`` gives bf16 autocast on
CUDA (and on CPU only when asked: it is 9x slower on CPUs without native bf16, measured);
``RunContext`` says which process of a ``torchrun`` job this is.
"""

from __future__ import annotations

import atexit
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda[:N]`` without CUDA raises ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use cpu or auto")
    return torch.device(name)


def autocast_for(device: torch.device, *, amp: bool = True, cpu_bf16: bool = False):
    """bf16 autocast on CUDA when ``amp``; on CPU only when ``cpu_bf16``; else a no-op context."""
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class RunContext:
    """Where this process runs: its device and its place in a ``torchrun`` job (ranks from the environment)."""

    device: torch.device
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_name: str) -> RunContext:
        """Read ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``; under torchrun, start the process group
        (NCCL on CUDA, gloo on CPU) and bind this process to its GPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name)
        if world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
                # one group per process, kept across the runs of `loso` / `train-ensemble`, ended when
                # the process ends (not by the interpreter's teardown of a still-connected gloo group)
                atexit.register(_end_process_group)
            if device.type == "cuda":
                device = torch.device("cuda", local_rank)
                torch.cuda.set_device(device)
        return cls(device, world, rank, local_rank)

    def finish(self) -> None:
        """End a distributed run: every process waits here until all are done (rank 0 writes the last
        files). A process that exits while a peer is still working makes that peer's gloo connections
        fail ("Connection reset by peer") and the peer abort. The process group stays for the next run
        in this process."""
        if self.distributed and dist.is_initialized():
            dist.barrier()


def _end_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
