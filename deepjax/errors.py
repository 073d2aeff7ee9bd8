"""Errors a user can fix, each raised where it is found with the field, file, line or step named.

The CLI prints the message of a `UserError` on one line and exits with status 2; anything else is a bug and keeps
its traceback. Subclasses name what is wrong; they also derive from the builtin type older callers caught.
"""


class UserError(Exception):
    """Something the user can fix: the message alone says what and where."""


class ConfigError(UserError, ValueError):
    """A config field has an invalid value; the message names the field and the value."""


class DataError(UserError, ValueError):
    """A data file or record cannot be used; the message names the file (and line or record)."""


class TokenizerError(UserError, ValueError):
    """A tokenizer file cannot be used; the message names the file."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used; the message names the step and the file (or tensor)."""


class MeshError(UserError, ValueError):
    """The mesh does not fit the devices or the batch; the message names the mesh field."""


class NonFiniteError(UserError, RuntimeError):
    """Training produced too many non-finite steps in a row; the message names the step."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file named by data.path does not exist (still a FileNotFoundError for older callers)."""


class TokenizerFileNotFoundError(TokenizerError, FileNotFoundError):
    """The tokenizer file named by data.tokenizer (or --tokenizer) does not exist."""


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (a multi-line message, e.g. one with a hint, joined with spaces)."""
    return " ".join(s.strip() for s in str(e).splitlines() if s.strip()) or type(e).__name__
