"""The in-flight count of several front-end processes is one count."""

from __future__ import annotations

import multiprocessing

from ditepose.service.host.admission import SharedAdmission, SharedCounts


def _hold_one(counts: SharedCounts, taken: object, done: object) -> None:
    admission = SharedAdmission(counts, 1, limit=2)
    taken.put(admission.try_acquire("rest"))  # type: ignore[attr-defined]
    done.wait(60)  # type: ignore[attr-defined]
    admission.release()


def test_the_limit_holds_across_processes_and_a_dead_front_end_gives_its_count_back() -> None:
    ctx = multiprocessing.get_context("spawn")
    counts = SharedCounts.create(2, ctx)
    taken, done = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_hold_one, args=(counts, taken, done))
    child.start()
    try:
        assert taken.get(timeout=120) is True
        here = SharedAdmission(counts, 0, limit=2)
        assert here.in_flight == 1  # the other process's request
        assert here.try_acquire("grpc")
        assert not here.try_acquire("rest")  # 2 in flight on the host: the limit
        assert here.rejected["rest"] == 1
        assert here.peak == 2
        here.release()
    finally:
        done.set()
        child.join(60)
    assert child.exitcode == 0
    assert counts.total() == 0
    # A front-end that died holding slots: the host zeroes its cell.
    other = SharedAdmission(counts, 1, limit=2)
    assert other.try_acquire("rest")
    assert counts.forget(1) == 1
    assert SharedAdmission(counts, 0, limit=1).try_acquire("rest")
