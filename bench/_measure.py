"""Timing and peak-memory helpers for the bench scripts (not used by the package or the tests)."""

from __future__ import annotations

import time
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by the ops run inside the block (inputs made before it excluded).

    Counts every op output's storage once while any tensor viewing it is alive; works the same on CPU and GPU.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # data_ptr -> [nbytes, number of live tensors on it]
        self.current = 0
        self.peak = 0
        self._known_at_start: set[int] = set()

    def _release(self, pointer: int) -> None:
        entry = self.live.get(pointer)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[pointer]

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer == 0 or pointer in self._known_at_start:
            return
        entry = self.live.get(pointer)
        if entry is None:
            entry = self.live[pointer] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, pointer)

    def watch_inputs(self, *tensors: torch.Tensor) -> None:
        """Storages that exist before the block (the logits, the targets) are not counted."""
        self._known_at_start.update(t.untyped_storage().data_ptr() for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out


def peak_extra_bytes(step: Callable[[torch.Tensor, torch.Tensor], None], logits: torch.Tensor,
                     target: torch.Tensor) -> int:
    """Peak bytes that one forward+backward of `step` allocates beyond its inputs."""
    leaf = logits.detach().clone().requires_grad_()
    with PeakMemory() as meter:
        meter.watch_inputs(leaf, target)
        step(leaf, target)
        del leaf
    return meter.peak


def median_seconds(step: Callable[[], None], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `step()`, synchronising CUDA when used."""
    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
