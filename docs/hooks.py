"""MkDocs hooks (``hooks:`` in mkdocs.yml), run only when the site is built.

- Every tutorial in ``examples/`` (a jupytext percent-format script whose first cell
  is markdown) becomes the page ``tutorials/<name>.md``: jupytext turns its markdown
  cells into text and its code cells into code blocks, so the page is the script.
- NumPyro-style docstrings use Sphinx roles (:class:`~x.Y`, :math:`x`) and
  ``.. doctest::``; in the rendered API reference they become code and MathJax.
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
_ROLE = re.compile(r":(\w+):<code>(~?)([^<]*)</code>")
_DIRECTIVE = re.compile(r"<p>\.\. (?:doctest|testcode)::</p>\s*")


def tutorials() -> dict[str, pathlib.Path]:
    """The example scripts written as tutorials (first cell markdown), by page path."""
    return {
        f"tutorials/{path.stem}.md": path
        for path in sorted(EXAMPLES.glob("*.py"))
        if path.read_text().startswith("# %% [markdown]")
    }


def tutorial_markdown(path: pathlib.Path) -> str:
    import jupytext

    notebook = jupytext.reads(path.read_text(), fmt="py:percent")
    notebook.metadata = {}
    text = re.sub(r"\A---\n.*?\n---\n+", "", jupytext.writes(notebook, fmt="md"), flags=re.S)
    source = f"examples/{path.name}"
    return text + (
        f"\n---\n\nThis page is the script `{source}`: run it with `python {source}` "
        f"(or `python {source} --quick` for a quick check with few steps).\n"
    )


def on_files(files, config):
    from mkdocs.structure.files import File

    for page, path in tutorials().items():
        files.append(File.generated(config, page, content=tutorial_markdown(path)))
    return files


def _code(match) -> str:
    role, tilde, text = match.groups()
    if role == "math":  # MathJax typesets \( ... \)
        return f'<span class="arithmatex">\\({text}\\)</span>'
    return f"<code>{text.rsplit('.', 1)[-1] if tilde else text}</code>"


def on_page_content(html, page, config, files):
    return _DIRECTIVE.sub("", _ROLE.sub(_code, html))
