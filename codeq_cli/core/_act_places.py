"""Where the activation quantizers go: the tensors a deployed integer graph holds in 8 bits.

An integer runtime (ONNX Runtime's QDQ fusion, TensorRT, OpenVINO) runs an
operator on integer kernels only when all its inputs *and* its output are
quantized tensors. So, beyond the input of every quantized convolution and
linear layer, codeq quantizes (``docs/method.md``, "where the activations are
quantized"):

* the **output of every convolution**, after what the runtime folds into it
  (batch norm, ReLU/ReLU6, identity, dropout): QLinearConv writes 8 bits;
* both **inputs of every residual add** (the block's branch and its shortcut)
  and the **add's output** (after a following ReLU): QLinearAdd;
* both inputs of every **matmul of two activations** (attention; written out
  from ``scaled_dot_product_attention`` by ``core/_taps.py``): MatMulIntegerToFloat;
* both inputs and the output of every **product with a sigmoid** (SiLU, split
  into ``x · σ(x)``, and squeeze-excitation gates): QLinearSigmoid, QLinearMul;
* nothing after value-preserving ops (max-pool, reshape, flatten, permute,
  identity): a quantized tensor stays on its grid through them, and the
  runtime moves the quantization across them (so the stem is quantized
  *before* its max-pool).

Each tensor gets **one** quantizer, shared by all its consumers. The places are
found on the ``torch.fx`` symbolic trace of the model (any architecture whose
forward traces: timm and torchvision ResNets, MobileNets, EfficientNets,
ConvNeXt, ViT), not from a per-architecture list. A quantizer is put on a
*module*: on the input of the one module that reads the tensor (the quantized
layer, as before), else on the output of a module that returns it, else on the
input of a module that holds all its readers, else on a *tap* in the rewritten
forward of the module that computes it (``core/_taps.py``). A module called more
than once carries none. A model that does not trace keeps one quantizer per layer
input (the module-structure fallback).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
from torch import nn

from codeq_cli.core import _taps
from codeq_cli.core.layers import CONV as _CONV

log = logging.getLogger(__name__)

INPUT, OUTPUT = "input", "output"

# Ops the runtime folds into the producing conv/add before its output is quantized.
_ABSORB_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout)
_ABSORB_FUNCS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.dropout,
                 torch.nn.functional.batch_norm, torch.batch_norm}
_ABSORB_METHODS = {"relu", "relu_"}
# Ops that keep a quantized tensor on its grid (the runtime moves Q/DQ across them).
_KEEP_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity, nn.Dropout)
_KEEP_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
               torch.nn.functional.max_pool2d, torch.nn.functional.dropout}
_KEEP_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm"}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}


@dataclass(frozen=True)
class Place:
    """One activation quantizer: on the ``at`` (input or output) of module ``module``.

    ``feeds``: the quantized layers whose input it is (for the BOPs and the
    learned widths); empty for a tensor only an add or a non-layer op reads.
    """

    module: str
    at: str
    feeds: tuple[str, ...]


def per_layer(layer_names: list[str]) -> list[Place]:
    """The fallback: one quantizer on each layer's input."""
    return [Place(n, INPUT, (n,)) for n in layer_names]


class _Tracer(torch.fx.Tracer):
    """fx's tracer that also records, for every module call (leaf or not), its first input and its output node."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}
        self.returns: dict[torch.fx.Node, list[str]] = {}  # node -> modules returning it (innermost first)
        self.takes: dict[str, torch.fx.Node] = {}  # module -> its first input
        self.fixed: dict[str, dict] = {"": {}}  # module -> its first call's arguments that are not traced tensors

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # A batch norm fused with its activation (timm's BatchNormAct2d) is traced through, so that
        # the place between the norm and a SiLU or hard-swish (which no conv kernel absorbs) shows.
        if isinstance(m, (*_CONV, nn.Linear)) or type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.calls[name] = self.calls.get(name, 0) + 1
        if args and isinstance(args[0], torch.fx.Proxy):
            self.takes.setdefault(name, args[0].node)
        if name not in self.fixed:
            self.fixed[name] = _taps.fixed_arguments(m, args, kwargs)
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, torch.fx.Proxy):
            self.returns.setdefault(out.node, []).append(name)
        return out


def _trace(model: nn.Module):
    tracer = _Tracer()
    tracer.fixed[""] = _taps.defaults(model)  # the model is called with its input alone
    graph = tracer.trace(model, concrete_args=tracer.fixed[""])
    return tracer, graph


def calls(model: nn.Module) -> dict[str, dict]:
    """Each module's fixed arguments in ``model``'s trace (what :mod:`_taps` rewrites with); ValueError if it does not trace."""
    try:
        tracer, _ = _trace(model)
    except Exception as exc:
        raise ValueError(f"{type(model).__name__} does not trace with torch.fx ({type(exc).__name__})") from None
    return tracer.fixed


def _is(node, modules: tuple, funcs: set, methods: set, owner: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(owner.get_submodule(node.target), modules)
    if node.op == "call_function":
        return node.target in funcs
    if node.op == "call_method":
        return node.target in methods
    return False


def _shape_query(node) -> bool:
    """``x.ndim``, ``x.shape``, ``x.size()``: reads no values."""
    return (node.op == "call_function" and node.target is getattr) or (node.op == "call_method" and node.target in ("size", "dim"))


def _is_activation(node, memo: dict) -> bool:
    """Whether ``node`` depends on the model's input (not only on parameters and constants)."""
    if node in memo:
        return memo[node]
    if node.op == "placeholder":
        memo[node] = True
    elif node.op in ("get_attr", "output"):
        memo[node] = False
    else:
        memo[node] = any(_is_activation(a, memo) for a in node.all_input_nodes)
    return memo[node]


