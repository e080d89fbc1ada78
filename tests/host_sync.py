"""The host-synchronisation detector of the tests (the only one): counts, on the CPU, every call that would make a GPU
pipeline wait for the device, both as Python-level tensor methods and as aten ops.

On a GPU each of these calls (`.item()`, `.tolist()`, `bool()`, `float()`, boolean-mask indexing, `nonzero`, ...)
stalls the pipeline until the device has caught up.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "equal", "is_nonzero", "item"}
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


class SyncCounter(TorchDispatchMode):
    """Counts aten ops that synchronise (and indexing with a boolean mask, which calls nonzero)."""

    def __init__(self, calls: collections.Counter):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.calls[f"aten.{name}"] += 1
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(index, torch.Tensor) and index.dtype == torch.bool
                for index in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])):
            self.calls[f"aten.{name}(bool mask)"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_syncs():
    """Yields a Counter of synchronising calls made inside the block."""
    calls = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counted(name, original):
        def method(self, *args, **kwargs):
            calls[f"Tensor.{name}"] += 1
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        with SyncCounter(calls):
            yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
