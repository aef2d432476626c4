"""TokenPrune: sequence (token) pruning inserted into the traced graph, layer by layer.

Channel pruning makes every token cheaper; token pruning removes the tokens that stop mattering
as they move through the layers (PoWER-BERT, Goyal et al. 2020; ToMe, Bolya et al. 2023).  The
pass finds the layers in the graph by their attention ops (scaled-dot-product attention,
`nn.MultiheadAttention`, a softmax feeding a matmul), not by class names; in a model without
attention, by its recurrent modules (`nn.LSTM`, `nn.GRU`, `nn.RNN`).

`schedule` follows the per-layer convention of sequence-pruning tools: one rate per layer, 0 =
no pruning there (or `{layer: rate}`).  A rate is the share of the tokens entering the
selection that it removes.  At an attention layer the selection sits where PoWER-BERT puts it,
after the attention sublayer's residual add, so the layer's feed-forward already runs on the
kept tokens; before a recurrent module, it selects the time steps the module reads.

Scores: "attention" (the attention a token receives from the real queries at that layer,
averaged over heads: PoWER-BERT's; the scheduled layers then compute their attention explicitly,
once, for the output and the score), "cls_attention" (the attention the first token pays it:
EViT's, one query row, the fused attention kernel stays), "norm" (the hidden state's L2 norm) or
a function of the hidden states (batch, tokens, features) -> (batch, tokens).  Padded positions (read from the layer's
attention mask) are dropped before any real token; the `keep` positions ("cls" = the first
token, "last", or indices from either end) are always kept; kept tokens stay in their order,
so a classifier reading the first token reads the same token.

mode="merge" is ToMe's bipartite soft matching: the removed tokens are averaged into their most
similar kept ones (similarity of the attention keys, else of the hidden states), sizes are
tracked, and every later scaled-dot-product attention adds log(size) to its logits
(proportional attention).

Every value that later layers read with a token dim (the attention mask, position tables, the
sequence length itself, sizes baked into reshapes) is gathered or rewritten with the tokens,
found by running the graph at two batch sizes.  The result computes on fewer tokens: what the
model returns per token is the kept tokens, in their original order.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphprune.arguments import choice
from graphprune.errors import ArgumentError, PassError, PreconditionError
from graphprune.ir.inputs import batch_of, eval_mode, positional_inputs, with_batch, with_shorter_sequences
from graphprune.ir.interpret import Interpreter
from graphprune.ir.tokens import (
    RATE_SCALE,
    SoftTokenMask,
    TokenScore,
    add_log_size,
    attention_with_received,
    dtype_of,
    eager_received,
    first_token_attention,
    gather_tokens,
    keep_count,
    key_metric,
    merge_tokens,
    merged_away,
    mha_size_mask,
    padding_score,
    proportional_mask,
    select_tokens,
    token_count,
    token_norm,
)
from graphprune.pipeline import PassBase, PassContext, PassResult

__all__ = ["TokenPrune", "TokenThreshold", "SOFT", "restore_fused_attention"]
SOFT = "graphprune_soft_token_mask"  # node meta of what TokenThreshold adds: the argument path standing for it

aten = torch.ops.aten
SCORES = ("attention", "cls_attention", "norm")
MODES = ("drop", "merge")
_SDPA = (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default, attention_with_received)
_SOFTMAX = (torch.softmax, F.softmax, aten.softmax.int, aten._softmax.default)
_MATMUL = (torch.matmul, operator.matmul, aten.matmul.default, torch.bmm, aten.bmm.default)
_ADD = (operator.add, torch.add, aten.add.Tensor)
_SHAPE_OPS = (
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
    torch.reshape,
)
_SHAPE_METHODS = ("view", "reshape", "expand")


@dataclass
class _Layer:
    kind: str  # "attention" or "recurrent"
    op: fx.Node  # the attention op or the recurrent module's call
    stream: fx.Node  # the hidden states the selection acts on
    after: fx.Node  # the selection goes right after this node
    q: fx.Node | None = None
    k: fx.Node | None = None
    scale: Any = None
    probs: fx.Node | None = None  # an eager attention's probabilities


class TokenPrune(PassBase):
    """Drop (or merge) tokens after the scheduled layers; see the module docstring."""

    plan_op = "token_prune"

    def __init__(
        self,
        schedule: list[float] | tuple[float, ...] | dict[int, float],
        *,
        score: str | Callable = "attention",
        keep: tuple | list = ("cls",),
        mode: str = "drop",
    ) -> None:
        if isinstance(schedule, dict):
            rates = dict(schedule)
        elif isinstance(schedule, (list, tuple)):
            rates = dict(enumerate(schedule))
        else:
            raise ArgumentError(
                f"TokenPrune schedule must be a list of per-layer rates or {{layer: rate}}, got {schedule!r}"
            )
        self.mode = choice(mode, "TokenPrune mode", MODES)
        top = 0.5 if self.mode == "merge" else 1.0
        for layer, rate in rates.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ArgumentError(f"TokenPrune schedule keys are layer indices >= 0, got {layer!r}")
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < top:
                raise ArgumentError(
                    f"TokenPrune rate of layer {layer} must be in [0, {top:g}) "
                    f"({'merging halves the tokens at most' if top < 1 else 'a share of the tokens removed'}), got {rate!r}"
                )
        self.schedule = schedule
        self.rates = {layer: float(r) for layer, r in sorted(rates.items()) if r > 0}
        if callable(score):
            if self.mode == "merge":
                raise ArgumentError(
                    "TokenPrune mode='merge' chooses tokens by key similarity; a score function is for mode='drop'"
                )
            self.score = score
        else:
            self.score = choice(score, "TokenPrune score", SCORES)
        self.keep = _keep_positions(keep)

    @classmethod
    def from_plan(cls, step: dict) -> TokenPrune:
        return cls(
            {int(k): v for k, v in step["schedule"].items()}, score=step["score"], keep=step["keep"], mode=step["mode"]
        )

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = _layers(gm)
        if not layers:
            raise PreconditionError(
                "TokenPrune found no layer to prune tokens at: no attention op (scaled_dot_product_attention, "
                "nn.MultiheadAttention, softmax then matmul) and no nn.LSTM/GRU/RNN in the graph"
            )
        beyond = [i for i in self.rates if i >= len(layers)]
        if beyond or (isinstance(self.schedule, (list, tuple)) and len(self.schedule) != len(layers)):
            raise ArgumentError(
                f"TokenPrune schedule names {len(self.schedule)} layer(s) ({sorted(beyond) or 'count'} beyond the "
                f"model's); the model has {len(layers)} {layers[0].kind} layer(s): give one rate per layer "
                "(0 = no pruning there) or {layer: rate}"
            )
        if not self.rates:
            ctx.record(note="every rate is 0: no token selection inserted")
            return PassResult(gm, False)
        if self.score in ("attention", "cls_attention") and any(layers[i].kind != "attention" for i in self.rates):
            raise ArgumentError(
                f'TokenPrune score="{self.score}" needs attention layers; use score="norm" for recurrent ones'
            )
        shapes = _probe(gm, ctx.example_inputs)
        first = layers[min(self.rates)].stream
        tokens = shapes[first][0][1] if isinstance(shapes.get(first, (None,))[0], tuple) else 0
        state = _State(shapes, _probe_shorter(gm, ctx.example_inputs, first, tokens))
        state.lengths_rewritten = state.shorter is not None  # it ran at another length: no length is baked in
        kept_per_layer = {}
        for i, rate in self.rates.items():
            kept_per_layer[i] = self._insert(gm, layers, i, round(rate * RATE_SCALE), state)
        gm.graph.lint()
        restore_fused_attention(gm)
        try:
            _probe(gm, ctx.example_inputs)
        except Exception as exc:
            raise PassError(f"the graph with tokens selected does not run ({type(exc).__name__}: {exc})") from exc
        tokens = " -> ".join(f"layer {i}: {t[0]}->{t[1]}" for i, t in kept_per_layer.items())
        details = {
            "tokens": {i: list(t) for i, t in kept_per_layer.items()},
            "note": f"tokens kept on the example inputs ({self.mode}, score {self._score_name()}): {tokens}",
        }
        if not callable(self.score):
            details["plan"] = {
                "op": self.plan_op,
                "schedule": {str(i): r for i, r in self.rates.items()},
                "score": self.score,
                "keep": list(self.keep),
                "mode": self.mode,
            }
        ctx.record(**details)
        return PassResult(gm, True)

    def _score_name(self) -> str:
        return getattr(self.score, "__name__", "custom") if callable(self.score) else self.score

    def _insert(self, gm: fx.GraphModule, layers: list[_Layer], i: int, rate: int, state: _State) -> tuple[int, int]:
        layer = layers[i]
        g = gm.graph
        stream_shape = state.shape(layer.stream)
        if stream_shape is None or len(stream_shape[0]) != 3 or stream_shape[0][0] == stream_shape[1][0]:
            raise PreconditionError(
                f"the hidden states at layer {i} ({layer.stream.name}) are not (batch, tokens, features) "
                f"with the batch first (shapes {stream_shape}); sequence-first layouts are not supported"
            )
        tokens, features = stream_shape[0][1], stream_shape[0][2]
        if tokens == features and state.shorter is None:
            raise PreconditionError(
                f"at layer {i} the sequence length equals the hidden width ({tokens}), so token dims "
                "cannot be told apart from feature dims (in other values, in reshapes); give example inputs of another "
                "length (the pruned model then runs at any length)"
            )
        state.tokens = state.tokens or tokens
        if tokens != state.tokens:
            raise PreconditionError(f"layer {i} sees {tokens} tokens, an earlier one {state.tokens}")
        new: list[fx.Node] = []
        score_by = "padding" if self.mode == "merge" else self.score  # (merging reads only the padding off it)
        _prepare_score(g, layer, score_by)
        order = {n: j for j, n in enumerate(g.nodes)}
        with g.inserting_before(layer.after.next):
            score = _score(gm, layer, i, score_by, new)
            if self.mode == "drop":
                idx = _call(g, new, select_tokens, score, rate, self.keep)
                stream = _call(g, new, gather_tokens, layer.stream, idx, (1,))
                size = dest = None
            else:
                metric = _call(g, new, key_metric, layer.k) if layer.k is not None else layer.stream
                merged = _call(g, new, merge_tokens, layer.stream, metric, state.size, score, rate, self.keep)
                stream, idx, size, dest = (_call(g, new, operator.getitem, merged, j) for j in range(4))
            length = _call(g, new, token_count, stream)
        state.shapes[length] = (tokens, tokens)  # (shapes are kept in the unpruned graph's terms)
        if state.shorter is not None:
            state.shorter[length] = tokens - 1
        replaced = {layer.stream: stream}
        if state.size is not None and size is not None:  # merged again (in drop mode: gathered below)
            replaced[state.size] = size
        if size is not None and state.size is None:
            _log_weights_into_attention(gm, layers[i + 1 :], size)
            state.shapes[size] = tuple((s[0], s[1]) for s in stream_shape)
            if state.shorter is not None:
                state.shorter[size] = (stream_shape[0][0], tokens - 1)
        after_cut = {n for n in g.nodes if order.get(n, math.inf) > order[layer.after]} - set(new)
        for node in [n for n in g.nodes if order.get(n, math.inf) <= order[layer.after]]:
            users = [u for u in node.users if u in after_cut]
            if not users:
                continue
            target = replaced.get(node)
            if target is None:
                target = _follow(g, node, idx, dest, length, state, new, after=new[-1], layer=i)
            if target is not None:
                for u in users:
                    u.replace_input_with(node, target)
        if state.lengths_rewritten is False:
            _rewrite_literals(after_cut, tokens, length)
            state.lengths_rewritten = True
        if size is not None:
            state.size = size
        before = state.current or tokens
        state.current = (
            keep_count(before, rate, len(self.keep))
            if self.mode == "drop"
            else before - merged_away(before, rate, len(self.keep))
        )
        return before, state.current


class TokenThreshold(PassBase):
    """LTP (learned token pruning, Kim et al. 2022): a learned threshold per layer instead of a rate.

    After each layer in `layers` (all of them by default) a `SoftTokenMask` scales every token's
    hidden state by sigmoid((s - threshold) / temperature), s the token's score normalised to mean
    1 over its sequence.  Train the result with the task loss plus `graphprune.TokenSparsity`
    (the thresholds rise where tokens can go), then `graphprune.harden_tokens(trained, calibration,
    example_inputs)` measures, per layer, the share of tokens below the learned threshold and
    returns the model with those rates as a `TokenPrune` schedule (the soft masks removed)."""

    def __init__(
        self,
        layers: list[int] | None = None,
        *,
        score: str | Callable = "attention",
        keep: tuple | list = ("cls",),
        temperature: float = 0.1,
        init: float = 0.0,
    ) -> None:
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not (number(temperature) and temperature > 0):
            raise ArgumentError(f"TokenThreshold temperature must be > 0, got {temperature!r}")
        if not number(init):
            raise ArgumentError(f"TokenThreshold init (the thresholds' start) must be a number, got {init!r}")
        if layers is not None and (
            isinstance(layers, (str, int))
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
        ):
            raise ArgumentError(f"TokenThreshold layers must be a list of layer indices >= 0, got {layers!r}")
        self.layers = None if layers is None else list(layers)
        self.score = score if callable(score) else choice(score, "TokenThreshold score", SCORES)
        self.keep, self.temperature, self.init = _keep_positions(keep), float(temperature), float(init)

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        layers = _layers(gm)
        chosen = list(range(len(layers))) if self.layers is None else self.layers
        if not layers or any(not 0 <= i < len(layers) for i in chosen):
            raise ArgumentError(
                f"TokenThreshold layers {chosen}: the model has {len(layers)} layer(s) to prune tokens at"
            )
        g = gm.graph
        existing = set(g.nodes)
        dtypes: dict[fx.Node, torch.dtype] = {}
        shapes = _probe(gm, ctx.example_inputs, dtypes)
        weights = [  # per-token weights read later (a pooling mask): they follow the soft masks too
            n
            for n, (a, b) in shapes.items()
            if isinstance(a, tuple) and len(a) == 2 and a[0] != b[0] and dtypes.get(n) != torch.bool
        ]
        tokens = shapes[layers[min(chosen)].stream][0][1]
        weights = [w for w in weights if shapes[w][0][1] == tokens]
        cum: fx.Node | None = None  # the product of the soft masks so far: a token removed stays removed
        cuts: list[tuple[int, fx.Node]] = []  # (first layer after the cut, the soft masks' product there)
        for i in sorted(set(chosen)):
            layer = layers[i]
            _prepare_score(g, layer, self.score)
            new: list[fx.Node] = []
            with g.inserting_before(layer.after.next):
                score = _score(gm, layer, i, self.score, new)
                name = f"graphprune_token_threshold_{i}"
                gm.add_submodule(name, SoftTokenMask(i, self.temperature, self.keep, self.init, self.score))
                both = g.call_module(name, (layer.stream, score))
                masked, soft = (_call(g, new, operator.getitem, both, j) for j in range(2))
                cum = soft if cum is None else _call(g, new, operator.mul, cum, soft)
            new.append(both)
            layer.stream.replace_all_uses_with(masked, delete_user_cb=lambda u: u not in new)
            cuts.append((i + 1, cum))
        for j, later in enumerate(layers):  # removed tokens leave the attention of later layers
            applies = [c for first, c in cuts if first <= j]
            if applies:
                _log_weights_into_attention(gm, [later], applies[-1])
        order = {n: k for k, n in enumerate(g.nodes)}
        for w in weights:
            for user in [u for u in w.users if u in shapes]:
                applies = [c for _, c in cuts if order[c] < order[user]]
                if applies:
                    with g.inserting_before(user):
                        weighted = g.call_function(operator.mul, (w, applies[-1]))
                        user.replace_input_with(w, weighted)
                    _drop_dtype_asserts(g, weighted)  # an integer mask times soft weights is a float now
        for n in [n for n in g.nodes if n not in existing]:  # what harden_tokens takes out again
            if n.op == "call_function" and n.target in (add_log_size, mha_size_mask, proportional_mask):
                n.meta[SOFT] = (0,)  # stands for its first argument (the mask or logits it adds to)
            elif n.op == "call_function" and n.target is operator.mul and n.args[0] in weights:
                n.meta[SOFT] = (0,)
            elif n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0:
                if n.args[0].op == "call_module" and isinstance(gm.get_submodule(n.args[0].target), SoftTokenMask):
                    n.meta[SOFT] = (0, 0)  # the soft mask's input
        gm.recompile()
        try:
            _probe(gm, ctx.example_inputs)
        except Exception as exc:
            raise PassError(f"the graph with soft token masks does not run ({exc})") from exc
        ctx.record(note=f"soft token masks with learnable thresholds after layers {chosen}: train, then harden")
        return PassResult(gm, True)


def _drop_dtype_asserts(g: fx.Graph, start: fx.Node) -> None:
    """torch.export's dtype assertions on values computed from `start` (checks, no results)."""
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        for u in list(n.users):
            if u.op == "call_function" and u.target is aten._assert_tensor_metadata.default:
                g.erase_node(u)
            elif u not in seen:
                seen.add(u)
                todo.append(u)


