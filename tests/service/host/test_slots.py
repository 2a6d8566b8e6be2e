"""Shared-memory slots: a tensor written by one side reads back equal on the other."""

from __future__ import annotations

import pytest
import torch

from ditepose.service.host.slots import SlotArena


def test_a_tensor_round_trips_through_an_attached_arena() -> None:
    owner = SlotArena.create(slots=2, slot_bytes=3 * 8 * 8 * 4 * 2)
    try:
        other = SlotArena.attach(owner.name, owner.slots, owner.slot_bytes)
        crops = torch.randn(2, 3, 8, 8)
        slot = other.acquire()
        assert slot is not None
        other.write(slot, crops)
        seen = owner.view(slot, (2, 3, 8, 8), torch.float32)
        assert torch.equal(seen, crops)
        owner.write(slot, seen * 2)  # the reply goes back into the same slot
        assert torch.equal(other.read(slot, (2, 3, 8, 8), torch.float32), crops * 2)
        del seen
        other.close()
    finally:
        owner.close()


def test_slots_run_out_and_come_back() -> None:
    arena = SlotArena.create(slots=2, slot_bytes=64)
    try:
        taken = [arena.acquire(), arena.acquire()]
        assert sorted(taken) == [0, 1]  # type: ignore[type-var]
        assert arena.acquire() is None  # the caller then sends its tensor inline
        arena.release(taken[0])  # type: ignore[arg-type]
        assert arena.acquire() == taken[0]
    finally:
        arena.close()


def test_a_tensor_larger_than_a_slot_is_refused() -> None:
    arena = SlotArena.create(slots=1, slot_bytes=16)
    try:
        assert not arena.fits((1, 3, 64, 64), torch.float32)
        with pytest.raises(ValueError, match="does not fit"):
            arena.write(0, torch.zeros(1, 3, 64, 64))
    finally:
        arena.close()
