"""Small helpers of the service benches and tests: the test image, a free port, a process's CPU time and RSS."""

from __future__ import annotations

import socket
from pathlib import Path

import cv2
import numpy as np

from ditepose.model.engines.process_engine import stat_cpu_seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_jpeg() -> tuple[bytes, list[float]]:
    """A 640x480 JPEG of one stick figure and its box [x, y, w, h]."""
    img = np.full((480, 640, 3), 190, np.uint8)
    cv2.circle(img, (320, 90), 28, (140, 170, 220), -1)
    cv2.line(img, (320, 120), (320, 280), (160, 40, 40), 18)
    for dx in (-70, 70):
        cv2.line(img, (320, 150), (320 + dx, 230), (160, 40, 40), 10)
        cv2.line(img, (320, 280), (320 + dx // 2, 420), (30, 30, 30), 12)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes(), [230.0, 50.0, 180.0, 390.0]


class ProcCpu:
    """CPU seconds of a process (all threads) and of its main thread (the asyncio loop of uvicorn)."""

    def __init__(self, pid: int) -> None:
        self.proc = Path(f"/proc/{pid}")

    def read(self) -> tuple[float, float]:
        return stat_cpu_seconds(self.proc / "stat"), stat_cpu_seconds(self.proc / "task" / self.proc.name / "stat")


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS of ``/proc/<pid>/status``) in MiB; NaN without that line."""
    kb = _status_kb(pid, "VmRSS")
    return float("nan") if kb is None else kb / 1024


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:  # the process exited between the listing and the read
        return None
    return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``/proc/<pid>/task/*/children``), parents first."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        found.append(current)
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                queue.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def tree_memory_mb(pid: int) -> list[dict]:
    """Per process of ``pid``'s tree: its command name, current RSS (VmRSS) and peak RSS (VmHWM) in MiB.

    The peak is the kernel's high-water mark since the process started, so a reading after the
    load covers every burst in between without sampling.
    """
    rows = []
    for member in process_tree(pid):
        rss, peak = _status_kb(member, "VmRSS"), _status_kb(member, "VmHWM")
        if rss is None or peak is None:
            continue
        try:
            name = Path(f"/proc/{member}/comm").read_text().strip()
        except OSError:
            name = "?"
        rows.append({"pid": member, "name": name, "rss_mb": round(rss / 1024, 1), "peak_rss_mb": round(peak / 1024, 1)})
    return rows
