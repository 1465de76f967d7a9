"""The docs' code runs: every ```python block of docs/*.md, in order, one namespace per page
(a page's blocks build on each other). A block preceded by a line ``<!-- not run: why -->``
is skipped; a page whose framework is not installed is skipped, naming it."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).parent.parent / "docs"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)
OPTIONAL = {"torch", "jax", "optax", "mlx", "flax", "safetensors", "numba", "matplotlib", "rich", "ml_dtypes"}


def blocks(page):
    """``(line number, code)`` of every runnable python block of ``page``."""
    text = page.read_text()
    found = []
    for match in BLOCK.finditer("\n" + text):
        if match["before"].strip().startswith("<!-- not run"):
            continue
        line = text[:match.start("code")].count("\n")
        found.append((line, match["code"]))
    return found


PAGES = sorted(p for p in DOCS.glob("*.md") if blocks(p))


def test_the_first_hour_pages_have_code_that_runs():
    names = {p.name for p in PAGES}
    assert names >= {"getting-started.md", "routing.md", "schedules.md", "checkpoints.md", "backends.md",
                     "performance.md"}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_doc_code_runs(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # files the snippets write land here
    namespace = {"__name__": f"docs_{page.stem}"}
    for line, code in blocks(page):
        try:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except ModuleNotFoundError as error:
            if error.name and error.name.split(".")[0] in OPTIONAL:
                pytest.skip(f"{page.name} line {line} needs {error.name}, which is not installed")
            raise