def _log_weights_into_attention(gm: fx.GraphModule, layers: list[_Layer], weight: fx.Node) -> None:
    """log(weight) of each key joins the attention logits of these layers: ToMe's proportional
    attention (weight = merged tokens' sizes), LTP's soft removal (weight = soft masks, 0 = gone)."""
    g = gm.graph
    for later in layers:
        op = later.op
        with g.inserting_before(op):
            if later.probs is not None:  # eager: softmax(logits + log size)
                op.update_arg(0, g.call_function(add_log_size, (op.args[0], weight)))
            elif op.op == "call_module":  # nn.MultiheadAttention: a per-sequence float attn_mask
                heads = gm.get_submodule(op.target).num_heads
                mask = g.call_function(mha_size_mask, (op.kwargs.get("attn_mask"), weight, heads, op.args[0]))
                op.update_kwarg("attn_mask", mask)
            else:
                dtype = g.call_function(dtype_of, (later.q,))
                mask = g.call_function(proportional_mask, (_mask_of(later), weight, dtype))
                if len(op.args) > 3:
                    op.update_arg(3, mask)
                else:
                    op.update_kwarg("attn_mask", mask)


def _follow(g, node, idx, dest, length, state, new, after, layer) -> fx.Node | None:
    """What replaces a value read after the cut: gathered along its token dims, the new length
    for the old one; None for a value without a token dim."""
    shape = state.shape(node)
    if shape is None:
        return None
    a, b = shape
    if isinstance(a, int):
        return length if state.is_token(node, a == b == state.tokens) else None
    dims = tuple(d for d in range(1, len(a)) if state.is_token(node, a[d] == b[d] == state.tokens, d))
    if not dims:
        return None
    if a[0] == b[0] and a[0] != 1:
        raise PreconditionError(
            f"{node.name}, read after layer {layer}, has a token dim but no batch dim first "
            f"(shape {tuple(a)}); only batch-first values can follow the kept tokens"
        )
    with g.inserting_after(after):
        gathered = _call(g, new, gather_tokens, node, idx, dims, dest)
    state.same_as(gathered, node)
    return gathered


