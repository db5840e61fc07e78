"""Only the project's own user-facing errors become one `error:` line and exit 2; anything else keeps its traceback."""

from __future__ import annotations

import pytest

from das_lightning.cli import user_errors_exit
from das_lightning.errors import ConfigError, MissingArtifactError, NumericalError, UserError


@pytest.mark.parametrize("error", [ConfigError("bad"), MissingArtifactError("gone"), NumericalError("nan")])
def test_a_user_error_is_one_line_and_exit_2(error: UserError, capsys) -> None:
    def main() -> None:
        raise error

    with pytest.raises(SystemExit) as exited:
        user_errors_exit(main)()
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"


@pytest.mark.parametrize("error", [ValueError("a bug"), FileNotFoundError("a bug"), KeyError("a bug")])
def test_any_other_exception_keeps_its_traceback(error: Exception) -> None:
    def main() -> None:
        raise error

    with pytest.raises(type(error)):
        user_errors_exit(main)()


def test_user_errors_are_still_the_builtins_they_refine() -> None:
    assert issubclass(ConfigError, ValueError) and issubclass(MissingArtifactError, FileNotFoundError)
