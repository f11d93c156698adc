"""The README's argument table documents every setting of the declaration with its real default, so the
documentation cannot drift from dist_marsm/settings.py."""

from __future__ import annotations

import ast
from pathlib import Path

from dist_marsm import settings

README = Path(__file__).resolve().parent.parent / "README.md"


def _table_rows() -> dict[str, str]:
    text = README.read_text()
    start = text.index("| argument | default | meaning |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        name, default = (c.strip() for c in line.strip("|").split("|")[:2])
        rows[name.strip("`")] = default
    return rows


def test_readme_argument_table_lists_every_setting_with_its_default():
    rows = _table_rows()
    documented = [s for s in settings.SETTINGS if s.argument]
    assert set(rows) == {s.name for s in documented}, set(rows) ^ {s.name for s in documented}
    for s in documented:
        assert ast.literal_eval(rows[s.name]) == s.default, (s.name, rows[s.name], s.default)
    assert list(rows) == [s.name for s in documented], "rows in declaration order"
