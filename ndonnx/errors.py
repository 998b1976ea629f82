"""Errors a user can cause, each carrying the exit code the CLI returns for it."""


class NdonnxError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits 2."""

    exit_code = 2


class GoalNotMet(NdonnxError):
    """The job ran but its goal was not met (budget unreachable, gate failed): exit 1."""

    exit_code = 1