@dataclass
class _State:
    shapes: dict  # node -> (shape or int on the example inputs, the same with one more sequence)
    shorter: dict | None = None  # node -> shape or int with sequences one token shorter (None: not run)
    tokens: int = 0  # the sequence length in the unpruned graph
    current: int = 0  # kept so far (for the record)
    size: fx.Node | None = None  # merged tokens' sizes
    lengths_rewritten: bool = False

    def shape(self, node):
        return self.shapes.get(node)

    def same_as(self, node: fx.Node, like: fx.Node) -> None:
        """A node added with the shapes of another (kept in the unpruned graph's terms)."""
        self.shapes[node] = self.shapes[like]
        if self.shorter is not None and like in self.shorter:
            self.shorter[node] = self.shorter[like]

    def is_token(self, node: fx.Node, by_size: bool, dim: int | None = None) -> bool:
        """Whether a value (dim `dim` of a tensor, or an int) is the token count: where the graph ran
        one token shorter, because it shrank by one; otherwise because its size equals it."""
        if self.shorter is None:
            return by_size
        short = self.shorter.get(node)
        if short is None:
            return False
        value = short if dim is None else short[dim]
        full = self.shapes[node][0] if dim is None else self.shapes[node][0][dim]
        return full == self.tokens and value == self.tokens - 1


