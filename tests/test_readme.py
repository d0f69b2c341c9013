"""The README's commands are what CI runs: `.ci/run` holds exactly the README's install, check and test lines."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def command_lines(text: str) -> list[str]:
    """Shell lines without comments, blank lines and the script's own set-up (``set``, ``cd``)."""
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def readme_shell_blocks() -> list[str]:
    readme = (REPO / "README.md").read_text()
    return [line for block in re.findall(r"```bash\n(.*?)```", readme, re.S) for line in command_lines(block)]


def test_ci_runs_exactly_the_readme_quick_start():
    ci = command_lines((REPO / ".ci" / "run").read_text())
    quick_start = readme_shell_blocks()[: len(ci)]
    assert ci == quick_start, "the README's first commands (install, checks, tests) and .ci/run must be the same"
    assert ci[0].startswith("pip install") and "metrank data fetch --for-tests" in ci[0]
    assert ci[-1] == "HF_HUB_OFFLINE=1 python -m pytest -q"
