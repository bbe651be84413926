"""Taps: a module for an activation quantizer where no module holds the tensor.

An activation quantizer is a hook on a module's input or output
(``core/act_quant.py``). Some tensors an integer runtime holds are neither:
the output of a residual add that a LayerNorm and the next add both read
(ViT's blocks), or the inputs of an attention matmul. For those, the
innermost module that computes the tensor and all its readers (its *owner*,
called once per forward) gets its ``forward`` rewritten from its own
``torch.fx`` trace, with a :class:`Tap` (an identity module) after the
tensor's op; the quantizer hooks on the tap's output (``docs/method.md``,
"where the activations are quantized").

The rewrite keeps the module's class, parameters and state-dict keys (a tap
holds nothing but its quantizer); every child stays a call of that child, so
the children's own hooks and rewrites run as before. It is refused (the tensor
stays in float) where the forward's trace depends on the training flag
(``if self.training``), since fx would fix one branch.

SiLU is split into ``x · σ(x)`` with σ a module (:class:`SplitSiLU`), so that
ONNX Runtime's ``QLinearSigmoid`` and ``QLinearMul`` can run EfficientNet's
activations and squeeze-excitation gates on integers.

``scaled_dot_product_attention`` is decomposed first in the owner
(:func:`prepare`): ``softmax(q·s @ kᵀ) @ v``, so that its two matmuls can run
on integer kernels; only where it has no mask, no dropout and is not causal.

A tap is named after its node in the owner's trace (``codeq_tap_<node>``):
:func:`tap_` called with those names on a freshly built model (a checkpoint's
``activations`` entries) rebuilds the same forward, so the names are the
record, as for any other quantizer.
"""

from __future__ import annotations

import copy
import inspect
import logging
import operator
import types

import torch
from torch import nn

log = logging.getLogger(__name__)

PREFIX = "codeq_tap_"
_GRAPH = "_codeq_graph"  # the graph of a rewritten forward (fx traces the class's forward, not the instance's)
_SDPA = {torch.nn.functional.scaled_dot_product_attention}


class Tap(nn.Module):
    """An identity: the module an activation quantizer hooks on (its output)."""

    def forward(self, x):
        return x


class SplitSiLU(nn.Module):
    """SiLU as ``x · σ(x)`` with σ a child module, so that σ's output can hold a quantizer (``QLinearSigmoid``)."""

    def __init__(self):
        super().__init__()
        self.codeq_sigmoid = nn.Sigmoid()

    def forward(self, x):
        return x * self.codeq_sigmoid(x)


def split_silu_(model: nn.Module) -> int:
    """Replace every ``nn.SiLU`` child by :class:`SplitSiLU` (same function, no parameters); returns how many."""
    n = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.SiLU:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, SplitSiLU())
            n += 1
    return n


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's own forward: every submodule is a call of it (its hooks and rewrites run)."""

    def __init__(self, root: nn.Module):
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is not self._root


def defaults(module: nn.Module) -> dict:
    """The arguments of ``module``'s (class) forward that have defaults (the model itself is called with none)."""
    return fixed_arguments(module, (), {})


def fixed_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The defaulted arguments of one call of ``module`` that are not tensors of the trace: name → value.

    A trace takes these as given (an attention mask left at None, say); an
    argument that receives a traced tensor (``torch.fx.Proxy``) stays an input.
    """
    signature = inspect.signature(type(module).forward)
    try:
        bound = signature.bind(module, *args, **kwargs).arguments
    except TypeError:
        bound = {}
    out = {}
    for p in list(signature.parameters.values())[1:]:
        if p.default is inspect.Parameter.empty or p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        value = bound.get(p.name, p.default)
        if not _traced(value):
            out[p.name] = value
    return out


def _traced(value) -> bool:
    if isinstance(value, torch.fx.Proxy):
        return True
    if isinstance(value, (tuple, list)):
        return any(_traced(v) for v in value)
    if isinstance(value, dict):
        return any(_traced(v) for v in value.values())
    return False


def trace(owner: nn.Module, fixed: dict) -> torch.fx.Graph | None:
    """``owner``'s forward as a graph of its own ops and child calls, ``fixed`` arguments given.

    None when it does not trace or depends on the training flag.
    """
    if _GRAPH in owner.__dict__:  # rewritten before (attention decomposed): go on from that graph
        return copy.deepcopy(owner.__dict__[_GRAPH])
    concrete = dict(fixed)
    was = owner.training
    codes, graphs = [], []
    try:
        for mode in (True, False):
            owner.train(mode)
            g = _ChildrenAsLeaves(owner).trace(owner, concrete_args=concrete)
            graphs.append(g)
            codes.append(g.python_code("self").src)
    except Exception as exc:  # data-dependent control flow, unsupported ops
        log.info("activation taps: %s does not trace with torch.fx (%s); left in float", type(owner).__name__,
                 type(exc).__name__)
        return None
    finally:
        owner.train(was)
    if codes[0] != codes[1]:
        log.info("activation taps: %s's forward differs between training and evaluation; left in float",
                 type(owner).__name__)
        return None
    return graphs[0]


def _bind(owner: nn.Module, graph: torch.fx.Graph, fixed: dict) -> None:
    """Make ``graph`` ``owner``'s forward (an instance attribute; the class is untouched).

    The graph was traced with the ``fixed`` arguments given; the new forward
    takes the class's signature and refuses other values for them (an
    attention mask where the trace saw none, say), which the rewrite did not see.
    """
    graph.lint()
    gm = torch.fx.GraphModule(owner, graph, class_name=type(owner).__name__)
    for node in graph.nodes:  # constants the trace created live on the GraphModule: hand them to the owner
        if node.op == "get_attr" and not _has(owner, node.target):
            owner.register_buffer(node.target, getattr(gm, node.target), persistent=False)
    generated = type(gm).forward
    signature = inspect.signature(type(owner).forward)
    params = list(signature.parameters.values())[1:]
    free = [p.name for p in params if p.name not in fixed]
    # the common call (the free arguments by position, every fixed one left at the default the trace saw)
    # needs no binding: the free parameters lead, and each fixed value is its parameter's default
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    plain = (all(p.kind in positional for p in params[:len(free)]) and [p.name for p in params[:len(free)]] == free
             and all(_same(signature.parameters[k].default, d) for k, d in fixed.items()))

    def forward(self, *args, **kwargs):
        if plain and not kwargs and len(args) == len(free):
            return generated(self, *args)
        bound = signature.bind(self, *args, **kwargs)
        for k, d in fixed.items():
            v = bound.arguments.get(k, signature.parameters[k].default)
            if not _same(v, d):
                raise ValueError(f"{type(self).__name__} was rewritten for activation quantizers with {k}={d!r}; "
                                 f"it cannot take {k}={v!r}")
        return generated(self, *(bound.arguments[k] for k in free))

    owner.forward = types.MethodType(forward, owner)
    owner.__dict__[_GRAPH] = graph


def _same(v, d) -> bool:
    """Whether argument value ``v`` is the ``d`` a trace was made with (the object itself, or an equal plain value)."""
    return v is d or (type(v) in (bool, int, float, str) and v == d)


def _has(owner: nn.Module, target: str) -> bool:
    try:
        operator.attrgetter(target)(owner)
        return True
    except AttributeError:
        return False


def _sdpa_options(node: torch.fx.Node) -> dict:
    """``scaled_dot_product_attention``'s arguments after q, k, v, by name."""
    return dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), node.args[3:]), **node.kwargs)


