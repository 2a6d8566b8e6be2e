#!/usr/bin/env python3
"""The static checks of ``make lint`` beyond ruff: import-linter's layer contracts and mypy.

Why a tree is laid out first: the repository's folders ``model/``, ``training/``, ``service/``
and ``proto/`` install as ``ditepose.model`` and so on, and the editable install maps them
through setuptools' import hook, which static analysers do not run (``lint-imports`` answers
"Module 'ditepose.model' does not exist"). So this script lays out ``ditepose/`` in a
temporary folder as symbolic links into the working tree (instant, always current), runs the
tools there, and rewrites the paths in their output back to the working tree's files
(``ditepose/service/core/x.py`` -> ``service/core/x.py``).

    python scripts/static_checks.py              # both, exit 1 if either fails
    python scripts/static_checks.py imports      # import-linter only
    python scripts/static_checks.py types        # mypy only
    python scripts/static_checks.py imports --tree DIR   # a tree already laid out (tests)

Both read their configuration from pyproject.toml (``[tool.importlinter]``, ``[tool.mypy]``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("model", "training", "service", "proto")
_TREE_PATH = re.compile(r"(?<![\w/])ditepose/(" + "|".join(SUBPACKAGES) + r")/")


def lay_out(target: Path, repo: Path = REPO) -> Path:
    """``target/ditepose`` as links into ``repo``: the package as it is imported, for the tools."""
    package = target / "ditepose"
    package.mkdir(parents=True, exist_ok=True)
    for module in (repo / "ditepose").glob("*.py"):
        (package / module.name).symlink_to(module)
    for name in SUBPACKAGES:
        (package / name).symlink_to(repo / name, target_is_directory=True)
    return target


def to_working_tree(text: str) -> str:
    """Paths in a tool's output, from the laid-out package back to the repository's folders."""
    return _TREE_PATH.sub(r"\1/", text)


def _run(argv: list[str], tree: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    sys.stdout.write(to_working_tree(proc.stdout))
    sys.stderr.write(to_working_tree(proc.stderr))
    return proc.returncode


def check_imports(tree: Path, config: Path) -> int:
    """import-linter's contracts (the layers of docs/architecture.md)."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    return _run([str(lint_imports), "--no-cache", str(config)], tree)


def check_types(tree: Path, config: Path) -> int:
    """mypy over the whole package, configured by pyproject.toml."""
    return _run([sys.executable, "-m", "mypy", "--config-file", str(config), "-p", "ditepose"], tree)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checks", nargs="*", metavar="{imports,types}", help="default: both")
    parser.add_argument("--tree", type=Path, help="a folder that already holds ditepose/ (default: links here)")
    parser.add_argument("--config", type=Path, default=REPO / "pyproject.toml")
    args = parser.parse_args(argv)
    checks = args.checks or ["imports", "types"]
    unknown = sorted(set(checks) - {"imports", "types"})
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}: choose imports, types")
    with tempfile.TemporaryDirectory(prefix="ditepose-static-") as scratch:
        tree = args.tree.resolve() if args.tree else lay_out(Path(scratch))
        failed = []
        for name in checks:
            print(f"== static check: {name}", flush=True)
            run = check_imports if name == "imports" else check_types
            if run(tree, args.config.resolve()) != 0:
                failed.append(name)
    if failed:
        print(f"static checks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
