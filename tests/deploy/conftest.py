"""The deploy tests' report: timings and facts (image sizes, stand-in images) shown after the run."""

from __future__ import annotations

import pytest

REPORT: list[str] = []


@pytest.fixture(scope="session")
def deploy_report() -> list[str]:
    """Append lines here; they are printed in the terminal summary (also under -q, also when passing)."""
    return REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("deploy: docker images and compose")
        for line in REPORT:
            terminalreporter.write_line(line)
