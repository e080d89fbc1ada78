"""Timing and peak-memory helpers for the bench scripts (not used by the package or the tests)."""

from __future__ import annotations

import time
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Track the bytes of tensor storages created inside the mode; `peak` is the maximum that was alive at once."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors using it]
        self.current = 0
        self.peak = 0

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            address, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or (address in inputs and address not in self.live):
                continue  # empty, or a view of / in-place result on memory that existed before
            if address not in self.live:
                self.live[address] = [size, 0]
                self.current += size
                self.peak = max(self.peak, self.current)
            self.live[address][1] += 1
            weakref.finalize(tensor, self._release, address)
        return out


def peak_extra_bytes(function: Callable, *inputs) -> int:
    """Peak bytes of tensor storage that `function(*inputs)` allocates beyond its inputs (CPU and GPU alike)."""
    with LiveTensorBytes() as tracker:
        function(*inputs)
    return tracker.peak


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
