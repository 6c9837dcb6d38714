"""The README's Python blocks are tests: each must run and print what it says."""
import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _run_first_block_after(heading: str) -> list[str]:
    """Run the first Python block after ``heading``; returns the words it printed."""
    text = README.read_text()
    section = text[text.index(heading):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "gradguard.eval" not in code  # the user's own model, in plain torch
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    return out.getvalue().split()


def test_readme_quick_start_runs():
    assert _run_first_block_after("## Quick start") == ["delta", "32", "4"]


def test_readme_aggregator_snippet_runs():
    assert _run_first_block_after("## Sending protected updates to an aggregator") == ["1", "1"]
