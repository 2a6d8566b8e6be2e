"""Helpers every kind of test (and the benches) shares: a free loopback port, polling until
something holds, and this process's settled resident memory. Standard library only, so the deploy
tests and the benches can import it too."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    fn: Callable[[], T],
    timeout: float = 60.0,
    what: str = "condition",
    interval: float = 0.05,
    on_timeout: Callable[[], str] | None = None,
    gave_up: Callable[[], str | None] | None = None,
) -> T:
    """Poll ``fn`` until it returns something truthy, and return that.

    AssertionError after ``timeout`` seconds (with ``on_timeout()`` appended, e.g. a log tail), or
    as soon as ``gave_up()`` names a reason the wait cannot end well (e.g. the process exited)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        reason = gave_up() if gave_up is not None else None
        if reason:
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def settled_rss_bytes() -> int:
    """This process's resident set size after ``gc`` and glibc's ``malloc_trim`` return freed heap to
    the kernel: what a leak test compares (raw RSS also counts the allocator's slack, which varies
    with how threads happened to interleave)."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:  # glibc; musl has no malloc_trim (and little slack to trim)
            trim(0)
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")
