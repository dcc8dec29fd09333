"""The README's Python example runs as pasted."""

import pathlib
import re


def test_readme_example_runs(capsys):
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "the README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "(8,) (8, 1000)" in printed and "verdict:" in printed