def _call(g: fx.Graph, new: list, fn, *args) -> fx.Node:
    node = g.call_function(fn, tuple(args))
    new.append(node)
    return node


def _keep_positions(keep) -> tuple[int, ...]:
    names = {"cls": 0, "first": 0, "last": -1}
    if isinstance(keep, (str, int)):
        keep = (keep,)
    out = []
    for k in keep:
        if isinstance(k, str) and k in names:
            out.append(names[k])
        elif isinstance(k, int) and not isinstance(k, bool):
            out.append(k)
        else:
            raise ArgumentError(f"TokenPrune keep holds 'cls', 'first', 'last' or token indices, got {k!r}")
    out = sorted(set(out), key=lambda p: (p < 0, p))
    front = [p for p in out if p >= 0]
    back = [p for p in out if p < 0]
    if front != list(range(len(front))) or sorted(back) != list(range(-len(back), 0)):
        raise ArgumentError(
            f"TokenPrune keep {tuple(keep)}: kept positions must be leading (0, 1, ...) or trailing (-1, -2, ...) "
            "tokens, which stay where they are as other tokens go"
        )
    return tuple(out)


# -- finding the layers --------------------------------------------------------------


def _layers(gm: fx.GraphModule) -> list[_Layer]:
    nodes = list(gm.graph.nodes)
    found = []
    for n in nodes:
        if n.op == "call_function" and n.target in _SDPA:
            scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
            found.append(_Layer("attention", n, None, None, q=n.args[0], k=n.args[1], scale=scale))
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention):
            found.append(_Layer("attention", n, None, None))
        elif _is_eager_softmax(n):
            found.append(_Layer("attention", n, None, None, probs=n))
    if found:
        for layer in found:
            layer.after = _residual_add(nodes, layer.op)
            if layer.after is None:
                raise PreconditionError(
                    f"no residual add after the attention op {layer.op.name}; the token selection goes "
                    "after the attention sublayer's residual add"
                )
            layer.stream = layer.after
        return found
    for n in nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.RNNBase):
            x = n.args[0]
            if not gm.get_submodule(n.target).batch_first:
                raise PreconditionError(
                    f"{n.target} is not batch_first; sequence pruning before a recurrent module reads "
                    "(batch, time, features)"
                )
            found.append(_Layer("recurrent", n, x, n.prev))
    return found


