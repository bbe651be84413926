"""Recipes: every setting of a CoDeQ fine-tune, in one YAML file, validated once at load.

A recipe fixes the method's knobs (``docs/method.md``, "The objective": ``λ_dz``,
``λ_bit``, fixed or learned bit-width) and the fine-tuning regime (optimizer
with three parameter groups, schedule, epochs, global batch size). Built-in
recipes live in ``codeq_cli/recipes/*.yaml`` (package data): ``mixed`` and
``fixed4`` for short fine-tunes, and the paper's presets (arXiv:2512.12981
§5). Every key is described in ``docs/recipes.md``.

:func:`load_recipe` reads a built-in name or a path, :func:`apply_overrides`
applies ``--set key=value`` pairs; both return a frozen :class:`Recipe` or
raise :class:`~codeq_cli.errors.RecipeError` with one line that names the key,
the value and what is allowed. Keys a file leaves out take the defaults below,
which are those of the built-in ``mixed`` recipe.
"""

from __future__ import annotations

import difflib
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from codeq_cli.errors import RecipeError, UsageError
from codeq_cli.train.budget import RECIPE_KEYS, Budget, one_budget, parse_size

B_MIN, B_MAX = 2, 8

class Recipe(BaseModel):
    """One CoDeQ fine-tune, fully specified; see ``docs/recipes.md`` for every key.

    Frozen and validated at construction: an instance is always usable. The
    defaults are the built-in ``mixed`` recipe's values.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False, validate_default=True)

    description: str = Field(
        "Mixed precision for a short fine-tune of a pretrained model: learned dead zones and bit-widths (2-8)",
        description="a one-line string",
    )

    # -- the method (docs/method.md, "The quantizer" and "The objective") ---------------------------------
    mode: Literal["fixed", "mixed"] = Field("mixed", description="'fixed' or 'mixed'")
    bits: int = Field(4, ge=B_MIN, le=B_MAX, description=f"an integer from {B_MIN} to {B_MAX}")
    b_min: int = Field(B_MIN, ge=B_MIN, le=B_MAX, description=f"an integer from {B_MIN} to {B_MAX}, at most b_max")
    b_max: int = Field(B_MAX, ge=B_MIN, le=B_MAX, description=f"an integer from {B_MIN} to {B_MAX}, at least b_min")
    lambda_dz: float = Field(0.05, ge=0, description="a number >= 0")
    lambda_bit: float = Field(0.2, ge=0, description="a number >= 0")
    init_dz: float = Field(3.0, gt=0, description="a number > 0 (3.0: about 1% of the weights pruned at the start)")
    init_bit: float = Field(3.0, gt=0, description="a number > 0 (3.0: 8 bits at the start)")
    init_sparsity: float | None = Field(
        None, ge=0, lt=1, description="a number in [0, 1): each layer's dead zone starts pruning that share of its "
                                      "weights (overrides init_dz), or null for init_dz in every layer")
    quantile: float = Field(0.99, gt=0, le=1, description="a number in (0, 1]")
    weight_grid: Literal["reduce-range", "full-range"] | None = Field(
        None, description="null (the method's levels), 'reduce-range' or 'full-range' (the levels on the int8 export's "
                          "grid, weight codes up to 63 or 127)")
    include: list[str] | None = Field(None, description="a list of layer-name patterns (fnmatch), or null for every layer")
    exclude: list[str] | None = Field(None, description="a list of layer-name patterns (fnmatch), or null")

    # -- codeq's extension: activation quantizers (docs/method.md, "codeq's extension") -------------
    act_bits: int | str | None = Field(
        None, description=f"null (float activations), an integer from {B_MIN} to {B_MAX}, or 'learned'")
    act_b_min: int = Field(4, ge=B_MIN, le=B_MAX, description=f"an integer from {B_MIN} to {B_MAX}, at most act_b_max")
    act_b_max: int = Field(B_MAX, ge=B_MIN, le=B_MAX, description=f"an integer from {B_MIN} to {B_MAX}, at least act_b_min")
    act_exclude: list[str] | None = Field(None, description="a list of layer-name patterns (fnmatch) whose input stays float, or null")
    lr_act: float = Field(1e-4, ge=0, description="a number >= 0 (0 freezes the activation steps)")
    lambda_act_bit: float = Field(0.2, ge=0, description="a number >= 0")

    # -- optimizer: three parameter groups (weights, dead-zone logits, bit logits)
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="'adamw' or 'sgd'")
    lr: float = Field(1e-4, gt=0, description="a number > 0")
    lr_dz: float = Field(5e-3, ge=0, description="a number >= 0 (0 freezes the dead zones)")
    lr_bit: float = Field(5e-3, ge=0, description="a number >= 0 (0 freezes the bit-widths)")
    momentum: float = Field(0.9, ge=0, lt=1, description="a number in [0, 1)")
    weight_decay: float = Field(0.01, ge=0, description="a number >= 0")
    weight_decay_dz: float = Field(0.0, ge=0, description="a number >= 0")
    weight_decay_bit: float = Field(0.0, ge=0, description="a number >= 0")

    # -- schedule and loop ----------------------------------------------------
    epochs: int = Field(10, ge=1, description="an integer >= 1")
    warmup_epochs: float = Field(0.0, ge=0, description="a number >= 0 and less than epochs")
    schedule: Literal["cosine", "constant", "step"] = Field("cosine", description="'cosine', 'constant' or 'step'")
    min_lr: float = Field(0.0, ge=0, description="a number >= 0, at most lr")
    batch_size: int = Field(128, ge=1, description="an integer >= 1 (global, over all processes)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="a number in [0, 1)")
    grad_clip: float | None = Field(None, gt=0, description="a number > 0, or null for no clipping")
    eval_every: int = Field(1, ge=1, description="an integer >= 1 (epochs)")

    # -- augmentation (the rest follows the model's data config) ---------------
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="two numbers [min, max] with 0 < min <= max <= 1")
    hflip: bool = Field(True, description="true or false")

    # -- the budget (docs/method.md, "Compressing to a budget"): at most one of the three
    target_bops: float | None = Field(None, gt=0, lt=100, description="a number in (0, 100): relative BOPs in percent, or null")
    target_size: int | None = Field(None, ge=1, description="a size in bytes (2000000, 2MB, 1.5MiB, 800kB), or null")
    max_drop: float | None = Field(None, ge=0, description="a number >= 0: top-1 points below the FP model, or null")
    budget_ramp: float = Field(0.3, gt=0, le=1,
                               description="a number in (0, 1]: the fraction of training by which the target is reached")
    budget_schedule: Literal["geometric", "cubic"] = Field(
        "geometric", description="'geometric' (the figure falls at a steady rate in log space) or 'cubic' "
                                 "(Zhu & Gupta: fast at first, gently near the target)")
    budget_recover_lr: float | None = Field(
        3e-3, gt=0, description="a number > 0: the weights' learning rate when the target is reached (held at "
                                "budget_ramp_lr until then, the run's schedule from it over the rest), or null for the "
                                "run's schedule")
    budget_ramp_lr: float | None = Field(
        3e-4, gt=0, description="a number > 0: the weights' learning rate while the figure falls to the target, in a "
                                "run with a recovery phase (budget_recover_lr), or null for lr")
    budget_every: int = Field(5, ge=1, description="an integer >= 1 (steps between measurements of the budget's figure)")
    budget_rates: Literal["cost", "sensitivity"] = Field(
        "cost", description="'cost' (layers move at rates set by their share of the figure) or 'sensitivity' "
                            "(the penalty is weighted by cost, the task gradient decides which layers give way)")

    # -- accuracy at the budget (docs/method.md, "Accuracy at the budget")
    distill_weight: float = Field(0.5, ge=0, le=1, description="a number in [0, 1] (0: no distillation)")
    distill_temperature: float = Field(2.0, gt=0, description="a number > 0")
    bn_reestimate: int = Field(20, ge=0, description="an integer >= 0 (training batches; 0: off)")
    # -- preprocessing the user chose (null: the model's data config; docs/data.md) ------------------------
    crop_pct: float | None = Field(None, gt=0, le=1, description="a number in (0, 1] (1.0: no centre crop), or null for the model's own")
    mean: tuple[float, ...] | None = Field(None, min_length=1, description="a list of numbers, one per input channel, or null for the model's own")
    std: tuple[float, ...] | None = Field(None, min_length=1, description="a list of numbers > 0, one per input channel, or null for the model's own")
    interpolation: Literal["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"] | None = Field(
        None, description="'nearest', 'bilinear', 'bicubic', 'box', 'hamming' or 'lanczos', or null for the model's own")

    # -- execution --------------------------------------------------------------
    amp: bool = Field(True, description="true or false")
    channels_last: bool = Field(False, description="true or false")
    sync_bn: bool = Field(False, description="true or false")

    @field_validator("mode", "optimizer", "schedule", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("act_bits", mode="before")
    @classmethod
    def _act_bits(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "learned":
            return "learned"
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and B_MIN <= v <= B_MAX):
            return v
        _fail("act_bits", v, "is not valid")

    @field_validator("include", "exclude", "act_exclude", mode="before")
    @classmethod
    def _patterns(cls, v: Any) -> Any:
        # A single pattern is a one-element list; tuples (Python callers) are lists;
        # integers are layer names of nn.Sequential ("0", "3"). Floats are not
        # converted: YAML reads 1.10 as 1.1, which would silently name another layer.
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            v = [v]
        if isinstance(v, (list, tuple)):
            return [str(p) if isinstance(p, int) and not isinstance(p, bool) else p for p in v]
        return v

    @field_validator("target_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if isinstance(v, (str, float)) and not isinstance(v, bool):
            try:
                return parse_size(v)
            except ValueError:
                _fail("target_size", v, "is not a size")
        return v

    @field_validator("crop_scale", "mean", "std", mode="before")
    @classmethod
    def _pair(cls, v: Any) -> Any:
        return tuple(v) if isinstance(v, list) else v

    @field_validator("interpolation", mode="before")
    @classmethod
    def _interp(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        # Rules that involve two keys. RecipeError is not a ValueError, so
        # pydantic lets it through unchanged.
        if self.b_min > self.b_max:
            _fail("b_min", self.b_min, f"is above b_max={self.b_max}", "lower b_min or raise b_max")
        if self.warmup_epochs >= self.epochs:
            _fail(
                "warmup_epochs", self.warmup_epochs, f"is not less than epochs={self.epochs}",
                "lower warmup_epochs (for example --set warmup_epochs=0) or raise epochs",
            )
        if self.min_lr > self.lr:
            _fail("min_lr", self.min_lr, f"is above lr={_show(self.lr)}", "min_lr must be at most lr")
        lo, hi = self.crop_scale
        if not (0 < lo <= hi <= 1):
            _fail("crop_scale", list(self.crop_scale), "is out of range")
        given = one_budget({k: getattr(self, k) for k in RECIPE_KEYS})
        if len(given) > 1:
            raise _error(f"{given[0]} and {given[1]} are both set; codeq compresses to one budget at a time",
                         f"keep one: pass one of --target-bops, --target-size, --max-drop (in a recipe, set the others to null: {given[1]}: null)", given[1])
        if self.std is not None and not all(s > 0 for s in self.std):
            _fail("std", list(self.std), "is out of range")
        if self.include is not None and not self.include:
            raise _error("include=[] would quantize no layer", "use include: null for every layer, or list patterns", "include")
        if self.weight_grid is not None:
            top, key = (self.b_max, "b_max") if self.mixed else (self.bits, "bits")
            most = 6 if self.weight_grid == "reduce-range" else 7
            if top > most:
                _fail(key, top, f"is above {most}, the widest weights whose levels fit weight_grid={self.weight_grid}",
                      f"lower {key} to {most}" + (" or use weight_grid: full-range" if most == 6 else ""))
        if self.act_b_min > self.act_b_max:
            _fail("act_b_min", self.act_b_min, f"is above act_b_max={self.act_b_max}", "lower act_b_min or raise act_b_max")
        for key in ("include", "exclude", "act_exclude"):
            pats = getattr(self, key)
            if pats is not None and any(not p.strip() for p in pats):
                _fail(key, pats, "holds an empty pattern")
        return self

    # -- conveniences ---------------------------------------------------------
    @property
    def mixed(self) -> bool:
        """True when the bit-width is learned (``mode: mixed``)."""
        return self.mode == "mixed"

    @property
    def ramp_lr(self) -> float:
        """The weights' learning rate while a budget's figure falls: ``budget_ramp_lr``, ``lr`` where that is null."""
        return self.budget_ramp_lr or self.lr

    @property
    def budget(self) -> Budget | None:
        """The budget this recipe compresses to (None: λ as given, the paper's way)."""
        return Budget.of(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples), in the order of the keys above: JSON- and YAML-safe."""
        return self.model_dump(mode="json")


KEYS: tuple[str, ...] = tuple(Recipe.model_fields)
# weight_grid → the largest weight code (the export's --reduce-range / --full-range)
GRID_LIMIT = {"reduce-range": 63, "full-range": 127}
# What each key accepts, in words (each field's description): the second half of every validation message.
ALLOWED: dict[str, str] = {name: field.description or "" for name, field in Recipe.model_fields.items()}


def quantizer_kwargs(recipe: Recipe) -> dict[str, Any]:
    """Arguments of :func:`codeq_cli.core.insert.quantize_` (with ``recipe.include``/``exclude``).

    ``activations`` is there only when the recipe quantizes activations (``act_bits`` not null).
    """
    kw: dict[str, Any] = {
        "bits": None if recipe.mixed else recipe.bits,
        "b_min": recipe.b_min,
        "b_max": recipe.b_max,
        "init_dz": recipe.init_dz,
        "init_bit": recipe.init_bit,
        "quantile": recipe.quantile,
    }
    if recipe.weight_grid is not None:
        kw["grid"] = GRID_LIMIT[recipe.weight_grid]
    if recipe.act_bits is not None:
        from codeq_cli.core.act_quant import ActSpec

        kw["activations"] = ActSpec(
            bits=None if recipe.act_bits == "learned" else int(recipe.act_bits),
            b_min=recipe.act_b_min, b_max=recipe.act_b_max, init_bit=recipe.init_bit,
            exclude=tuple(recipe.act_exclude or ()),
        )
    return kw


# -- validation messages -----------------------------------------------------------
def _show(value: Any) -> str:
    """A value as the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _error(message: str, hint: str | None = None, key: str | None = None) -> RecipeError:
    """A :class:`RecipeError` that remembers its key (to add the file's line number)."""
    err = RecipeError(message, hint=hint)
    err.key = key  # type: ignore[attr-defined]
    return err


def _fail(key: str, value: Any, problem: str, hint: str | None = None) -> None:
    raise _error(f"{key}={_show(value)} {problem}", hint or f"{key} must be {ALLOWED[key]}", key)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "the keys are listed in docs/recipes.md and by `codeq recipes show mixed`"


_TYPE_WORDS = {
    "int_type": "is not an integer",
    "int_from_float": "is not an integer",
    "float_type": "is not a number",
    "bool_type": "is not true or false",
    "string_type": "is not a string",
    "list_type": "is not a list",
    "tuple_type": "is not a list of two numbers",
    "too_short": "is not a list of two numbers",
    "too_long": "is not a list of two numbers",
    "finite_number": "is not a finite number",
    "literal_error": "is not one of the choices",
    "none_required": "is not allowed",
}


def _condense(exc: ValidationError, data: dict[str, Any]) -> RecipeError:
    """Pydantic's multi-line report as one line about the first problem."""
    errors = exc.errors()
    first = errors[0]
    keys = {str(e["loc"][0]) for e in errors if e.get("loc")}
    more = f" (+{len(keys) - 1} more keys with problems)" if len(keys) > 1 else ""
    loc = first.get("loc") or ()
    key = str(loc[0]) if loc else "recipe"
    if first["type"] == "extra_forbidden":
        return _error(f"unknown recipe key {key!r}; {_suggest(key)}{more}", key=key)
    if key not in ALLOWED:
        return _error(f"{key}: {first['msg']}{more}", key=key)
    value = data.get(key, first.get("input"))
    kind = first["type"]
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        problem = "is out of range"
    elif key in ("include", "exclude"):
        problem = "is not a list of patterns (strings)"
        return _error(f"{key}={_show(value)} {problem}{more}", "quote layer names that look like numbers ('1.10')", key)
    elif key == "crop_scale":
        problem = "is not a list of two numbers"
    elif key in ("mean", "std"):
        problem = "is not a list of numbers" if kind != "too_short" else "is empty"
    else:
        problem = _TYPE_WORDS.get(kind, "is not valid")
    return _error(f"{key}={_show(value)} {problem}{more}", f"{key} must be {ALLOWED[key]}", key)


def recipe_from_dict(data: dict[str, Any], origin: str = "recipe", lines: dict[str, int] | None = None) -> Recipe:
    """A :class:`Recipe` from a mapping; errors are one line starting with ``origin``.

    ``lines`` maps keys to their line in the file, so messages can point there.
    """
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = _condense(exc, data)
    except RecipeError as exc:
        err = exc
    key = getattr(err, "key", None)
    where = f"{origin}:{lines[key]}" if lines and key in lines else origin
    raise _error(f"{where}: {err.message}", err.hint, key) from None


# -- YAML ------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_error(exc: yaml.YAMLError, where: str) -> RecipeError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    hint = "quote patterns that start with * or ? ('*.fc')" if "alias" in problem else "fix the file"
    if mark is not None:
        return RecipeError(f"{where}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {problem}", hint=hint)
    return RecipeError(f"{where}: YAML syntax error: {problem}", hint=hint)


def parse_yaml(text: str, where: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The top-level mapping of a recipe file and each key's line; ``where`` names the file in messages."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError(f"recipe {where} is empty", hint="write key: value lines, see `codeq recipes show mixed`")
        if not isinstance(node, yaml.MappingNode):
            kind = {yaml.SequenceNode: "a list", yaml.ScalarNode: "a single value"}.get(type(node), "not a mapping")
            raise RecipeError(
                f"recipe {where} holds {kind} at the top level, not key: value pairs",
                hint="write one key: value per line, see `codeq recipes show mixed`",
            )
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise RecipeError(
                    f"{where}:{line}: recipe key {key_node.value!r} is given twice (first on line {seen[key_node.value]})",
                    hint="keep one",
                )
            seen[key_node.value] = line
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, where) from None
    finally:
        loader.dispose()
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise RecipeError(f"recipe {where}: key {_show(bad[0])} is not a name", hint="keys are words such as lambda_dz")
    return data, {str(k): v for k, v in seen.items()}


# -- loading ---------------------------------------------------------------------------
def _builtin_dir():
    return resources.files("codeq_cli").joinpath("recipes")


def builtin_names() -> list[str]:
    """Names of the built-in recipes, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def _strip_suffix(name: str) -> str:
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe (``mixed``, ``mixed.yaml``, ``fixed4``, ...) or a YAML file.

    An existing file wins over a built-in of the same name. Unknown names list
    the built-ins (close matches first).
    """
    raw = str(name_or_path).strip()
    if not raw:
        raise UsageError("the recipe name is empty", hint=f"use one of {', '.join(builtin_names())} or a YAML path")
    path = Path(raw).expanduser()
    if path.is_dir():
        raise UsageError(f"recipe path {raw!r} is a folder", hint="pass a .yaml file or a built-in name")
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read recipe {raw!r} ({type(exc).__name__}: {exc})") from None
        data, lines = parse_yaml(text, raw)
        return recipe_from_dict(data, raw, lines)
    names = builtin_names()
    stem = _strip_suffix(raw)
    if stem in names and "/" not in raw and "\\" not in raw:
        resource = _builtin_dir().joinpath(f"{stem}.yaml")
        where = f"{stem}.yaml"
        data, lines = parse_yaml(resource.read_text(encoding="utf-8"), where)
        return recipe_from_dict(data, where, lines)
    close = difflib.get_close_matches(Path(stem).name, names, n=3, cutoff=0.5)
    looks_like_path = raw.endswith((".yaml", ".yml")) or "/" in raw or "\\" in raw
    what = f"recipe file {raw!r} does not exist" if looks_like_path else f"unknown recipe {raw!r}"
    hint = (f"did you mean {', '.join(close)}? " if close else "") + f"built-in recipes: {', '.join(names)}"
    raise UsageError(what, hint=hint)


def list_recipes() -> list[tuple[str, str]]:
    """``(name, one-line summary)`` of every built-in recipe, sorted by name."""
    return [(name, load_recipe(name).description) for name in builtin_names()]


# -- overrides -----------------------------------------------------------------------------
def parse_override(pair: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, value)``; the value is read as YAML (``1e-3``, ``[a, b]``, ``false``, ``null``)."""
    if "=" not in pair:
        raise UsageError(f"--set {pair!r} is not key=value", hint="write it like --set lambda_dz=0.05")
    key, _, text = pair.partition("=")
    key = key.strip().replace("-", "_")
    if not key:
        raise UsageError(f"--set {pair!r} has no key before '='", hint="write it like --set lambda_dz=0.05")
    text = text.strip()
    if key == "description":
        return key, text
    try:
        value = yaml.load(text, Loader=_Loader) if text else None
    except yaml.YAMLError:
        # Shell-friendly lists of patterns: [*.fc, layer1*] is not valid YAML (aliases).
        if text.startswith("[") and text.endswith("]"):
            value = [p.strip().strip("'\"") for p in text[1:-1].split(",") if p.strip()]
        else:
            value = text  # validation says what the key wants
    return key, value


def apply_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...], origin: str = "--set") -> Recipe:
    """``recipe`` with ``key=value`` pairs applied (later pairs win), validated like a file."""
    if not overrides:
        return recipe
    data = recipe.to_dict()
    for pair in overrides:
        key, value = parse_override(pair)
        if key not in KEYS:
            raise RecipeError(f"{origin}: unknown recipe key {key!r}; {_suggest(key)}")
        data[key] = value
    return recipe_from_dict(data, origin)


# -- writing -------------------------------------------------------------------------------
def recipe_to_yaml(recipe: Recipe, header: str | None = None) -> str:
    """The recipe as YAML, every key spelled out; it loads back to an equal :class:`Recipe`.

    ``header`` becomes a ``#`` comment on top (say where the recipe came from).
    """
    body = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None, allow_unicode=True, width=10**6)
    if header:
        body = "".join(f"# {line}\n" for line in header.splitlines()) + body
    return body
