"""Bytes of tensor memory a block of code holds at its peak, on any device, the CPU included (where torch keeps
no allocator statistics, and RSS is dominated by the libraries and by what the allocator keeps cached).

    with TensorMemory() as mem:
        loss = step(); loss.backward(); optimizer.step()
    mem.peak   # most bytes alive at once among the storages created inside the block

A TorchDispatchMode sees the output of every operator (backward's included: autograd runs the block's modes
on its CPU thread too). Each new storage is counted from the operator that made it until Python frees it (a
finalizer on the storage object, which torch keeps as long as the storage lives). Not counted: tensors that
existed before the block (resident_bytes counts those), and an operator's scratch space that never leaves
it. Views share their base's storage and count once. Everything runs slower inside the block: time
elsewhere.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def round_up(nbytes: int, granularity: int) -> int:
    """nbytes rounded up to a multiple of granularity (what an allocator that rounds so would hand out)."""
    return -(-nbytes // granularity) * granularity


class TensorMemory(TorchDispatchMode):
    """granularity: count each storage rounded up to a multiple of this many bytes (512 as CUDA's caching
    allocator rounds; 1 counts the bytes themselves)."""

    def __init__(self, granularity: int = 1):
        super().__init__()
        self.granularity = granularity
        self.live = 0  # bytes of the counted storages still alive
        self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output on an input's storage (a view, an in-place op) is no new memory, even when that input
        # was made before the block and so is not counted
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key = storage._cdata  # the storage itself, whichever Python view of it we were handed
        if key in self._alive:
            return
        size = round_up(storage.nbytes(), self.granularity)
        self._alive.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size


def resident_bytes(tensors: Iterable[torch.Tensor], granularity: int = 1) -> int:
    """Bytes of the distinct storages behind these tensors (tied or shared weights count once), each rounded up
    to a multiple of granularity."""
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s._cdata] = round_up(s.nbytes(), granularity)
    return sum(seen.values())
