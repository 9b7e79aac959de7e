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
    assert re.search(rf"^(run_pytest )?{re.escape(command.group(1))}$", ci, re.M)


def test_main_job_command_uses_a_real_config():
    command = re.search(r"pip install -e \. && python train\.py --config=(\S+) --workdir=", README)
    assert command, "the README's main-job set-up command is missing"
    assert (ROOT / command.group(1)).is_file()


def _commands() -> list[str]:
    """Every command of the README that names a config: each line of its shell code blocks
    (``\\`` continuations joined) and each inline code span."""
    text = re.sub(r"\\\n\s*", " ", README)
    fenced = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    lines = [
        line
        for kind, body in fenced.findall(text)
        if kind in ("", "bash")
        for line in body.splitlines()
    ]
    spans = re.findall(r"`([^`]+)`", fenced.sub("", text))
    return [" ".join(c.split()) for c in lines + spans if "--config=" in c]


PLACEHOLDER = re.compile(r"CONFIG|ARG|FIELD|\.\.\.")


def _parse(command: str, tmp_path) -> None:
    """Parses the command's --config and --config.FIELD=VALUE flags as train.py does (absl and
    ml_collections' config_flags), the COCO folder's path replaced by a small real folder."""
    from absl import flags
    from ml_collections import config_flags

    from tests import coco_fixtures

    tokens = [t for t in command.split() if t.startswith("--config")]
    for grid in re.findall(r"--grid=([\w.]+)=(\S+)", command):  # the sweep's grid values
        tokens += [f"--config.{grid[0]}={value}" for value in grid[1].split(",")]
    config_arg = next(t for t in tokens if t.startswith("--config="))
    if "coco_folder.py:" in config_arg:
        folder = tmp_path / "coco"
        if not folder.exists():
            coco_fixtures.make_coco_folder(folder, train=4, val=2)
        config_arg = re.sub(r"coco_folder\.py:[^,\s]+", f"coco_folder.py:{folder}", config_arg)
    argv = ["train.py", config_arg.replace("configs/", f"{ROOT}/configs/"), *tokens[1:]]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    assert values.config is not None


def test_every_readme_config_and_override_parses(tmp_path):
    commands = [c for c in _commands() if not PLACEHOLDER.search(c.split("--config=")[1])]
    assert len(commands) >= 10, commands
    for command in commands:
        try:
            _parse(command, tmp_path)
        except Exception as error:  # noqa: BLE001  (name the command that fails)
            raise AssertionError(f"README command does not parse: {command}\n{error}") from error
