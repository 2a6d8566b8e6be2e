"""docs/configuration.md lists every DITEPOSE_* variable with its default and description, and is current."""

from __future__ import annotations

import re
import subprocess
import sys

from ditepose.service.core.settings import ModelSpec, Settings
from tests.conftest import REPO_ROOT, subprocess_env
from tests.deploy.compose_support import gen_config

DOC = REPO_ROOT / "docs" / "configuration.md"


def test_the_committed_reference_is_what_the_generator_writes():
    assert DOC.read_text() == gen_config().render(), "docs/configuration.md is stale: run python docs/gen_config.py"


def test_every_variable_has_a_row_with_default_and_description():
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(DITEPOSE_[A-Z0-9_]+)` \|.*$", DOC.read_text(), re.M)}
    expected = set(gen_config().env_vars())
    assert {f"DITEPOSE_{name.upper()}" for name in Settings.model_fields} <= expected
    assert set(rows) == expected
    for name, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 4, row
        _, type_, default, description = cells
        assert type_ and default.startswith(("`", "*")) and len(description) > 10, f"{name}: {row}"
    assert rows["DITEPOSE_PORT"].split(" | ")[2] == "`8000`"
    for field in ModelSpec.model_fields:  # nested JSON entries are documented too
        assert f"| `{field}` |" in DOC.read_text()


def test_check_mode_runs_as_a_script_and_catches_a_stale_file(tmp_path):
    ok = subprocess.run([sys.executable, "docs/gen_config.py", "--check"], cwd=REPO_ROOT, env=subprocess_env(),
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    module = gen_config()
    original = module.OUTPUT
    try:
        module.OUTPUT = tmp_path / "configuration.md"
        module.OUTPUT.write_text("# old\n")
        assert module.main(["--check"]) == 1
        assert module.main([]) == 0
        assert module.main(["--check"]) == 0
    finally:
        module.OUTPUT = original


def test_every_settings_class_and_variable_in_the_code_is_documented():
    """A new DITEPOSE_* settings class or a variable read directly must show up in the reference."""
    sources = {(s.module, s.cls) for s in gen_config().SOURCES}
    known = set(gen_config().env_vars())
    found = set()
    for package in ("model", "training", "service", "proto"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            text = path.read_text()
            module = ".".join(("ditepose", *path.relative_to(REPO_ROOT).with_suffix("").parts))
            for match in re.finditer(r"class (\w+)\(BaseSettings\):(?:(?!\nclass ).)*?env_prefix=\"DITEPOSE_\"",
                                     text, re.S):
                assert (module, match.group(1)) in sources, f"{module}.{match.group(1)} is not in gen_config.SOURCES"
                found.add((module, match.group(1)))
            for variable in re.findall(r"\b(DITEPOSE_[A-Z][A-Z0-9_]*)\b", text):
                assert variable in known, f"{path}: {variable} is no settings field"
    assert ("ditepose.service.core.settings", "Settings") in found
