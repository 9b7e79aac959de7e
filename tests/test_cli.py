"""sasa_jax.cli: a user's mistake is one line and status 2; a bug keeps its traceback."""

import pytest
from absl import app

from sasa_jax import cli


@pytest.mark.parametrize("error", [ValueError("bad --step"), FileNotFoundError("no workdir")])
def test_a_users_mistake_is_one_line_and_status_2(error, capsys):
    with pytest.raises(SystemExit) as exit_, cli.user_errors("sasa_jax.x"):
        raise error
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"sasa_jax.x: error: {error}\n"


def test_a_bug_and_traceback_keep_the_exception(capsys):
    with pytest.raises(KeyError), cli.user_errors("sasa_jax.x"):
        raise KeyError("a bug")
    with pytest.raises(ValueError, match="bad"), cli.user_errors("sasa_jax.x", traceback=True):
        raise ValueError("bad")
    assert capsys.readouterr().err == ""


def test_positional_arguments_are_a_usage_error():
    cli.no_positional_arguments(["prog"])
    with pytest.raises(app.UsageError, match=r"unexpected arguments: \['stray'\]"):
        cli.no_positional_arguments(["prog", "stray"])
