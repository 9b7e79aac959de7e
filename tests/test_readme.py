"""The README stays true: its snippets run and CI runs its test command."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_snippets_run():
    """The snippets run in order in one namespace, as a reader pasting them would."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "the README has no python snippets"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_ci_runs_the_readme_test_command():
    command = re.search(r'pip install -e "\.\[test\]" && (python -m pytest\S*)', README)
    assert command, "the README's test set-up command is missing"
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]"' in ci
    assert re.search(rf"^{re.escape(command.group(1))}$", ci, re.M)


def test_main_job_command_uses_a_real_config():
    command = re.search(r"pip install -e \. && python train\.py --config=(\S+) --workdir=", README)
    assert command, "the README's main-job set-up command is missing"
    assert (ROOT / command.group(1)).is_file()