def _prepare_score(g: fx.Graph, layer: _Layer, score: str | Callable) -> None:
    """Before the graph is cut: a scaled_dot_product_attention that will be scored returns its score
    too (the probabilities computed once, for the output and the score)."""
    sdpa = layer.kind == "attention" and layer.probs is None and layer.op.op == "call_function"
    if score == "attention" and sdpa and layer.op.target is not attention_with_received:
        layer.op = _with_received(g, layer.op)


def _score(gm: fx.GraphModule, layer: _Layer, i: int, score: str | Callable, new: list) -> fx.Node:
    """Nodes computing each token's score at a layer, (batch, tokens), -inf at padding."""
    g = gm.graph
    mask = _mask_of(layer)
    if callable(score):
        name = f"graphprune_token_score_{i}"
        gm.add_submodule(name, TokenScore(score))
        node = g.call_module(name, (layer.stream, mask))
        new.append(node)
        return node
    if score == "norm":
        return _call(g, new, token_norm, layer.stream, mask)
    if score == "padding":
        return _call(g, new, padding_score, layer.stream, mask)
    if score == "cls_attention":
        if layer.q is None:
            raise ArgumentError('score="cls_attention" reads the queries and keys of scaled_dot_product_attention')
        return _call(g, new, first_token_attention, layer.q, layer.k, mask, layer.scale)
    if layer.probs is not None:
        return _call(g, new, eager_received, layer.probs)
    if layer.op.op == "call_module":  # nn.MultiheadAttention: ask it for its weights
        layer.op.kwargs = {**layer.op.kwargs, "need_weights": True, "average_attn_weights": True}
        return _call(g, new, eager_received, _call(g, new, operator.getitem, layer.op, 1))
    return _call(g, new, operator.getitem, layer.op, 1)  # attention_with_received's score


