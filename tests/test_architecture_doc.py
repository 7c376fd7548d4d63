"""docs/architecture.md names every module of tools/ and server/, and only modules that exist."""
from __future__ import annotations

import re

from conftest import REPO


def test_architecture_names_the_modules_that_exist():
    doc = (REPO / "docs/architecture.md").read_text(encoding="utf-8")
    table = doc[doc.index("## Areas, modules"):doc.index("## Cross-module contracts")]
    named = {"tools": set(), "server": set()}
    for row in table.splitlines()[2:]:
        cells = row.split("|")
        if len(cells) > 3:
            named["tools"] |= set(re.findall(r"(\w+)\.py", cells[2]))
            named["server"] |= set(re.findall(r"(\w+)\.py", cells[3]))
    for pkg, names in named.items():
        present = {p.stem for p in (REPO / pkg).glob("*.py")} - {"__init__", "__main__"}
        assert names - present == set(), f"{pkg}: named but missing: {names - present}"
        assert present - names == set(), f"{pkg}: not in docs/architecture.md: {present - names}"
