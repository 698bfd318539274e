"""Every Python example in README.md runs, so the README cannot drift from the code."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks():
    text = open(README).read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("i", range(len(_blocks())))
def test_readme_example_runs(i):
    code = _blocks()[i]
    exec(compile(code, f"README.md example {i + 1}", "exec"), {"__name__": "readme_example"})


def test_readme_names_both_commands():
    text = open(README).read()
    assert "./run.sh main" in text and "./run.sh test" in text
