"""SharedSlots: first come first served, across event loops, and a waiter that gives up leaves no slot behind."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ditepose.service.core.slots import SharedSlots


def test_slots_go_in_order_and_come_back() -> None:
    slots = SharedSlots(1)
    order: list[int] = []

    async def main() -> None:
        await slots.acquire(1.0)
        waiters = [asyncio.create_task(_take(slots, i, order)) for i in range(3)]
        while slots.waiting < 3:
            await asyncio.sleep(0)
        slots.release()
        await asyncio.gather(*waiters)

    asyncio.run(main())
    assert order == [0, 1, 2]
    assert slots.in_use == 0 and slots.waiting == 0


async def _take(slots: SharedSlots, index: int, order: list[int]) -> None:
    async with slots.slot(10.0):
        order.append(index)
        await asyncio.sleep(0)


def test_a_waiter_that_times_out_leaves_the_line() -> None:
    slots = SharedSlots(1)

    async def main() -> bool:
        await slots.acquire(1.0)
        try:
            return await slots.acquire(0.01)
        finally:
            slots.release()

    assert asyncio.run(main()) is False
    assert slots.in_use == 0 and slots.waiting == 0
    with pytest.raises(TimeoutError):
        async def blocked() -> None:
            await slots.acquire(1.0)
            async with slots.slot(0.0):
                pass  # pragma: no cover
        asyncio.run(blocked())


def test_a_slot_released_on_one_loop_wakes_a_waiter_on_another() -> None:
    slots = SharedSlots(1)
    taken, woke = threading.Event(), threading.Event()

    async def holder() -> None:
        await slots.acquire(1.0)
        taken.set()
        while slots.waiting == 0:
            await asyncio.sleep(0.001)
        slots.release()

    async def waiter() -> None:
        assert await slots.acquire(30.0)
        woke.set()
        slots.release()

    thread = threading.Thread(target=lambda: asyncio.run(holder()))
    thread.start()
    assert taken.wait(30)
    asyncio.run(waiter())
    thread.join(30)
    assert woke.is_set() and slots.in_use == 0


def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    slots = SharedSlots(1)

    async def main() -> int:
        await slots.acquire(1.0)
        task = asyncio.create_task(slots.acquire(30.0))
        while slots.waiting == 0:
            await asyncio.sleep(0)
        slots.release()  # granted to the task ...
        task.cancel()  # ... which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await task
        return slots.in_use

    assert asyncio.run(main()) == 0
