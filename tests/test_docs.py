"""The documentation site stays complete: every public name in the API reference,
every tutorial in the navigation, every figure and table a page shows on disk.
(`.ci/run` also builds the site with `mkdocs build --strict`.)"""

import ast
import pathlib
import re

import numpyro_ensemble

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def tutorials():
    return [p for p in sorted((ROOT / "examples").glob("*.py"))
            if p.read_text().startswith("# %% [markdown]")]


def test_api_reference_lists_every_public_name():
    documented = set(re.findall(r"^::: numpyro_ensemble\.(\w+)", (DOCS / "api.md").read_text(), re.M))
    assert documented == set(numpyro_ensemble.__all__)


def test_every_tutorial_is_in_the_navigation_and_tested():
    nav = (ROOT / "mkdocs.yml").read_text()
    names = [p.stem for p in tutorials()]
    assert {"sinc_regression", "eight_schools", "logistic_regression", "deep_ensemble"} <= set(names)
    run = tutorials_run_by_tests()
    for name in names:
        assert f"tutorials/{name}.md" in nav, name
        assert name in run, f"no test function calls run_tutorial({name!r}, ...)"


def tutorials_run_by_tests() -> set:
    """The names ``n`` of ``run_tutorial("n", ...)`` calls (conftest.py: runs
    examples/n.py in quick mode) inside the test functions of tests/**/test_*.py: a
    mention in a comment, a string or a helper does not count."""
    found = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            for call in ast.walk(node):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Name)
                    and call.func.id == "run_tutorial"
                    and call.args
                    and isinstance(call.args[0], ast.Constant)
                ):
                    found.add(call.args[0].value)
    return found


def test_figures_and_tables_shown_exist():
    pages = [*DOCS.glob("*.md"), *tutorials()]
    for page in pages:
        text = page.read_text()
        for ref in re.findall(r"\]\(\.\./(figures/[\w.-]+)\)", text) + re.findall(
            r"\]\((figures/[\w.-]+)\)", text
        ) + re.findall(r'--8<-- "(figures/[\w.-]+)"', text):
            assert (DOCS / ref).is_file(), f"{page.name} shows {ref}, which is not in docs/"
