"""The documentation site stays complete: every public name in the API reference,
every tutorial in the navigation, every figure and table a page shows on disk.
(`.ci/run` also builds the site with `mkdocs build --strict`.)"""

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
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    names = [p.stem for p in tutorials()]
    assert {"sinc_regression", "eight_schools", "logistic_regression", "deep_ensemble"} <= set(names)
    for name in names:
        assert f"tutorials/{name}.md" in nav, name
        assert f'"{name}.py"' in tests, f"no test runs examples/{name}.py"


def test_figures_and_tables_shown_exist():
    pages = [*DOCS.glob("*.md"), *tutorials()]
    for page in pages:
        text = page.read_text()
        for ref in re.findall(r"\]\(\.\./(figures/[\w.-]+)\)", text) + re.findall(
            r"\]\((figures/[\w.-]+)\)", text
        ) + re.findall(r'--8<-- "(figures/[\w.-]+)"', text):
            assert (DOCS / ref).is_file(), f"{page.name} shows {ref}, which is not in docs/"