def _with_received(g: fx.Graph, op: fx.Node) -> fx.Node:
    """Replace a scaled_dot_product_attention by attention_with_received (same arguments)."""
    with g.inserting_before(op):
        both = g.call_function(attention_with_received, op.args, dict(op.kwargs))
        out = g.call_function(operator.getitem, (both, 0))
    op.replace_all_uses_with(out)
    g.erase_node(op)
    return both


def restore_fused_attention(gm: fx.GraphModule) -> None:
    """attention_with_received whose score nobody reads is scaled_dot_product_attention again (the
    fused kernel; after a selection was hardened away or scheduled at rate 0)."""
    g = gm.graph
    for both in [n for n in g.nodes if n.op == "call_function" and n.target is attention_with_received]:
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in both.users):
            continue
        with g.inserting_before(both):
            fused = g.call_function(aten.scaled_dot_product_attention.default, both.args, dict(both.kwargs))
        for u in list(both.users):
            u.replace_all_uses_with(fused)
            g.erase_node(u)
        g.erase_node(both)
    gm.recompile()


def _mask_of(layer: _Layer) -> fx.Node | None:
    """The attention op's mask as the graph has it now (an earlier selection may have gathered it)."""
    op = layer.op
    if layer.kind != "attention" or layer.probs is not None:
        return None
    if op.op == "call_module":
        mask = op.kwargs.get("key_padding_mask")
    else:
        mask = op.args[3] if len(op.args) > 3 else op.kwargs.get("attn_mask")
    return mask if isinstance(mask, fx.Node) else None


