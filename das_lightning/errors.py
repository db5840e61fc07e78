"""The project's user-facing errors: one base class, so the CLI turns exactly these into one ``error:`` line and
exit code 2, while an unexpected exception (a bug here, in torch or in numpy) keeps its traceback.

Each also derives from the built-in exception it refines (ValueError, FileNotFoundError, ...), so code and tests
that catch the built-in keep working."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a setting, a missing, damaged or mismatched artifact, bad input data."""


class ConfigError(UserError, ValueError):
    """A setting or an input value that cannot work (named in the message, with what would)."""


class MissingArtifactError(UserError, FileNotFoundError):
    """A file or folder a stage needs is not there (the message says which command makes it)."""


class NumericalError(UserError, FloatingPointError):
    """Non-finite values where a stage needs finite ones (a diverged model, NaN features)."""
