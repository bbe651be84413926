"""Finding, building and loading the classifiers codeq compresses.

A model is named ``timm:NAME``, ``tv:NAME`` (``torchvision:NAME``) or by a bare
name, which resolves to torchvision when torchvision has it (the paper
fine-tunes TorchVision weights) and to timm otherwise. :class:`ModelSpec` is
everything needed to rebuild the architecture (the checkpoint stores it);
weights come from the libraries' own download caches, from a local file
(never unpickled without ``weights_only``) or nowhere (random init).

Data settings follow the model: timm's resolved data config, torchvision's
weights transforms (:func:`data_config`).
"""

from __future__ import annotations

import difflib
import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from codeq_cli.errors import ModelError, UsageError, one_line

log = logging.getLogger(__name__)

SOURCES = {"timm": "timm", "tv": "torchvision", "torchvision": "torchvision"}


@dataclass(frozen=True)
class ModelSpec:
    """An architecture, enough to rebuild it: ``source`` is ``timm`` or ``torchvision``."""

    source: str
    name: str
    num_classes: int | None = None  # None: the architecture's default (1000)
    in_chans: int = 3

    @property
    def label(self) -> str:
        return f"{'tv' if self.source == 'torchvision' else 'timm'}:{self.name}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(source=d["source"], name=d["name"], num_classes=d.get("num_classes"), in_chans=d.get("in_chans", 3))


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing the model expects (from timm's data config or torchvision's weights)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def with_size(self, size: int | None) -> DataConfig:
        if size is None:
            return self
        c = self.input_size[0]
        return DataConfig((c, int(size), int(size)), self.mean, self.std, self.interpolation, self.crop_pct)

    def with_preprocessing(
        self,
        *,
        crop_pct: float | None = None,
        mean: tuple[float, ...] | list[float] | None = None,
        std: tuple[float, ...] | list[float] | None = None,
        interpolation: str | None = None,
    ) -> DataConfig:
        """This config with the preprocessing a user chose (``None`` keeps the model's own)."""
        return replace(
            self,
            crop_pct=self.crop_pct if crop_pct is None else float(crop_pct),
            mean=self.mean if mean is None else tuple(float(x) for x in mean),
            std=self.std if std is None else tuple(float(x) for x in std),
            interpolation=self.interpolation if interpolation is None else str(interpolation),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        return cls(
            tuple(int(x) for x in d["input_size"]),
            tuple(float(x) for x in d["mean"]),
            tuple(float(x) for x in d["std"]),
            str(d.get("interpolation", "bilinear")),
            float(d.get("crop_pct", 0.875)),
        )


def _tv_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_has(name: str) -> bool:
    import timm

    return timm.is_model(name.split(".", 1)[0])


def _close_matches(name: str) -> list[str]:
    import timm

    # Bare names resolve to torchvision first, so torchvision wins a shared name.
    pool = [f"timm:{n}" for n in timm.list_models()] + [f"tv:{n}" for n in _tv_names()]
    bare = {p.split(":", 1)[1]: p for p in pool}
    hits = difflib.get_close_matches(name.split(":", 1)[-1], list(bare), n=5, cutoff=0.6)
    return [bare[h] for h in hits]


def resolve(name: str, *, num_classes: int | None = None, in_chans: int = 3) -> ModelSpec:
    """The :class:`ModelSpec` for a user's model name; unknown names list close matches."""
    raw = name.strip()
    if ":" in raw:
        prefix, bare = raw.split(":", 1)
        source = SOURCES.get(prefix.lower())
        if source is None:
            raise UsageError(f"model prefix {prefix!r} in {name!r} is not known", hint="use timm:NAME, tv:NAME or a bare name")
        ok = bare in _tv_names() if source == "torchvision" else _timm_has(bare)
    else:
        bare = raw
        source = "torchvision" if bare in _tv_names() else ("timm" if _timm_has(bare) else None)
        ok = source is not None
    if not ok or not bare:
        matches = _close_matches(raw)
        hint = f"close matches: {', '.join(matches)}" if matches else "see `timm.list_models()` or torchvision.models.list_models()"
        raise UsageError(f"unknown model {name!r}", hint=hint)
    return ModelSpec(source=source, name=bare, num_classes=num_classes, in_chans=in_chans)


def _tv_weights(name: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        return None


def default_num_classes(spec: ModelSpec) -> int:
    if spec.source == "torchvision":
        w = _tv_weights(spec.name)
        return len(w.meta["categories"]) if w is not None else 1000
    import timm

    return int(timm.models.get_pretrained_cfg_value(spec.name.split(".")[0], "num_classes") or 1000)


def create(spec: ModelSpec, *, pretrained: bool = False) -> nn.Module:
    """Build the architecture; with ``pretrained`` fetch the library's default weights.

    The head is sized ``spec.num_classes`` (a new, randomly initialised head
    when that differs from the pretrained one).
    """
    n_default = default_num_classes(spec)
    n = spec.num_classes or n_default
    try:
        if spec.source == "timm":
            import timm

            if pretrained:
                model = timm.create_model(spec.name, pretrained=True, in_chans=spec.in_chans)
                if n != model.num_classes:
                    model.reset_classifier(n)
            else:
                model = timm.create_model(spec.name, pretrained=False, num_classes=n, in_chans=spec.in_chans)
        else:
            import torchvision

            if spec.in_chans != 3:
                raise UsageError(f"--in-chans {spec.in_chans} is not supported for torchvision models", hint="use a timm model")
            if pretrained:
                weights = _tv_weights(spec.name)
                if weights is None:
                    raise ModelError(f"torchvision has no pretrained weights for {spec.name!r}", hint="pass --weights FILE or --no-pretrained")
                model = torchvision.models.get_model(spec.name, weights=weights)
                _drop_aux_heads(model)
                if n != n_default:
                    replace_head(model, n)
            else:
                kwargs = {"aux_logits": False, "init_weights": True} if spec.name in {"googlenet", "inception_v3"} else {}
                model = torchvision.models.get_model(spec.name, weights=None, num_classes=n, **kwargs)
    except (UsageError, ModelError):
        raise
    except Exception as exc:
        if pretrained:
            raise ModelError(
                f"pretrained weights for {spec.label} could not be loaded ({one_line(exc, 160)})",
                hint="when offline with nothing cached, pass --weights FILE (a local state dict) or --no-pretrained",
            ) from exc
        raise ModelError(f"could not build {spec.label}: {one_line(exc, 160)}") from exc
    return model


def _drop_aux_heads(model: nn.Module) -> None:
    """Inception/GoogLeNet pretrained weights come with auxiliary heads; codeq trains without them."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for attr in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, attr):
                setattr(model, attr, None)


def classifier_of(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The final classification layer: timm's ``get_classifier`` or the last Linear/1x1 conv."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module):
            for name, mod in model.named_modules():
                if mod is head:
                    return name, mod
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            last = (name, mod)
    return last


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a fresh final layer with ``num_classes`` outputs."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    found = classifier_of(model)
    if found is None:
        raise ModelError("cannot find the classification layer to replace", hint="use a timm model or omit --num-classes")
    name, old = found
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    for hname in ("num_classes",):
        if hasattr(model, hname):
            setattr(model, hname, num_classes)


def num_outputs(model: nn.Module) -> int | None:
    found = classifier_of(model)
    if found is None:
        return None
    _, head = found
    return head.out_features if isinstance(head, nn.Linear) else getattr(head, "out_channels", None)


# -- weights files -----------------------------------------------------------

# Wrappers timm's loader does not open (it knows state_dict, model and the EMA keys).
_MORE_WRAPPERS = ("model_state_dict", "module", "net", "weights")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors``/``.pt``/``.pth``/``.bin`` file, never by unrestricted unpickling.

    timm's ``load_state_dict`` reads the file (``weights_only``, the plain
    weights rather than an EMA, ``module.``/``_orig_mod.`` prefixes removed);
    codeq adds the one-line refusals and a few more wrapper keys.
    """
    import warnings

    from timm.models import clean_state_dict, load_state_dict

    from codeq_cli._io import UnsafeFile, load_refusal, torch_load_safe

    p = Path(path)
    if not p.exists():
        raise UsageError(f"weights file {str(p)!r} does not exist", hint="check the path given to --weights")
    if p.is_dir():
        raise UsageError(f"weights path {str(p)!r} is a folder", hint="pass a .pt, .pth or .safetensors file")
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise ModelError(f"cannot read --weights {str(p)!r} ({exc.strerror or exc})", hint="check the file's permissions") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            obj = load_state_dict(str(p), use_ema=False, weights_only=True)
    except (AttributeError, TypeError):  # it loaded, but holds no mapping for timm to clean: say what it holds
        obj = torch_load_safe(p)
    except Exception as exc:
        if p.suffix == ".safetensors":
            raise ModelError(f"--weights {str(p)!r} is not a readable safetensors file ({one_line(exc, 160)})",
                             hint="copy it again or save it again with safetensors.torch.save_file") from exc
        why = load_refusal(p, exc)
        if isinstance(why, UnsafeFile):
            hint = "save the tensors alone: torch.save(model.state_dict(), path)"
        elif "codeq checkpoint" in str(why):
            hint = "write its dense weights with `codeq export FILE --to weights.safetensors`"
        else:
            hint = "pass a .pt/.pth/.safetensors state dict, saved with torch.save(model.state_dict(), path)"
        raise ModelError(f"--weights {str(p)!r} cannot be read as a state dict: {why}", hint=hint) from exc
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _MORE_WRAPPERS if k in obj and isinstance(obj[k], dict)), None) if isinstance(obj, dict) else None
        if inner is None:
            break
        obj = clean_state_dict(inner)
    what = f"a {type(obj).__name__}" if not isinstance(obj, dict) else "a mapping that is not names to tensors"
    raise ModelError(f"--weights {str(p)!r} does not hold a state dict (it holds {what})",
                     hint="save one with torch.save(model.state_dict(), path)")


