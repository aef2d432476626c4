"""graphprune: prune PyTorch models like a compiler optimises programs.

import graphprune as gp
from graphprune.passes import L2Score, ChannelMask, Shrink
pruned = gp.compile(model, [L2Score(), ChannelMask(0.5), Shrink()], example_inputs=(x,))
print(gp.summary(model, pruned, (x,)))
"""

from graphprune import rules as _rules  # noqa: F401  (registers the built-in per-op rules)
from graphprune.analysis import (
    ChannelGroup,
    Dependencies,
    FrozenChannels,
    Slot,
    analyze_dependencies,
    count_macs,
    count_params,
)
from graphprune.backends import latency as _latency  # noqa: F401  (registers the onnxruntime latency meter)
from graphprune.compile import analyze, compile
from graphprune.errors import (
    ArgumentError,
    CheckpointError,
    GraphPruneError,
    GraphPruneWarning,
    InputError,
    PassError,
    PreconditionError,
    TraceError,
    UnsupportedOpError,
    VerificationError,
)
from graphprune.eval import perplexity
from graphprune.finetune import finetune
from graphprune.hf import as_hf_model
from graphprune.ir.trace import trace
from graphprune.pipeline import PassBase, PassContext, PassResult, Pipeline
from graphprune.recipe import apply_recipe, recipe, recipe_calibration, recipe_pruner
from graphprune.regularize import BNScaleL1, GroupLasso, GrowingReg, TokenSparsity, harden_tokens, token_rates
from graphprune.rules import ChannelwiseRule, OpCall, Rule, register_rule
from graphprune.saving import apply_plan, load, save
from graphprune.schedule import Pruner, sparsity_at
from graphprune.search import RatioSearch, search_ratios
from graphprune.sensitivity import Sensitivity, sensitivity
from graphprune.summary import Summary, summary
from graphprune.vocab import prune_vocabulary

__version__ = "0.1.0"

__all__ = [
    "compile",
    "analyze",
    "summary",
    "Summary",
    "trace",
    "save",
    "load",
    "apply_plan",
    "prune_vocabulary",
    "as_hf_model",
    "analyze_dependencies",
    "count_macs",
    "count_params",
    "ChannelGroup",
    "Dependencies",
    "FrozenChannels",
    "Slot",
    "PassBase",
    "PassContext",
    "PassResult",
    "Pipeline",
    "Rule",
    "OpCall",
    "ChannelwiseRule",
    "register_rule",
    "Pruner",
    "sparsity_at",
    "sensitivity",
    "search_ratios",
    "RatioSearch",
    "recipe",
    "apply_recipe",
    "recipe_calibration",
    "recipe_pruner",
    "finetune",
    "perplexity",
    "GroupLasso",
    "GrowingReg",
    "TokenSparsity",
    "token_rates",
    "harden_tokens",
    "BNScaleL1",
    "Sensitivity",
    "GraphPruneError",
    "ArgumentError",
    "InputError",
    "CheckpointError",
    "GraphPruneWarning",
    "TraceError",
    "PassError",
    "PreconditionError",
    "UnsupportedOpError",
    "VerificationError",
]
