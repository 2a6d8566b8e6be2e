"""What a server in this process logged: every record of the root and uvicorn loggers, kept in a list.

uvicorn's loggers do not propagate to the root logger (its logging config gives ``uvicorn`` its own
handler), so a test that wants "no traceback in the server's log" attaches to both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

WATCHED = ("", "uvicorn", "uvicorn.error", "uvicorn.access")


class RecordList(logging.Handler):
    """Keeps the records it is handed."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        """Each record that carries a traceback, formatted (its exception, or a message quoting one)."""
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return [formatter.format(r) for r in self.records
                if r.exc_info or r.exc_text or r.stack_info or "Traceback" in r.getMessage()]

    def at(self, level: int, contains: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.levelno == level and contains in r.getMessage()]


@contextmanager
def server_log(level: int = logging.INFO) -> Iterator[RecordList]:
    """Collect the records of the watched loggers at ``level`` and above while the block runs."""
    handler = RecordList()
    loggers = [logging.getLogger(name) for name in WATCHED]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > level:
            lg.setLevel(level)
    try:
        yield handler
    finally:
        for lg, old in zip(loggers, previous, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(old)
