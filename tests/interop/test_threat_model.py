"""THREATS.md stays true: every test it names as proof of a mitigation exists.

A reference is `path::test` (a Python test function, or a Rust `fn` anywhere in that file;
`…::test` reuses the file of the reference before it in the same table cell) or a bare path
(the file must exist)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REF = re.compile(r"`((?:tests|crates)/[^`:]+|…)(?:::([\w:]+))?`")


def references():
    text = (REPO / "THREATS.md").read_text()
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        for cell in line.split("|"):
            last = None
            for m in REF.finditer(cell):
                path, name = m.group(1), m.group(2)
                if path == "…":
                    path = last
                last = path
                yield path, name


def test_every_named_test_exists():
    refs = list(references())
    assert len(refs) > 40, f"only {len(refs)} references found: is the table format unchanged?"
    missing = []
    for path, name in refs:
        assert path is not None, "an `…::test` reference with no file before it"
        file = REPO / path
        if not file.is_file():
            missing.append(f"{path} (no such file)")
            continue
        if name is None:
            continue
        leaf = name.split("::")[-1]
        body = file.read_text()
        pattern = rf"^\s*def {leaf}\b" if path.endswith(".py") else rf"\bfn {leaf}\b"
        if not re.search(pattern, body, re.M):
            missing.append(f"{path}::{name}")
    assert not missing, "THREATS.md names tests that do not exist: " + ", ".join(missing)
