"""User-facing errors and the exit codes the CLI maps them to.

Anything a user can cause (a typo, missing data, a bad config) raises a subclass of
`FsbenchError`; the CLI prints its message on one line and exits with its `exit_code`.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FsbenchError(Exception):
    """A mistake in the user's input or environment, reported as one line."""

    exit_code = 2


class ConfigError(FsbenchError):
    """Bad bench.toml, bad --set override, or an invalid option value."""

    exit_code = 2


class UnknownNameError(FsbenchError):
    """An unknown method, dataset or backbone name."""

    exit_code = 2


class DataError(FsbenchError):
    """Missing or malformed dataset files."""

    exit_code = 3


class WeightsError(FsbenchError):
    """Model weights could not be fetched or loaded."""

    exit_code = 4


class RunFailed(FsbenchError):
    """A run started but could not finish (NaN loss, out of memory, ...)."""

    exit_code = 5
