"""Error types: every failure names what failed and where, and says what to do."""

from __future__ import annotations

__all__ = [
    "GraphPruneError",
    "ArgumentError",
    "InputError",
    "TraceError",
    "PassError",
    "PreconditionError",
    "UnsupportedOpError",
    "VerificationError",
    "CheckpointError",
    "GraphPruneWarning",
]


class GraphPruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class ArgumentError(GraphPruneError, ValueError, TypeError):
    """A bad argument: the message names it and says what to give instead.  Also a ValueError and a
    TypeError, so code that catches those for bad arguments keeps working."""


class InputError(ArgumentError):
    """The model cannot run on the inputs given (example inputs or calibration batches)."""


class TraceError(GraphPruneError):
    """The model could not be turned into a graph."""


class PassError(GraphPruneError):
    """A pass failed; the message names the pass, the passes before it and the node."""


class PreconditionError(GraphPruneError):
    """A pass was run on a graph it cannot work on (e.g. a mask with no scores before it)."""


class UnsupportedOpError(GraphPruneError):
    """An op has no rule where one is required."""


class VerificationError(GraphPruneError):
    """A pass that must keep outputs unchanged changed them, or the model no longer runs."""


class CheckpointError(GraphPruneError):
    """A saved model cannot be written or read back (damaged, foreign or mismatched files)."""


class GraphPruneWarning(UserWarning):
    """Something the user asked for had no effect, or less than asked (never silently)."""