def find(model: nn.Module, layer_names: list[str]) -> list[Place]:
    """The places of ``model``'s activation quantizers, given its quantized conv/linear ``layer_names``.

    Falls back to :func:`per_layer` when the model does not trace (logged).
    """
    _taps.split_silu_(model)
    try:
        tracer, graph = _trace(model)
        decomposed = _taps.prepare(model, tracer.fixed)
        if decomposed:  # trace again through the written-out attention
            tracer, graph = _trace(model)
    except Exception as exc:  # data-dependent control flow, unsupported ops
        for module in model.modules():  # undo any attention written out before the failure
            _taps.restore(module)
        log.info("activation quantizers: %s does not trace with torch.fx (%s); one per layer input",
                 type(model).__name__, type(exc).__name__)
        return per_layer(layer_names)
    layers = set(layer_names)
    memo: dict = {}
    nodes = list(graph.nodes)
    users = {n: [u for u in n.users if not _shape_query(u)] for n in nodes}

    def absorb(n):
        return _is(n, _ABSORB_MODULES, _ABSORB_FUNCS, _ABSORB_METHODS, model)

    def keeps(n):
        return _is(n, _KEEP_MODULES, _KEEP_FUNCS, _KEEP_METHODS, model)

    def forward_end(n):  # follow single-reader ops the runtime folds into n's kernel
        while len(users[n]) == 1 and absorb(users[n][0]) and users[n][0].op != "output":
            n = users[n][0]
        return n

    def is_layer(n):
        return n.op == "call_module" and n.target in layers

    def of_two_activations(n, funcs, methods):
        if n.op == "call_function" and n.target in funcs or n.op == "call_method" and n.target in methods:
            acts = [a for a in n.args[:2] if isinstance(a, torch.fx.Node) and _is_activation(a, memo)]
            return len(acts) == 2
        return False

    def is_add(n):
        return of_two_activations(n, _ADD_FUNCS, _ADD_METHODS)

    def sigmoid(n):
        return isinstance(n, torch.fx.Node) and _is(n, (nn.Sigmoid,), {torch.sigmoid}, {"sigmoid"}, model)

    marked: dict[torch.fx.Node, None] = {}  # ordered set
    is_output = {a for n in nodes if n.op == "output" for a in n.all_input_nodes}
    outs_needed, ins_needed = [], []
    for n in nodes:
        if is_layer(n) and isinstance(model.get_submodule(n.target), _CONV):
            outs_needed.append(n)
            ins_needed.append(n.args[0])
        elif is_layer(n):
            ins_needed.append(n.args[0])
        elif is_add(n):
            outs_needed.append(n)
            ins_needed.extend(n.args[:2])
        elif of_two_activations(n, _MATMUL_FUNCS, _MATMUL_METHODS):  # attention: MatMulIntegerToFloat
            ins_needed.extend(n.args[:2])
        elif of_two_activations(n, _MUL_FUNCS, _MUL_METHODS) and any(sigmoid(a) for a in n.args[:2]):
            outs_needed.append(n)  # x · σ(·): SiLU and squeeze-excitation gates, QLinearSigmoid and QLinearMul
            ins_needed.extend(n.args[:2])
    for n in outs_needed:
        end = forward_end(n)
        if end not in is_output:
            marked[end] = None

    def covered(t):  # t is on a quantized grid already: marked, or a value-preserving op of a covered tensor
        seen = t
        while seen not in marked and keeps(seen) and seen.all_input_nodes:
            seen = seen.args[0] if isinstance(seen.args[0], torch.fx.Node) else seen.all_input_nodes[0]
        return seen in marked

    for t in ins_needed:
        if isinstance(t, torch.fx.Node) and not covered(t):
            marked[t] = None

    # Each marked tensor: which quantized layers read it (directly or through value-preserving ops).
    def readers(t):
        out, stack = [], [t]
        while stack:
            for u in users[stack.pop()]:
                if is_layer(u):
                    out.append(u.target)
                elif keeps(u) and u not in marked:
                    stack.append(u)
        return tuple(dict.fromkeys(out))

    used: set[str] = set()
    places = []
    untapped: dict[str, list[tuple[torch.fx.Node, tuple[str, ...]]]] = {}  # owner -> tensors no module holds
    for t in marked:
        feeds = readers(t)
        place = _choose(t, users[t], tracer, used, layers)
        if place is None:
            owner = _owner(t, users[t], tracer)
            if owner is None:
                log.info("activation quantizers: no module holds the tensor %s alone; left in float", t.name)
            else:
                untapped.setdefault(owner, []).append((t, feeds))
            continue
        used.add(place[0])
        places.append(Place(place[0], place[1], feeds))
    for owner, tensors in untapped.items():
        places.extend(_tapped(model, owner, tensors, nodes, tracer.fixed.get(owner, {})))
    for owner in decomposed:  # attention decomposed for taps that did not come: the library's kernel again
        if not any(p.module.startswith(f"{owner}.{_taps.PREFIX}" if owner else _taps.PREFIX) for p in places):
            _taps.restore(model.get_submodule(owner))
    # Every quantized layer must have its input quantized somewhere: add the ones the trace missed.
    fed = {f for p in places for f in p.feeds}
    for name in layer_names:
        if name not in fed and name not in used:
            places.append(Place(name, INPUT, (name,)))
            used.add(name)
    return places


