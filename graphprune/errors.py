"""Error types: every failure names what failed and where, and says what to do."""

from __future__ import annotations

__all__ = [
    "GraphPruneError",
    "TraceError",
    "PassError",
    "PreconditionError",
    "UnsupportedOpError",
    "VerificationError",
]


class GraphPruneError(Exception):
    """Base class of every error graphprune raises on purpose."""


class TraceError(GraphPruneError):
    """The model could not be turned into a graph."""


class PassError(GraphPruneError):
    """A pass failed; the message names the pass, the passes before it and the node."""


class PreconditionError(GraphPruneError):
    """A pass was run on a graph it cannot work on (e.g. a mask with no scores before it)."""


class UnsupportedOpError(GraphPruneError):
    """An op has no rule where one is required."""


class VerificationError(GraphPruneError):
    """A pass that must keep outputs unchanged changed them."""
