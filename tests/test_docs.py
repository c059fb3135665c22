"""The README documents the contracts users rely on: it must not drift from the code."""

from __future__ import annotations

import json
from pathlib import Path

from core.schemas import REJECT_REASONS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_starts_with_the_two_commands():
    head = README[: README.index("## Architecture")]
    assert "make run" in head and "make test" in head


def test_every_reject_reason_is_documented():
    missing = [reason for reason in REJECT_REASONS if f"`{reason}`" not in README]
    assert not missing, f"reject reasons missing from the README: {missing}"


def test_every_scores_column_is_documented():
    contract = json.loads((REPO / "schemas" / "scores.schema.json").read_text())
    for field in contract["fields"]:
        name = field["name"]
        documented = f"`{name}`" in README or (name.startswith("p_") and "`p_<label>`" in README)
        assert documented, f"scores column {name} is not in the README's schema table"


def test_ci_runs_make_test():
    assert "make test" in (REPO / ".ci" / "run").read_text()
