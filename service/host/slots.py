"""Fixed-size slots in one shared-memory block per front-end: crops go in, heatmaps come back.

One block per front-end incarnation, created by the host (which unlinks it); the front-end
attaches by name. A slot belongs to one submission from the moment the front-end writes its
crops until the host's reply has arrived, even if the front-end stopped waiting: the host may
still write heatmaps into it. Tensors larger than a slot travel inline in the control message
instead (rare: a slot holds several crops of the largest served model).
"""

from __future__ import annotations

import contextlib
import threading
from multiprocessing import resource_tracker, shared_memory

import torch

SLOT_ALIGN = 4096


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r}")
    return dtype


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * torch.empty((), dtype=dtype).element_size()


class SlotArena:
    """``slots`` slots of ``slot_bytes`` each in one :class:`~multiprocessing.shared_memory.SharedMemory`.

    Pages of a POSIX shared-memory block are allocated on first write, so a generous slot size
    costs address space, not memory, until the traffic needs it."""

    def __init__(self, shm: shared_memory.SharedMemory, slots: int, slot_bytes: int, owner: bool) -> None:
        self.shm = shm
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.owner = owner
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.shm.name

    @classmethod
    def create(cls, slots: int, slot_bytes: int) -> SlotArena:
        slot_bytes = -(-slot_bytes // SLOT_ALIGN) * SLOT_ALIGN
        return cls(shared_memory.SharedMemory(create=True, size=slots * slot_bytes), slots, slot_bytes, owner=True)

    @classmethod
    def attach(cls, name: str, slots: int, slot_bytes: int) -> SlotArena:
        shm = shared_memory.SharedMemory(name=name)
        # Attaching registers the block with this process's resource tracker, which would unlink
        # it when this process ends (Python < 3.13); the host owns it and unlinks it.
        with contextlib.suppress(Exception):
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return cls(shm, slots, slot_bytes, owner=False)

    def fits(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        return nbytes(shape, dtype) <= self.slot_bytes

    def acquire(self) -> int | None:
        """A free slot, or None when all are taken (the caller sends the tensor inline)."""
        with self._lock:
            return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def view(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor over the slot's memory (no copy)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} outside 0..{self.slots - 1}")
        size = nbytes(shape, dtype)
        if size > self.slot_bytes:
            raise ValueError(f"a {tuple(shape)} {dtype} tensor ({size} bytes) does not fit a {self.slot_bytes}-byte slot")
        count = size // max(torch.empty((), dtype=dtype).element_size(), 1)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self.shm.buf, dtype=dtype, count=count, offset=slot * self.slot_bytes)
        return flat.view(*shape)

    def write(self, slot: int, tensor: torch.Tensor) -> None:
        self.view(slot, tuple(tensor.shape), tensor.dtype).copy_(tensor)

    def read(self, slot: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A copy of the slot's tensor (the slot is reused after this)."""
        return self.view(slot, shape, dtype).clone()

    def close(self) -> None:
        """Unmap (and, for the owner, unlink) the block; tensors still viewing it keep it mapped."""
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()
        with contextlib.suppress(BufferError):
            self.shm.close()
