"""README.md's "## Errors" table is executable: every row's example is run and must raise the
row's error type with exactly the row's message, so the README and the code cannot drift.

A row is ``| API | Checks that | `example` | `ErrorType` | message |``. The example runs with
``torch``, ``attnkern``, ``x`` (a valid [2, 8, 5, 6] input), ``mlp`` (``Linear(8, 8)``),
``spatial`` (``Conv2d(2, 1, 3, padding=1)``) and ``backend(NAME)`` (a context manager that sets
``ATTNKERN_BACKEND``) in scope; it may be an expression or a one-line ``with`` statement.
"""
from __future__ import annotations

import builtins
import os
import re
from pathlib import Path
from unittest import mock

import pytest
import torch

import attnkern

README = Path(__file__).resolve().parents[1] / "README.md"
COLUMNS = ["API", "Checks that", "Example", "Error", "Message"]


def _section(text: str) -> str:
    m = re.search(r"^## Errors\n(.*?)(?=^## )", text, flags=re.S | re.M)
    if m is None:
        raise AssertionError("README.md has no '## Errors' section followed by another section")
    return m.group(1)


def _code(cell: str, what: str) -> str:
    m = re.fullmatch(r"`([^`]+)`", cell)
    if m is None:
        raise AssertionError(f"the {what} cell must be one `code span`, got {cell!r}")
    return m.group(1)


def parse_table(text: str):
    """[(api, checks, example, error type name, message)] from the Errors section."""
    lines = [ln for ln in _section(text).splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS, f"Errors table header must be {COLUMNS}, got {header}"
    assert set(lines[1].replace("|", "").strip()) <= set("-: "), "second line must be the separator"
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS), f"a row needs {len(COLUMNS)} cells (no '|' inside them): {ln}"
        api, checks, example, error, message = cells
        rows.append((_code(api, "API"), checks, _code(example, "Example"), _code(error, "Error"), message))
    return rows


ROWS = parse_table(README.read_text())


def test_table_covers_every_public_entry_point():
    apis = {r[0] for r in ROWS}
    for name in ("attnkern.cbam", "attnkern.squeeze_excite", "attnkern.bam", "attnkern.CBAM",
                 "attnkern.SqueezeExcite", "attnkern.BAM", "attnkern.convert", "ATTNKERN_BACKEND",
                 "attnkern.scaled_dot_product_attention", "attnkern.Attention",
                 "attnkern.explain.attention_rows", "attnkern.explain.attention_received"):
        assert name in apis, f"README's Errors table has no row for {name}"


def _error_type(name: str) -> type:
    t = getattr(builtins, name, None)
    if not (isinstance(t, type) and issubclass(t, BaseException)):
        raise AssertionError(f"{name!r} is not a built-in exception type")
    return t


def _namespace():
    torch.manual_seed(0)
    return dict(
        torch=torch, attnkern=attnkern,
        x=torch.randn(2, 8, 5, 6),
        mlp=torch.nn.Linear(8, 8),
        spatial=torch.nn.Conv2d(2, 1, 3, padding=1),
        backend=lambda name: mock.patch.dict(os.environ, {"ATTNKERN_BACKEND": name}),
    )


@pytest.mark.parametrize("api,checks,example,error,message", ROWS,
                         ids=[f"{r[0]}: {r[1]}" for r in ROWS])
def test_documented_error(monkeypatch, api, checks, example, error, message):
    monkeypatch.delenv("ATTNKERN_BACKEND", raising=False)  # only the example's own backend()
    with pytest.raises(Exception) as info:
        exec(compile(example, f"README Errors row ({api})", "exec"), _namespace())
    assert type(info.value) is _error_type(error), (
        f"{example} raised {type(info.value).__name__}: {info.value}; README says {error}")
    assert str(info.value) == message, f"{example}: message\n  {info.value}\nREADME says\n  {message}"


def test_parser_rejects_a_malformed_row():
    bad = "## Errors\n\n| " + " | ".join(COLUMNS) + " |\n|---|---|---|---|---|\n| `f` | x | f() | `ValueError` | m |\n\n## Next\n"
    with pytest.raises(AssertionError, match="code span"):
        parse_table(bad)