def _decomposable(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _SDPA or len(node.args) < 3:
        return False
    kw = _sdpa_options(node)
    scale = kw.get("scale")
    return (kw.get("attn_mask") is None and not kw.get("dropout_p") and not kw.get("is_causal")
            and not kw.get("enable_gqa") and (scale is None or isinstance(scale, (int, float))))


def _decompose(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Replace ``scaled_dot_product_attention(q, k, v)`` by ``softmax((q·s) @ kᵀ, -1) @ v``, s = 1/√d by default."""
    q, k, v = node.args[:3]
    with graph.inserting_before(node):
        scale = _sdpa_options(node).get("scale")
        if scale is None:
            d = graph.call_method("size", (q, -1))
            scale = graph.call_function(operator.pow, (d, -0.5))
        qs = graph.call_function(operator.mul, (q, scale))
        kt = graph.call_method("transpose", (k, -2, -1))
        att = graph.call_function(operator.matmul, (qs, kt))
        prob = graph.call_method("softmax", (att, -1))
        out = graph.call_function(operator.matmul, (prob, v))
    node.replace_all_uses_with(out)
    graph.erase_node(node)


def prepare(model: nn.Module, calls: dict[str, dict], owners: set[str] | None = None) -> list[str]:
    """Decompose ``scaled_dot_product_attention`` in every module (or those of ``owners``) that calls it.

    ``calls``: each module's fixed arguments (:func:`fixed_arguments` of its
    one call in the model's trace); a module not in it is not rewritten.
    Returns the modules rewritten. Only attention without mask, dropout or
    causal flag, in a forward that does not depend on the training flag.
    """
    done = []
    for name, module in model.named_modules():
        if owners is not None and name not in owners:
            continue
        if name not in calls or not _calls_sdpa(module):
            continue
        graph = trace(module, calls[name])
        if graph is None:
            continue
        nodes = [n for n in graph.nodes if _decomposable(n)]
        if not nodes:
            continue
        for n in nodes:
            _decompose(graph, n)
        _bind(module, graph, calls[name])
        done.append(name)
    return done


def restore(owner: nn.Module) -> None:
    """Undo a rewrite: ``owner`` runs its class's forward again (its taps, if any, no longer run)."""
    if owner.__dict__.pop(_GRAPH, None) is not None:
        owner.__dict__.pop("forward", None)


def _calls_sdpa(module: nn.Module) -> bool:
    """Whether the source of ``module``'s forward names scaled_dot_product_attention (a cheap filter)."""
    try:
        return "scaled_dot_product_attention" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


OPS = ("call_function", "call_method", "call_module")


def ops(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The owner's own ops and child calls, in order: what a tap's node is matched against."""
    return [n for n in graph.nodes if n.op in OPS]


def tap_(owner: nn.Module, nodes: list[str], fixed: dict, graph: torch.fx.Graph | None = None) -> list[str]:
    """Put a :class:`Tap` after each named node of ``owner``'s own trace; returns the taps' child names.

    ``graph``: that trace, when the caller has it already (:func:`trace`).
    Raises ``ValueError`` when a node is not in the trace (a model that is
    not the one the names were taken from).
    """
    graph = trace(owner, fixed) if graph is None else graph
    if graph is None:
        raise ValueError(f"{type(owner).__name__}'s forward cannot be rewritten (it depends on the training flag)")
    by_name = {n.name: n for n in ops(graph)}
    missing = [n for n in nodes if n not in by_name]
    if missing:
        raise ValueError(f"{type(owner).__name__} has no op {', '.join(missing)} to quantize (a different model "
                         f"or library version?)")
    names = []
    for name in dict.fromkeys(nodes):
        node = by_name[name]
        child = PREFIX + name
        if not hasattr(owner, child):
            owner.add_module(child, Tap())
        with graph.inserting_after(node):
            tap = graph.call_module(child, (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda u, t=tap: u is not t)
        names.append(child)
    _bind(owner, graph, fixed)
    return names

