"""Putting dead-zone quantizers into any model, and taking them out again.

The torchao shape: :func:`quantize_` wraps, in place, the weight of every
convolution and linear layer through ``torch.nn.utils.parametrize`` and returns
the names it wrapped; :func:`bake_` writes the current quantized weights into
plain parameters and removes the parametrizations. No tracing: modules are
found by type, so any timm or torchvision model works.

Layer names: a module's own name for its ``weight`` (``layer1.0.conv1``); the
module name and the parameter for other weight matrices
(``encoder.layers.0.self_attention.in_proj_weight``). The same names are used
by the reports and the checkpoint.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from codeq_cli.core import _group, _kernels, act_quant
from codeq_cli.core._group import Group
from codeq_cli.core.layers import CONV as _CONV, LINEAR as _LINEAR
from codeq_cli.core.quantizer import DeadZoneQuantizer, Encoded

log = logging.getLogger(__name__)

_NORM = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
# Weight matrices of matrix products held outside Linear modules.
_EXTRA_MATRICES = {nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")}


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORM):
        return True
    if isinstance(module, (*_CONV, *_LINEAR)):
        return False
    return "norm" in type(module).__name__.lower()  # timm's LayerNorm2d, RmsNorm, ...


def layer_kind(module: nn.Module) -> str:
    """``conv1d``/``conv2d``/``conv3d``/``linear``/``mha`` ..., for reports."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    for cls in (*_CONV, *_LINEAR):
        if isinstance(module, cls):
            return cls.__name__.lower()
    return type(module).__name__.lower()


@dataclass(frozen=True)
class Target:
    """One weight chosen for quantization, or left in float with a reason."""

    name: str  # layer name (see the module docstring)
    module_name: str
    param_name: str
    kind: str
    shape: tuple[int, ...]
    reason: str | None = None  # None: quantize it

    @property
    def quantize(self) -> bool:
        return self.reason is None


def layer_name(module_name: str, param_name: str) -> str:
    if param_name == "weight":
        return module_name
    return f"{module_name}.{param_name}" if module_name else param_name