def load_weights(model: nn.Module, path: str | os.PathLike, *, new_head: bool = False) -> list[str]:
    """Load a local state dict into ``model``; returns the keys left at their init.

    Key or shape mismatches are refused with the first few named. With
    ``new_head`` (``--num-classes`` was given) the classifier's weights may
    differ in shape: they are skipped and the fresh head is kept.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    head_keys: set[str] = set()
    if new_head:
        found = classifier_of(model)
        if found is not None:
            head_keys = {f"{found[0]}.{k}" for k in found[1].state_dict()}
    missing = [k for k in own if k not in sd and k not in head_keys and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shape_bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape) and k not in head_keys]
    if missing or unexpected or shape_bad:
        parts = []
        if shape_bad:
            k = shape_bad[0]
            parts.append(f"shape of {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" + (f" (+{len(shape_bad) - 1} more)" if len(shape_bad) > 1 else ""))
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}" + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
        hint = "check that the file belongs to this architecture"
        if shape_bad and all(k in _head_like(shape_bad) for k in shape_bad):
            hint = "the classifier differs: pass --num-classes N to train a new head"
        raise ModelError(f"the tensors in --weights {str(path)!r} do not fit {type(model).__name__}: {'; '.join(parts)}", hint=hint)
    skipped = [k for k in head_keys if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    to_load = with_module_versions({k: v for k, v in sd.items() if k not in skipped}, sd, own)
    model.load_state_dict(to_load, strict=False)
    return skipped + [k for k in own if k not in sd]


def with_module_versions(state: dict, *sources: dict) -> OrderedDict:
    """``state`` as an ``OrderedDict`` carrying the modules' version metadata (``_metadata``).

    ``load_state_dict`` hands each module its version from ``_metadata``, and
    some modules refuse to load without it (torchvision's MNASNet). Copying
    or filtering a state dict drops it, so the first source that has one
    lends it: the file's own (a ``torch.save``d state dict), else the live
    model's (``model.state_dict()``: the versions of the installed code, which
    built the architecture the weights are for). A safetensors file has none.
    """
    out = OrderedDict(state)
    for src in (state, *sources):
        meta = getattr(src, "_metadata", None)
        if meta is not None:
            out._metadata = meta  # type: ignore[attr-defined]
            break
    return out


def _head_like(keys: list[str]) -> list[str]:
    return [k for k in keys if any(h in k for h in ("fc.", "head", "classifier", "last_linear"))]


def data_config(model: nn.Module, spec: ModelSpec) -> DataConfig:
    """The preprocessing the model was trained with (timm data config / torchvision weights)."""
    if spec.source == "timm":
        import timm

        cfg = timm.data.resolve_model_data_config(model)
        return DataConfig.from_dict({"interpolation": "bicubic", **cfg})
    w = _tv_weights(spec.name)
    if w is None:
        return DataConfig()
    t = w.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    crop_pct = crop / resize
    # A fixed-size model built without the weights can be smaller than they say (vit_h_14's default
    # SWAG weights are for 518x518; the plain constructor builds it for 224x224): the model decides.
    fixed = getattr(model, "image_size", None)
    if isinstance(fixed, int) and fixed != crop:
        crop = fixed
    interp = getattr(t.interpolation, "value", str(t.interpolation))
    return DataConfig((3, crop, crop), tuple(t.mean), tuple(t.std), str(interp), crop_pct)


def class_names(spec: ModelSpec) -> list[str] | None:
    """The pretrained label names where the library knows them (torchvision)."""
    if spec.source == "torchvision":
        w = _tv_weights(spec.name)
        if w is not None:
            return list(w.meta.get("categories") or []) or None
    return None


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: nn.Module
    data: DataConfig
    weights: str  # "pretrained", "random" or the file path
    notes: list[str] = field(default_factory=list)


def load_model(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    num_classes: int | None = None,
    in_chans: int = 3,
    img_size: int | None = None,
    data_classes: int | None = None,
) -> LoadedModel:
    """Resolve, build and load a model the way ``codeq compress`` does.

    ``data_classes`` (the class folders of the data) sizes the head of a
    randomly initialised model when ``num_classes`` is not given: with no
    weights to keep there is no reason to ask for ``--num-classes``.
    """
    spec = resolve(name, num_classes=num_classes, in_chans=in_chans)
    notes = [] if name.strip() == spec.label else [f"{name} resolved to {spec.label}"]
    if weights is None and not pretrained and num_classes is None and data_classes:
        if data_classes != default_num_classes(spec):
            spec = replace(spec, num_classes=data_classes)
            notes.append(f"{spec.label} built with {data_classes} outputs, one per class folder "
                         "(random weights: no pretrained head to keep)")
    if weights is not None:
        model = create(spec)
        skipped = load_weights(model, weights, new_head=num_classes is not None)
        source = str(weights)
        if skipped:
            notes.append(f"left at init (not in file or new head): {', '.join(skipped[:4])}")
    elif pretrained:
        model = create(spec, pretrained=True)
        source = "pretrained"
    else:
        model = create(spec)
        source = "random"
    return LoadedModel(spec, model, data_config(model, spec).with_size(img_size), source, notes)
