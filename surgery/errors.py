"""One exception hierarchy. Every message says what went wrong, where (file, tensor) and what to do.

The CLI prints ``str(error)`` as a single line and exits non-zero.
"""
from __future__ import annotations


class SurgeryError(Exception):
    """Base of every error surgery raises on purpose."""


class CheckpointError(SurgeryError):
    """A checkpoint cannot be opened or read: missing, corrupt, truncated, unsafe or unsupported."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        where = []
        if file:
            where.append(f"file {file}")
        if tensor:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.file = file
        self.tensor = tensor


class PickleRefusedError(CheckpointError):
    """A pickled checkpoint was found and --allow-pickle was not given."""


class IncompatibleInputsError(SurgeryError):
    """Inputs do not line up: names missing, shapes or kinds that differ. Lists every problem at once."""

    def __init__(self, problems: list[str], limit: int = 12):
        self.problems = list(problems)
        shown = "; ".join(self.problems[:limit])
        more = len(self.problems) - limit
        if more > 0:
            shown += f"; ... and {more} more"
        super().__init__(f"{len(self.problems)} incompatibilit{'y' if len(self.problems) == 1 else 'ies'} between inputs: {shown}")


class OutputError(SurgeryError):
    """The output path is unusable: it exists without --force, or it is one of the inputs."""


class ScoreError(SurgeryError):
    """A greedy-soup score command failed or printed no number."""


class PlanError(SurgeryError):
    """A plan refers to an unknown operation, bad parameters or a missing input."""


class PushError(SurgeryError):
    """A push cannot start (folder incomplete, no token, bad repo id) or stopped; rerunning resumes it."""

