"""Visiting voxels in chunks of bounded size: the positions of masked voxels, full chunks of them, and the spatial
index of a chunk's column (for error messages)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch


def true_positions(mask: torch.Tensor) -> torch.Tensor:
    """Indices (int64) of the True entries of a 1-D bool mask; on the CPU via numpy, whose flatnonzero is about 8x
    faster than torch.nonzero."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero()[:, 0]


def voxel_chunks(num_voxels: int, chunk: int, flat_mask: torch.Tensor | None) -> Iterator[slice | torch.Tensor]:
    """Chunks of at most `chunk` voxels in visiting order: slices of all voxels without a mask, else the int64
    positions of the masked voxels, gathered over as many mask blocks as it takes to fill a chunk (a sparse mask
    then still gives full chunks, not many small ones that pay every operation's fixed cost)."""
    if flat_mask is None:
        yield from (slice(start, start + chunk) for start in range(0, num_voxels, chunk))
        return
    pending: list[torch.Tensor] = []
    num_pending = 0
    for start in range(0, num_voxels, chunk):
        positions = true_positions(flat_mask[start:start + chunk]) + start
        pending.append(positions)
        num_pending += len(positions)
        while num_pending >= chunk:
            joined = torch.cat(pending)
            yield joined[:chunk]
            pending, num_pending = [joined[chunk:]], num_pending - chunk
    if num_pending:
        yield torch.cat(pending)


def chunk_voxel_index(spatial_shape: tuple[int, ...], positions: slice | torch.Tensor, order: list[int] | None = None,
                      prefix: tuple[int, ...] = ()) -> Callable[[int], tuple[int, ...]]:
    """For error messages: maps a column of a chunk to its index into the (*spatial) array, after `prefix` (a
    volume's index in its batch). The chunk holds the voxels at the flat `positions` (a slice, or int64
    positions) in the order that visits the axes `order` (default: C order)."""
    order = list(range(len(spatial_shape))) if order is None else order

    def voxel_index(column: int) -> tuple[int, ...]:
        position = positions.start + column if isinstance(positions, slice) else int(positions[column])
        index = [0] * len(spatial_shape)
        for axis, value in zip(order, np.unravel_index(position, [spatial_shape[axis] for axis in order])):
            index[axis] = int(value)
        return (*prefix, *index)

    return voxel_index
