"""The README is a door, and the documentation behind it holds together.

Why these checks: the README was once 36 KB and a newcomer met provenance notes before the API
(issue 25). It stays short, every relative link in it and in ``docs/`` leads to a file (and, for
``#anchors``, to a heading) that exists, and every ``ditepose`` command the pages show still parses
with the real CLI, so a renamed sub-command or flag fails here rather than in a reader's shell.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from ditepose.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
README_LIMIT_BYTES = 12_000  # issue 25: "at most 12 KB", read strictly
# Every hand-written page a reader is sent to: the README, docs/ and the READMEs beside the code.
PAGES = sorted({README, *(REPO_ROOT / "docs").glob("*.md"),
                *(p for top in ("model", "training", "service", "deploy", "docker", "bench")
                  for p in (REPO_ROOT / top).rglob("README.md"))})
FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
SHELL_OPERATORS = {"&", "&&", "||", "|", ";", ">", "2>"}
CLI_NAMES = {"ditepose", ".venv/bin/ditepose"}
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}


def _prose(text: str) -> str:
    """The page without code: links and headings inside code blocks or spans are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """Every heading's anchor, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), flags=re.M):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return anchors


def _relative_links(page: Path) -> list[str]:
    return [link for link in LINK.findall(_prose(page.read_text()))
            if not re.match(r"[a-z][a-z0-9+.-]*:", link)]  # http:, https:, mailto: ...


def _runs_the_cli(words: list[str], i: int) -> bool:
    """``ditepose`` as the command (after ``VAR=value`` assignments) or as ``python -m ditepose``,
    not as an argument (``kubectl -n ditepose``)."""
    if words[i] == "ditepose" and i > 0 and words[i - 1] == "-m":
        return True
    return words[i] in CLI_NAMES and all(re.fullmatch(r"\w+=\S*", w) for w in words[:i])


def _cli_commands(page: Path) -> list[list[str]]:
    """The arguments of every ``ditepose ...`` command in the page's code blocks, continuation
    lines joined, comments, shell operators and what follows them dropped."""
    commands = []
    for block in FENCE.findall(page.read_text()):
        language, body = block[3:].split("\n", 1)
        if language.strip() not in SHELL_LANGUAGES:  # diagrams and listings are not commands
            continue
        body = body.rsplit("```", 1)[0].replace("\\\n", " ")
        for line in body.splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # not shell (JSON, YAML, a directory listing)
                continue
            starts = [i for i, w in enumerate(words) if _runs_the_cli(words, i)]
            if not starts:
                continue
            args = words[starts[0] + 1:]
            cut = next((i for i, w in enumerate(args) if w in SHELL_OPERATORS), len(args))
            commands.append(args[:cut])
    return commands


def test_the_readme_is_at_most_12_kb() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes; move detail to docs/ (limit {README_LIMIT_BYTES})"


def test_the_readme_links_every_docs_page() -> None:
    linked = {(README.parent / link.split("#")[0]).resolve() for link in _relative_links(README)}
    pages = {p.resolve() for p in (REPO_ROOT / "docs").glob("*.md")}
    assert not pages - linked, sorted(p.name for p in pages - linked)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for link in _relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading with that anchor in {target.name}")
    assert not broken, broken


def test_every_ditepose_subcommand_named_in_the_readme_exists() -> None:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    named = set(re.findall(r"(?<![\w.-])ditepose ([a-z][a-z-]*)", README.read_text()))
    assert named, "the README names no ditepose command"
    assert named <= set(subparsers.choices), sorted(named - set(subparsers.choices))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_ditepose_command_shown_parses(page: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Sub-commands, flags and their values as the CLI reads them (no command runs)."""
    for args in _cli_commands(page):
        try:
            build_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{page.name}: `ditepose {shlex.join(args)}` does not parse: {capsys.readouterr().err}")
