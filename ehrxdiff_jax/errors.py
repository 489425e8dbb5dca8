"""User errors: a bad input file, a bad config value, a refused output or workdir.

Code raises `UserError` (or a subclass) with a message that names the file or config key, says what is
wrong and what to do. The command line (`ehrxdiff_jax/cli.py`) prints such an error as one line
`error: MESSAGE` and exits 2; any other exception is a bug and keeps its traceback. `--debug` (or the
environment variable EHRXDIFF_DEBUG=1) shows the traceback of user errors too.

UserError is a ValueError, so callers that catch ValueError keep working. FileNotFoundError and
FileExistsError (a missing input, an existing output: both name the path) count as user errors as well.
"""
from __future__ import annotations

DEBUG_ENV = "EHRXDIFF_DEBUG"


class UserError(ValueError):
  """Bad input, bad config or a refused output (see the module docstring)."""


class UnknownKeyError(UserError, KeyError):
  """A config key that does not exist."""


USER_ERRORS = (UserError, FileNotFoundError, FileExistsError)


def message(e: BaseException) -> str:
  """The error's text on one line (KeyError's repr quotes dropped)."""
  text = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
  return " ".join(text.split())