def _choose(t, readers, tracer: _Tracer, used: set[str], layers: set[str]) -> tuple[str, str] | None:
    once = {m for m, k in tracer.calls.items() if k == 1} - used
    # The one module that reads it (the layer, or the activation after a conv): its input.
    if len(readers) == 1 and readers[0].op == "call_module" and readers[0].target in once:
        return readers[0].target, INPUT
    for m in tracer.returns.get(t, ()):
        if m in once and m:
            return m, OUTPUT
    # A module whose input is t and that holds every reader of t (a block whose shortcut is its input).
    for m, first in tracer.takes.items():
        if first is t and m in once and m:
            stacks = [r.meta.get("nn_module_stack", {}) for r in readers]
            if all(any(_qual(k, v) == m for k, v in s.items()) for s in stacks):
                return m, INPUT
    return None


def _qual(key, value) -> str:
    """The qualified module name of an ``nn_module_stack`` entry (its key, or the value's first item)."""
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return value[0]
    return str(key)


def _scope(node) -> tuple[str, ...]:
    """The modules ``node`` runs in, outermost first (a module call's own module not included)."""
    stack = tuple(_qual(k, v) for k, v in (node.meta.get("nn_module_stack") or {}).items())
    if node.op == "call_module" and stack and stack[-1] == node.target:
        stack = stack[:-1]
    return stack


def _owner(t, readers, tracer: _Tracer) -> str | None:
    """The module whose own op makes ``t`` and that holds all its readers, called once; None where there is none."""
    if t.op not in _taps.OPS:
        return None
    scope = _scope(t)
    owner = scope[-1] if scope else ""
    if owner and tracer.calls.get(owner, 0) != 1:
        return None
    if any(_scope(r)[:len(scope)] != scope for r in readers):
        return None
    return owner


def _tapped(model: nn.Module, owner: str, tensors, nodes, fixed: dict) -> list[Place]:
    """Rewrite ``owner``'s forward with a tap after each tensor's op (``core/_taps.py``); their places."""
    module = model.get_submodule(owner)
    graph = _taps.trace(module, fixed)  # one trace: matched here, then tapped
    if graph is None:
        return []
    local = _taps.ops(graph)
    prefix = f"{owner}." if owner else ""

    def kind(n, whole=True):  # a child call's target is relative to the owner in its own trace
        return n.op, n.target.removeprefix(prefix) if whole and n.op == "call_module" else n.target

    mine = [n for n in nodes if n.op in _taps.OPS and (_scope(n)[-1:] or ("",))[0] == owner]
    picked = []
    for t, feeds in tensors:  # the k-th op of t's kind in the owner's scope is the k-th in its own trace
        same = [n for n in mine if kind(n) == kind(t)]
        theirs = [n for n in local if kind(n, whole=False) == kind(t)]
        if len(same) != len(theirs):
            log.info("activation quantizers: %s traces differently alone; %s left in float", owner or "the model", t.name)
            continue
        picked.append((theirs[same.index(t)].name, feeds))
    if not picked:
        return []
    children = _taps.tap_(module, [name for name, _ in picked], fixed, graph)
    return [Place(prefix + child, OUTPUT, feeds) for child, (_, feeds) in zip(children, picked)]

