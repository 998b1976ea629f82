"""Errors a user can cause, each carrying the exit code the CLI returns for it."""


class NdonnxError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits 2."""

    exit_code = 2


class GoalNotMet(NdonnxError):
    """The job ran but its goal was not met (budget unreachable, gate failed): exit 1."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so that the same clean-up runs: exit 143 (128 + 15)."""

    exit_code = 143


# Distillation's dependencies: a light CI install (check, inspect --no-check, validate) leaves them out.
FULL_ONLY = ("torch", "onnx2torch", "safetensors", "matplotlib")
FULL_INSTALL_HINT = "install the full tool with its default dependencies (pip install without --no-deps)"


def missing_full_dependency(e: BaseException) -> str | None:
    """The distillation dependency whose absence raised `e` (a light install), or None."""
    name = getattr(e, "name", None) or ""
    root = name.split(".")[0]
    return root if isinstance(e, ImportError) and root in FULL_ONLY else None
