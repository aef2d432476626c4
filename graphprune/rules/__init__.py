"""Per-op channel rules, one registry (importing this package registers the built-in rules)."""

from graphprune.rules import aten, channelwise, conv, interface, mha, pointwise, reduce, shape  # noqa: F401  (registration)
from graphprune.rules.base import OpCall, ParamRef, Rule, find_rule, register_rule
from graphprune.rules.channelwise import ChannelwiseRule

__all__ = ["Rule", "OpCall", "ParamRef", "register_rule", "find_rule", "ChannelwiseRule"]
