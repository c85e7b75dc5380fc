"""The one exception type a user can cause.

Anything raised as `Mamba2Error` ends in a one-line message and exit code 1 in the CLI;
any other exception is a bug.
"""


class Mamba2Error(Exception):
    """An error the user can fix: a bad path, a corrupt file, an unsupported checkpoint."""