def _matches(name: str, patterns: Iterable[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _candidate_weights(module: nn.Module) -> tuple[str, ...]:
    if isinstance(module, (*_CONV, *_LINEAR)):
        return ("weight",)
    for cls, names in _EXTRA_MATRICES.items():
        if isinstance(module, cls):
            return names
    return ()


def plan(
    model: nn.Module,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
) -> list[Target]:
    """Every weight :func:`quantize_` would wrap, and every one it would leave in float.

    ``include``/``exclude`` are fnmatch patterns over layer names; a layer is
    quantized when it matches ``include`` (default: all) and not ``exclude``.
    Besides convolution and linear weights, the plan lists every other
    parameter of two or more dimensions outside normalization layers (position
    embeddings, class tokens, bias tables) as left in float, with the reason.
    """
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    # A parameter is tied when two different (module, attribute) slots hold it;
    # one module reached by two paths is not tied (its parametrization serves both).
    owners: dict[int, dict[tuple[int, str], str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), {}).setdefault((id(module), pname), layer_name(mname, pname))

    targets: list[Target] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if _is_norm(module) or isinstance(module, parametrize.ParametrizationList):
            # A ParametrizationList holds the ``original`` of a weight listed at its owner.
            continue
        candidates = _candidate_weights(module)
        for pname in candidates:
            if parametrize.is_parametrized(module, pname):
                plist = module.parametrizations[pname]
                if hasattr(plist, "original"):
                    tensor = plist.original  # no need to run the parametrization
                else:  # several originals (weight_norm: original0, original1): evaluate it
                    with torch.no_grad():
                        tensor = getattr(module, pname)
                if _quantizer_of(module, pname) is not None:
                    reason = "already quantized by codeq"
                else:
                    reason = "already parametrized by something else (e.g. weight_norm)"
                targets.append(Target(layer_name(mname, pname), mname, pname, layer_kind(module), tuple(tensor.shape), reason))
                continue
            tensor = getattr(module, pname, None)
            if tensor is None:
                continue
            name = layer_name(mname, pname)
            shape = tuple(tensor.shape) if not isinstance(tensor, nn.parameter.UninitializedParameter) else ()
            reason = None
            if not isinstance(tensor, nn.Parameter):
                reason = "not a plain Parameter (computed by a hook or stored as a buffer)"
            elif isinstance(tensor, nn.parameter.UninitializedParameter):
                reason = "lazy module not yet initialised: run one forward pass first"
            elif not tensor.is_floating_point():
                reason = f"not a floating-point weight ({tensor.dtype})"
            elif len(owners.get(id(tensor), ())) > 1:
                others = [o for o in owners[id(tensor)].values() if o != name]
                reason = f"shared (tied) with {', '.join(others)}"
            elif include is not None and not _matches(name, include):
                reason = "not matched by include patterns"
            elif _matches(name, exclude):
                reason = "excluded by pattern"
            seen.add(id(tensor))
            targets.append(Target(name, mname, pname, layer_kind(module), shape, reason))
        # Other weight-like tensors: listed so a user sees what stays in float.
        for pname, p in module.named_parameters(recurse=False):
            if pname in candidates or id(p) in seen or isinstance(p, nn.parameter.UninitializedParameter):
                continue  # (a lazy module's bias has no dim() yet)
            if p.dim() < 2:
                continue
            seen.add(id(p))
            targets.append(
                Target(
                    layer_name(mname, pname),
                    mname,
                    pname,
                    "other",
                    tuple(p.shape),
                    "not a convolution or linear weight (embedding, token or table)",
                )
            )
    return targets


def quantize_(
    model: nn.Module,
    bits: int | None = 4,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
    *,
    activations: act_quant.ActSpec | None = None,
    **quantizer_kwargs,
) -> list[str]:
    """Wrap every convolution and linear weight of ``model`` in a :class:`DeadZoneQuantizer`.

    In place; returns the wrapped layer names. ``bits=None`` learns the
    bit-width (mixed precision); ``quantizer_kwargs`` go to each quantizer
    (``b_min``, ``b_max``, ``init_dz``, ``init_bit``, ``quantile``). The first
    and last layers are included; normalization layers never. Weights that
    cannot be wrapped are left in float and logged with the reason; see
    :func:`plan` for the full list. Build the optimizer afterwards: the
    quantizers' logits are new parameters.

    ``activations`` (codeq's extension, ``docs/method.md``) also puts an
    :class:`~codeq_cli.core.act_quant.ActQuantizer` on the input of every
    wrapped convolution and linear layer; they stay transparent until
    :func:`~codeq_cli.core.act_quant.calibrate_` has run. Default: none.
    """
    wrapped = []
    group = Group()  # the layers wrapped here are quantized in one pass (off the numba path)
    for t in plan(model, include, exclude):
        if not t.quantize:
            if t.kind != "other":
                log.info("left in float: %s (%s)", t.name, t.reason)
            continue
        module = model.get_submodule(t.module_name)
        weight = getattr(module, t.param_name)
        qz = DeadZoneQuantizer(bits, **quantizer_kwargs).to(device=weight.device)
        parametrize.register_parametrization(module, t.param_name, qz, unsafe=True)
        group.add(qz, module, t.param_name)
        wrapped.append(t.name)
    if activations is not None:
        act_quant.add_(model, wrapped, activations)
    return wrapped


def _quantizer_of(module: nn.Module, pname: str) -> DeadZoneQuantizer | None:
    if not parametrize.is_parametrized(module, pname):
        return None
    for p in module.parametrizations[pname]:
        if isinstance(p, DeadZoneQuantizer):
            return p
    return None


@dataclass(frozen=True)
class QuantizedWeight:
    name: str
    module_name: str
    param_name: str
    module: nn.Module
    quantizer: DeadZoneQuantizer

    @property
    def original(self) -> torch.Tensor:
        """The float weight the quantizer sees (the trained parameter)."""
        return self.module.parametrizations[self.param_name].original

    @property
    def key(self) -> str:
        """The weight's key in the plain (unwrapped) model's state dict: ``layer1.0.conv1.weight``."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name


def quantized_weights(model: nn.Module, *, every_path: bool = False) -> Iterator[QuantizedWeight]:
    """Every weight of ``model`` that carries a :class:`DeadZoneQuantizer`, in module order.

    A module shared by two parents (timm's CoaT) is listed once, under its
    first name; with ``every_path`` once per name, as the state dict lists it.
    """
    for mname, module in model.named_modules(remove_duplicate=not every_path):
        if not parametrize.is_parametrized(module):
            continue
        for pname in list(module.parametrizations.keys()):
            qz = _quantizer_of(module, pname)
            if qz is not None:
                yield QuantizedWeight(layer_name(mname, pname), mname, pname, module, qz)


def quantizer_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(dead-zone logits, bit logits)`` of all quantizers, for optimizer groups and the loss."""
    dz, bit = [], []
    for qw in quantized_weights(model):
        dz.append(qw.quantizer.theta_dz)
        if qw.quantizer.theta_bit is not None:
            bit.append(qw.quantizer.theta_bit)
    return dz, bit


def logit_vectors(qzs: Sequence[DeadZoneQuantizer]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(θ_dz, θ_bit)`` of the quantizers ``qzs`` (a model's, as :func:`quantized_weights` lists them),
    stacked as this forward's one-pass quantizer took them.

    In the order of :func:`quantizer_parameters`; ``θ_bit`` is None in fixed
    precision. None when no single pass of the current forward holds exactly
    these logits unchanged (the numba path on CPU, mixed devices or dtypes,
    after an optimizer step): then stack :func:`quantizer_parameters`. A loss
    term on these vectors adds its gradient to the quantizer's once per
    vector instead of once per logit (issue 22: launches that do not grow with
    the number of layers).
    """
    group = qzs[0].__dict__.get("_group") if qzs else None
    return group.logit_vectors(qzs) if group is not None else None


@torch.no_grad()
def encode_all(model: nn.Module) -> dict[str, Encoded]:
    """:meth:`DeadZoneQuantizer.encode` of every quantized weight, by layer name, with ``nonzero`` counted.

    Off the CPU's numba path (CUDA, ``CODEQ_KERNELS=torch``) the layers are
    encoded in one pass with a single read back to the host for all of them
    (:func:`codeq_cli.core._group.encode`), instead of a few per layer; the
    result equals each quantizer's own ``encode``.
    """
    qws = list(quantized_weights(model))
    out: dict[str, Encoded] = {}
    batch = []
    for qw in qws:
        w = qw.original
        if _kernels.usable(w) or w.numel() == 0 or _kernels._compiling():
            e = qw.quantizer.encode(w)
            out[qw.name] = Encoded(e.codes, e.step, e.shift, e.bits, int(torch.count_nonzero(e.codes)))
        else:
            batch.append(qw)
    if batch:
        group = batch[0].quantizer.__dict__.get("_group")
        layouts = group.encode_layouts if group is not None else {}
        for qw, (codes, step, shift, bits, kept) in zip(
                batch, _group.encode([q.quantizer for q in batch], [q.original for q in batch], layouts)):
            qz, w = qw.quantizer, qw.original
            if qz.grid is not None:  # the levels' offset as the forward uses it (δ' on the export's grid)
                shift = qz.level_shift(*(torch.tensor(v, dtype=w.dtype, device=w.device) for v in (step, shift)),
                                       float(2 ** (bits - 1) - 1))
            out[qw.name] = Encoded(codes, step, shift, bits, kept)
    return {qw.name: out[qw.name] for qw in qws}


def plain_state(model: nn.Module, state: dict | None = None) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """The plain model's state dict, read from a quantized one: ``(key, entry)`` in the plain model's order.

    The one mapping of parametrized keys to plain ones
    (``layer1.0.conv1.parametrizations.weight.original`` → ``layer1.0.conv1.weight``).
    A quantized weight comes as its :class:`QuantizedWeight` (the caller
    decides what to store: ``ŵ``, or its codes), placed before its module's
    other entries as the plain model has it (parametrize moved it behind
    them); every other entry comes as its tensor; the quantizers' own state
    (the logits, and the activation quantizers' steps and flags) is left out.
    A module shared by two parents appears under both names, as in the
    plain model. ``state`` is ``model.state_dict()`` when the caller has it
    already.
    """
    owned = {(f"{qw.module_name}." if qw.module_name else "") + f"parametrizations.{qw.param_name}.": qw
             for qw in quantized_weights(model, every_path=True)}
    pending: dict[str, list[QuantizedWeight]] = {}  # module name -> its quantized weights not yet placed
    for qw in owned.values():
        pending.setdefault(qw.module_name, []).append(qw)
    act_prefixes = tuple(f"{name}.{act_quant.ATTR}." if name else f"{act_quant.ATTR}."
                         for name, _ in act_quant.act_quantizers(model))
    for key, value in (model.state_dict() if state is None else state).items():
        if act_prefixes and key.startswith(act_prefixes):
            continue
        qw = next((q for prefix, q in owned.items() if key.startswith(prefix)), None)
        for placed in pending.pop(qw.module_name if qw is not None else key.rpartition(".")[0], ()):
            yield placed.key, placed
        if qw is None:
            yield key, value


@torch.no_grad()
def dequantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model with every quantized weight as its ``ŵ``.

    Keys and order are the plain model's (``layer1.0.conv1.weight``), so it
    loads with ``strict=True`` into a freshly built copy of the architecture;
    the quantizers' logits are left out. The modules' version metadata
    (``_metadata``, which e.g. torchvision's MNASNet reads while loading) is
    kept. Unlike :func:`bake_` the model is not changed (``bake_`` on a
    ``deepcopy`` would also strip the original: the two share parametrize's
    generated classes).
    """
    state = model.state_dict()
    out = OrderedDict(
        (k, v.quantizer(v.original).detach() if isinstance(v, QuantizedWeight) else v) for k, v in plain_state(model, state)
    )
    out._metadata = getattr(state, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return out


def bake_(model: nn.Module) -> list[str]:
    """The inverse of :func:`quantize_`: plain parameters holding the quantized weights.

    Removes every codeq parametrization (leaving the current ``ŵ`` as the
    parameter's value) and returns the baked layer names. The model's plain
    forward then equals the wrapped forward.
    """
    baked = []
    for qw in list(quantized_weights(model)):
        parametrize.remove_parametrizations(qw.module, qw.param_name, leave_parametrized=True)
        baked.append(qw.name)
    return baked