def _is_eager_softmax(n: fx.Node) -> bool:
    is_softmax = (n.op == "call_function" and n.target in _SOFTMAX) or (n.op == "call_method" and n.target == "softmax")
    if not is_softmax:
        return False
    users = list(n.users)
    while len(users) == 1 and _is_dropout(users[0]):
        users = list(users[0].users)
    return any(
        u.op in ("call_function", "call_method") and (u.target in _MATMUL or u.target == "matmul") for u in users
    )


def _is_dropout(n: fx.Node) -> bool:
    if n.op == "call_module":
        return "drop" in str(n.target).lower()
    return n.op == "call_function" and n.target in (F.dropout, aten.dropout.default, torch.dropout)


def _residual_add(nodes: list[fx.Node], op: fx.Node) -> fx.Node | None:
    """The first addition after `op` of a value computed from it and one computed before it."""
    reached = {op}
    start = nodes.index(op)
    for n in nodes[start + 1 :]:
        inputs = n.all_input_nodes
        if not any(a in reached for a in inputs):
            continue
        reached.add(n)
        is_add = (n.op == "call_function" and n.target in _ADD) or (n.op == "call_method" and n.target == "add")
        if is_add and len(inputs) == 2 and sum(a in reached for a in inputs) == 1:
            return n
    return None


def _rewrite_literals(nodes: set[fx.Node], tokens: int, length: fx.Node) -> None:
    """Shape arguments that hold the old sequence length as a number (static exports) read the new one."""
    for n in nodes:
        shape_op = (n.op == "call_function" and n.target in _SHAPE_OPS) or (
            n.op == "call_method" and n.target in _SHAPE_METHODS
        )
        if not shape_op:
            continue
        args = list(n.args)
        for j, a in enumerate(args):
            if isinstance(a, (list, tuple)) and any(type(v) is int and v == tokens for v in a):
                args[j] = type(a)(length if (type(v) is int and v == tokens) else v for v in a)
            elif j > 0 and type(a) is int and a == tokens and n.op == "call_method":
                args[j] = length
        n.args = tuple(args)


# -- shapes at two batch sizes ---------------------------------------------------------


class _Recorder(Interpreter):
    def __init__(self, gm: fx.GraphModule, dtypes: dict | None = None) -> None:
        super().__init__(gm)
        self.seen: dict[fx.Node, Any] = {}
        self.dtypes = {} if dtypes is None else dtypes

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.seen[n] = tuple(out.shape)
            self.dtypes[n] = out.dtype
        elif isinstance(out, (int, torch.SymInt)) and not isinstance(out, bool):
            self.seen[n] = int(out)
        return out


def _probe_shorter(gm: fx.GraphModule, example_inputs, stream: fx.Node, tokens: int) -> dict[fx.Node, Any] | None:
    """Every node's shape (or int value) with the sequences (dim 1 of the batched inputs of two or
    more dims) one token shorter; None where the graph does not run so, or its hidden states then
    do not lose that token (images, a fixed length)."""
    rec = _Recorder(gm)
    try:
        with eval_mode(gm), torch.no_grad():
            rec.run(*positional_inputs(gm, with_shorter_sequences(example_inputs, 1)))
    except Exception:
        return None
    seen = rec.seen.get(stream)
    return rec.seen if isinstance(seen, tuple) and len(seen) == 3 and seen[1] == tokens - 1 else None


def _probe(gm: fx.GraphModule, example_inputs, dtypes: dict | None = None) -> dict[fx.Node, tuple]:
    """Every node's shape (or int value) on the example inputs and on one more sequence per batch
    (and the tensors' dtypes into `dtypes`)."""
    batch = batch_of(example_inputs)
    if batch is None:
        raise PreconditionError("TokenPrune needs batched example inputs (batch, tokens, ...)")
    runs = []
    for inputs in (example_inputs, with_batch(example_inputs, batch + 1)):
        rec = _Recorder(gm, dtypes)
        with eval_mode(gm), torch.no_grad():
            rec.run(*positional_inputs(gm, inputs))
        runs.append(rec.seen)
    return {n: (runs[0][n], runs[1][n]) for n in runs[0] if n in runs[1]}
