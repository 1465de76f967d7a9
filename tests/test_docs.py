"""The docs' code runs: every ```python block of README.md and docs/*.md, in order, one
namespace per page (a page's blocks build on each other). A block preceded by a line
``<!-- not run: why -->`` is skipped; a page whose framework is not installed is skipped,
naming it."""

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
        line = text[: match.start("code")].count("\n")
        found.append((line, match["code"]))
    return found


PAGES = [DOCS.parent / "README.md"] + sorted(p for p in DOCS.glob("*.md") if blocks(p))


def test_the_first_hour_pages_have_code_that_runs():
    names = {p.name for p in PAGES}
    assert names >= {
        "getting-started.md",
        "routing.md",
        "schedules.md",
        "checkpoints.md",
        "backends.md",
        "performance.md",
    }


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


# ---------------------------------------------------------------------------------- examples
EXAMPLES = sorted(p for p in (DOCS.parent / "examples").glob("*.py") if p.name != "digits_data.py")  # the data
INSTALL = re.compile(
    r'Install \(from the treeopt checkout\): (?P<line>pip install -e (?:\.|"\.\[(?P<extra>\w+)\]"))$', re.M
)


def _extras():
    import tomllib

    return tomllib.loads((DOCS.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_each_example_says_what_to_install_and_getting_started_says_it_too(example):
    match = INSTALL.search(example.read_text())
    assert match, f"{example.name} does not state its install line"
    assert match["extra"] is None or match["extra"] in _extras()
    assert f"| `examples/{example.name}` | `{match['line']}` |" in (DOCS / "getting-started.md").read_text()


#: a framework that is missing, and one whose import fails (MLX's bare wheel on Linux)
BROKEN = {
    "missing": "sys.modules[{name!r}] = None",
    "broken": "class Broken:\n"
    "    def find_spec(self, fullname, path=None, target=None):\n"
    "        if fullname.split('.')[0] == {name!r}:\n"
    "            raise ImportError('lib{name}.so: cannot open shared object file: No such file or directory')\n"
    "sys.meta_path.insert(0, Broken())",
}


@pytest.mark.parametrize("how", sorted(BROKEN))
@pytest.mark.parametrize(
    "example", [e for e in EXAMPLES if INSTALL.search(e.read_text())["extra"]], ids=lambda e: e.name
)
def test_an_example_without_its_framework_says_what_to_install_in_one_line(example, how):
    import subprocess
    import sys

    extra = INSTALL.search(example.read_text())["extra"]
    framework = {"torch": "torch", "jax": "jax", "mlx": "mlx"}[extra]
    blocked = (
        "import sys, runpy\n"
        + BROKEN[how].format(name=framework)
        + f"\nsys.argv = [{str(example)!r}]\nrunpy.run_path({str(example)!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"pip install -e '.[{extra}]'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
