"""Recipes: strict validation with one-line messages, --set overrides, the built-ins."""

from __future__ import annotations

from importlib import resources

import re
from pathlib import Path

import pytest
import yaml
from torch import nn

from codeq_cli.errors import RecipeError, UsageError
from codeq_cli.train.recipe import (
    ALLOWED,
    KEYS,
    Recipe,
    apply_overrides,
    builtin_names,
    list_recipes,
    load_recipe,
    parse_override,
    quantizer_kwargs,
    recipe_from_dict,
    recipe_to_yaml,
)

REPO = Path(__file__).resolve().parents[1]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


# -- validation: every rule, one line naming key and value --------------------------------
INVALID = [
    # (overrides, key, value as shown in the message)
    (["bits=9"], "bits", "9"),
    (["bits=1"], "bits", "1"),
    (["bits=4.5"], "bits", "4.5"),
    (["bits=four"], "bits", "'four'"),
    (["bits=true"], "bits", "true"),
    (["b_min=1"], "b_min", "1"),
    (["b_max=9"], "b_max", "9"),
    (["b_min=6", "b_max=4"], "b_min", "6"),
    (["lambda_dz=-0.1"], "lambda_dz", "-0.1"),
    (["lambda_bit=-1"], "lambda_bit", "-1"),
    (["lambda_dz=abc"], "lambda_dz", "'abc'"),
    (["init_dz=0"], "init_dz", "0"),
    (["init_bit=-3"], "init_bit", "-3"),
    (["quantile=0"], "quantile", "0"),
    (["quantile=1.5"], "quantile", "1.5"),
    (["quantile=-0.2"], "quantile", "-0.2"),
    (["mode=half"], "mode", "'half'"),
    (["optimizer=adam"], "optimizer", "'adam'"),
    (["schedule=linear"], "schedule", "'linear'"),
    (["lr=0"], "lr", "0"),
    (["lr=-1e-3"], "lr", "-0.001"),
    (["lr=.inf"], "lr", ".inf"),
    (["lr=.nan"], "lr", ".nan"),
    (["lr_dz=-1e-4"], "lr_dz", "-0.0001"),
    (["lr_bit=-1"], "lr_bit", "-1"),
    (["momentum=1"], "momentum", "1"),
    (["weight_decay=-0.01"], "weight_decay", "-0.01"),
    (["weight_decay_dz=-1"], "weight_decay_dz", "-1"),
    (["weight_decay_bit=-1"], "weight_decay_bit", "-1"),
    (["epochs=0"], "epochs", "0"),
    (["epochs=2.5"], "epochs", "2.5"),
    (["warmup_epochs=-1"], "warmup_epochs", "-1"),
    (["epochs=3", "warmup_epochs=3"], "warmup_epochs", "3.0"),
    (["min_lr=-1"], "min_lr", "-1"),
    (["min_lr=0.5"], "min_lr", "0.5"),
    (["batch_size=0"], "batch_size", "0"),
    (["batch_size=64.0"], "batch_size", "64.0"),
    (["label_smoothing=1"], "label_smoothing", "1"),
    (["label_smoothing=-0.1"], "label_smoothing", "-0.1"),
    (["grad_clip=0"], "grad_clip", "0"),
    (["grad_clip=-1"], "grad_clip", "-1"),
    (["include=[]"], "include", "[]"),
    (["include=[1.10, 2]"], "include", "[1.1, 2]"),
    (["include=[true]"], "include", "[true]"),
    (["exclude={a: 1}"], "exclude", "{'a': 1}"),
    (["exclude=['']"], "exclude", "['']"),
    (["crop_scale=[0.9, 0.1]"], "crop_scale", "[0.9, 0.1]"),
    (["crop_scale=[0, 1]"], "crop_scale", "[0.0, 1.0]"),
    (["crop_scale=[0.1]"], "crop_scale", "[0.1]"),
    (["crop_scale=0.5"], "crop_scale", "0.5"),
    (["hflip=maybe"], "hflip", "'maybe'"),
    (["amp=1"], "amp", "1"),
    (["channels_last=null"], "channels_last", "null"),
    (["sync_bn=2"], "sync_bn", "2"),
    (["eval_every=0"], "eval_every", "0"),
    (["description=[a, b]"], None, None),  # description is taken verbatim: always valid
]


@pytest.mark.parametrize("overrides,key,shown", INVALID, ids=[" ".join(c[0]) for c in INVALID])
def test_invalid_value_is_one_line_naming_key_and_value(overrides, key, shown):
    base = load_recipe("mixed")
    if key is None:
        assert apply_overrides(base, overrides).description == "[a, b]"
        return
    with pytest.raises(RecipeError) as info:
        apply_overrides(base, overrides)
    msg = _one_line(info.value)
    assert info.value.exit_code == 2
    assert msg.startswith("--set: ")
    assert f"{key}={shown}" in msg, msg
    # what is allowed (or what to change) is said
    assert " must be " in msg or "lower" in msg or "would quantize no layer" in msg or "quote" in msg


@pytest.mark.parametrize("overrides,key,shown", [c for c in INVALID if c[1]], ids=[" ".join(c[0]) for c in INVALID if c[1]])
def test_invalid_value_in_a_file_names_file_and_line(tmp_path, overrides, key, shown):
    lines = ["# a comment", "epochs: 10"]
    for pair in overrides:
        k, _, v = pair.partition("=")
        if k == "epochs":
            lines[1] = f"epochs: {v}"
        else:
            lines.append(f"{k}: {v}")
    path = tmp_path / "r.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = _one_line(info.value)
    line = next(i + 1 for i, text in enumerate(lines) if text.startswith(f"{key}:"))
    assert msg.startswith(f"{path}:{line}: "), msg
    assert f"{key}={shown}" in msg


def test_every_key_says_what_is_allowed():
    assert set(ALLOWED) == set(KEYS)


def test_unknown_key_suggests_the_nearest(tmp_path):
    with pytest.raises(RecipeError) as info:
        apply_overrides(load_recipe("mixed"), ["lamda_dz=0.1"])
    assert _one_line(info.value) == "--set: unknown recipe key 'lamda_dz'; did you mean 'lambda_dz'?"
    path = tmp_path / "r.yaml"
    path.write_text("lr: 1.0e-4\nlamda_dz: 0.1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert _one_line(info.value) == f"{path}:2: unknown recipe key 'lamda_dz'; did you mean 'lambda_dz'?"


def test_unknown_key_without_a_near_one_points_to_the_docs():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"zzzzzz": 1}, "my.yaml")
    msg = _one_line(info.value)
    assert "unknown recipe key 'zzzzzz'" in msg and "docs/recipes.md" in msg


def test_several_problems_are_condensed_to_the_first():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"bits": 99, "lr": -1, "epochs": 0})
    msg = _one_line(info.value)
    assert "bits=99" in msg and "(+2 more keys with problems)" in msg


# -- YAML files ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("", r"is empty"),
        ("# only a comment\n", r"is empty"),
        ("- lr\n- bits\n", r"holds a list at the top level"),
        ("hello\n", r"holds a single value at the top level"),
        ("lr: 1.0\nlr: 2.0\n", r":2: recipe key 'lr' is given twice \(first on line 1\)"),
        ("1: 2\n", r"key 1 is not a name"),
    ],
)
def test_malformed_files(tmp_path, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert re.search(expected, _one_line(info.value))


@pytest.mark.parametrize(
    "text,line",
    [
        ("lr: 1.0e-4\nbits: [4\n", 3),
        ("lr: 1\n  bits: 4\n", 2),
        ("lr: 1\n---\nlr: 2\n", 2),
        ("epochs: 1\ninclude: [*fc]\n", 2),
    ],
)
def test_yaml_syntax_error_gives_file_and_line(tmp_path, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = _one_line(info.value)
    assert msg.startswith(f"{path}:{line}:") and "YAML syntax error" in msg


def test_alias_error_suggests_quoting(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("include: [*fc]\n")
    with pytest.raises(RecipeError, match="quote patterns"):
        load_recipe(path)


def test_partial_file_takes_the_defaults_and_reads_1e_minus_3(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("lambda_dz: 0.1\nlr: 1e-3\nmode: FIXED\ninclude: layer1*\n")
    r = load_recipe(path)
    assert r.lambda_dz == 0.1 and r.lr == 1e-3 and r.mode == "fixed" and r.include == ["layer1*"]
    assert r.epochs == Recipe().epochs


def test_existing_file_wins_over_builtin_name(tmp_path, monkeypatch):
    (tmp_path / "mixed.yaml").write_text("epochs: 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe("mixed.yaml").epochs == 3
    assert load_recipe("mixed").epochs == 10  # no such file: the built-in


def test_folder_and_missing_paths(tmp_path):
    with pytest.raises(UsageError, match="is a folder"):
        load_recipe(tmp_path)
    with pytest.raises(UsageError, match=r"recipe file '.*nope.yaml' does not exist; built-in recipes: fixed4, int8, mixed"):
        load_recipe(tmp_path / "nope.yaml")


def test_unknown_name_lists_builtins_and_close_matches():
    with pytest.raises(UsageError) as info:
        load_recipe("mixd")
    msg = _one_line(info.value)
    assert msg.startswith("unknown recipe 'mixd'; did you mean mixed")
    for name in builtin_names():
        assert name in msg
    with pytest.raises(UsageError, match="did you mean resnet18-imagenet"):
        load_recipe("resnet18")


# -- --set -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pair,key,value",
    [
        ("lr=1e-3", "lr", 1e-3),
        ("lr=1.5E-4", "lr", 1.5e-4),
        ("lambda_dz=0", "lambda_dz", 0.0),
        ("include=[layer1*,fc]", "include", ["layer1*", "fc"]),
        ("include=[*.fc, 'layer1*']", "include", ["*.fc", "layer1*"]),
        ("exclude=fc", "exclude", ["fc"]),
        ("exclude=*fc", "exclude", ["*fc"]),
        ("exclude=null", "exclude", None),
        ("exclude=[3, fc]", "exclude", ["3", "fc"]),
        ("exclude=0", "exclude", ["0"]),
        ("amp=false", "amp", False),
        ("grad_clip=", "grad_clip", None),
        ("grad_clip=1.0", "grad_clip", 1.0),
        ("mode=fixed", "mode", "fixed"),
        ("batch-size=64", "batch_size", 64),
        (" epochs = 2 ", "epochs", 2),
        ("crop_scale=[0.5, 1]", "crop_scale", (0.5, 1.0)),
        ("description=a: b = c", "description", "a: b = c"),
    ],
)
def test_set_parses_yaml_scalars(pair, key, value):
    r = apply_overrides(load_recipe("mixed"), [pair])
    assert getattr(r, key) == value


def test_set_later_pairs_win_and_the_original_is_untouched():
    base = load_recipe("mixed")
    r = apply_overrides(base, ["epochs=3", "epochs=5"])
    assert r.epochs == 5 and base.epochs == 10
    assert apply_overrides(base, []) is base


@pytest.mark.parametrize("pair", ["epochs", "lr 1e-3", "=3", ""])
def test_malformed_set_pair_is_a_one_line_usage_error(pair):
    with pytest.raises(UsageError) as info:
        apply_overrides(load_recipe("mixed"), [pair])
    assert info.value.exit_code == 2
    msg = _one_line(info.value)
    assert msg.startswith("--set ") and "write it like --set lambda_dz=0.05" in msg


def test_parse_override_returns_key_and_value():
    assert parse_override("include=[a, b]") == ("include", ["a", "b"])
    assert parse_override("lr=3e-4") == ("lr", 3e-4)


def test_set_origin_can_name_another_flag():
    with pytest.raises(RecipeError, match=r"^--epochs: epochs=0 is out of range"):
        apply_overrides(load_recipe("mixed"), ["epochs=0"], origin="--epochs")


def test_recipe_is_frozen_and_accepts_python_values():
    r = Recipe(include=("layer1*",), crop_scale=[0.2, 1.0])
    assert r.include == ["layer1*"] and r.crop_scale == (0.2, 1.0)
    with pytest.raises(Exception):
        r.lr = 1.0  # type: ignore[misc]


# -- built-ins ---------------------------------------------------------------------------------
# The paper's table (docs/method.md, "The paper's presets and results"): λ_dz, λ_bit, epochs, batch, logit lr.
PAPER = {
    "resnet18-imagenet-mixed": ("mixed", 0.02, 0.1, 120, 512, 1e-4),
    "resnet18-imagenet-fixed4": ("fixed", 0.02, None, 120, 512, 1e-4),
    "resnet50-imagenet-mixed": ("mixed", 0.02, 0.05, 120, 256, 1e-4),
    "vit-cifar10-mixed": ("mixed", 0.5, 0.75, 200, 128, 1e-3),
}


def test_builtins_are_the_expected_set():
    assert builtin_names() == sorted(["fixed4", "int8", "mixed", *PAPER])


@pytest.mark.parametrize("name", sorted(["fixed4", "int8", "mixed", *PAPER]))
def test_every_builtin_loads_under_every_spelling(name):
    r = load_recipe(name)
    assert load_recipe(f"{name}.yaml") == r
    assert load_recipe(REPO / "recipes" / f"{name}.yaml") == r  # the top-level symlink
    assert load_recipe(REPO / "codeq_cli" / "recipes" / f"{name}.yaml") == r
    assert r.description and "\n" not in r.description
    assert r.schedule == "cosine" and r.optimizer == "adamw"
    assert f"description: \"{r.description}\"" in resources.files("codeq_cli").joinpath("recipes", f"{name}.yaml").read_text()


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_match_the_paper_table(name):
    mode, lam_dz, lam_bit, epochs, batch, logit_lr = PAPER[name]
    r = load_recipe(name)
    assert r.mode == mode
    assert r.lambda_dz == lam_dz
    if lam_bit is not None:
        assert r.lambda_bit == lam_bit
    else:
        assert r.bits == 4
    assert (r.epochs, r.batch_size) == (epochs, batch)
    assert r.lr_dz == r.lr_bit == logit_lr
    assert (r.b_min, r.b_max, r.init_dz, r.init_bit, r.quantile) == (2, 8, 3.0, 3.0, 0.99)
    assert r.include is None and r.exclude is None  # first and last layers quantized too


def test_vit_preset_uses_adamw_3e_4():
    r = load_recipe("vit-cifar10-mixed")
    assert (r.optimizer, r.lr) == ("adamw", 3e-4)


def test_general_recipes_compress_faster_than_the_paper_regime():
    paper = load_recipe("resnet18-imagenet-mixed")
    for name in ("mixed", "fixed4"):
        r = load_recipe(name)
        assert r.lambda_dz > paper.lambda_dz
        assert r.lr_dz > paper.lr_dz and r.lr_bit > paper.lr_bit
        assert r.epochs < paper.epochs
    assert load_recipe("mixed").lambda_bit > paper.lambda_bit
    assert load_recipe("fixed4").mode == "fixed" and load_recipe("fixed4").bits == 4


def test_mixed_builtin_is_the_default_recipe():
    assert load_recipe("mixed") == Recipe()


def test_list_recipes():
    items = dict(list_recipes())
    # Every YAML file that ships, by name, sorted; each summary is the file's own description line.
    assert list(items) == sorted(["fixed4", "int8", "mixed", *PAPER])
    assert items["mixed"] == ("Mixed precision for a short fine-tune of a pretrained model: learned dead zones "
                              "and bit-widths (2-8)")
    assert items["resnet18-imagenet-fixed4"].startswith("Paper: ResNet-18 (pretrained) on ImageNet, 4-bit")
    assert all(summary and "\n" not in summary for summary in items.values())


@pytest.mark.parametrize("name", sorted(["fixed4", "int8", "mixed", *PAPER]))
def test_yaml_round_trip(tmp_path, name):
    r = apply_overrides(load_recipe(name), ["include=[layer1*]", "grad_clip=2"])
    text = recipe_to_yaml(r, header="resolved from test\nsecond line")
    assert text.startswith("# resolved from test\n# second line\n")
    data = yaml.safe_load(text)
    assert list(data) == list(KEYS)  # every key, in order
    path = tmp_path / "out.yaml"
    path.write_text(text)
    assert load_recipe(path) == r
    assert r.to_dict() == data


def test_keys_are_documented():
    doc = (REPO / "docs" / "recipes.md").read_text()
    for key in KEYS:
        assert re.search(rf"^\| `{key}` \|", doc, re.M), f"{key} missing from docs/recipes.md"


# -- quantizer arguments -----------------------------------------------------------------------
def test_quantizer_kwargs_fixed_and_mixed():
    mixed = load_recipe("mixed")
    kw = quantizer_kwargs(mixed)
    assert kw == {"bits": None, "b_min": 2, "b_max": 8, "init_dz": 3.0, "init_bit": 3.0, "quantile": 0.99}
    assert quantizer_kwargs(load_recipe("fixed4"))["bits"] == 4
    assert quantizer_kwargs(apply_overrides(mixed, ["mode=fixed", "bits=3"]))["bits"] == 3


def test_quantizer_kwargs_feed_quantize_():
    from codeq_cli.core.insert import quantize_, quantized_weights

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(__import__("torch").zeros(1, 3, 6, 6))
    r = apply_overrides(load_recipe("mixed"), ["exclude=[3]", "b_min=3", "init_dz=2.0"])
    wrapped = quantize_(model, **quantizer_kwargs(r), include=r.include, exclude=r.exclude)
    assert wrapped == ["0"]
    (qw,) = list(quantized_weights(model))
    assert qw.quantizer.mixed and qw.quantizer.b_min == 3 and qw.quantizer.theta_dz.item() == 2.0


def test_int8_preset_is_mixed_with_8_bit_activations_and_6_bit_weights_on_the_exports_grid():
    # Trained as `codeq export --format onnx-int8` deploys it (docs/deploy.md): every other key is mixed's.
    int8 = load_recipe("int8").to_dict()
    mixed = apply_overrides(load_recipe("mixed"), ["act_bits=8", "b_max=6", "weight_grid=reduce-range"]).to_dict()
    assert {k: v for k, v in int8.items() if mixed[k] != v} == {"description": int8["description"]}
    assert load_recipe("mixed").b_max == 8 and load_recipe("mixed").act_bits is None  # the default is unchanged
    assert load_recipe("mixed").weight_grid is None
    assert quantizer_kwargs(load_recipe("int8"))["grid"] == 63 and "grid" not in quantizer_kwargs(load_recipe("mixed"))


@pytest.mark.parametrize(("sets", "message"), [
    (["weight_grid=reduce-range"], "b_max=8 is above 6, the widest weights whose levels fit weight_grid=reduce-range; "
                                   "lower b_max to 6 or use weight_grid: full-range"),
    (["weight_grid=full-range"], "b_max=8 is above 7, the widest weights whose levels fit weight_grid=full-range; "
                                 "lower b_max to 7"),
    (["mode=fixed", "bits=7", "weight_grid=reduce-range"], "bits=7 is above 6"),
    (["weight_grid=int8"], "weight_grid='int8'"),
])
def test_weight_grid_needs_levels_that_fit_it(sets, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        apply_overrides(load_recipe("mixed"), sets)


def test_weight_grid_accepts_the_widest_weights_that_fit():
    assert apply_overrides(load_recipe("mixed"), ["b_max=7", "weight_grid=full-range"]).weight_grid == "full-range"
    assert apply_overrides(load_recipe("fixed4"), ["weight_grid=reduce-range"]).weight_grid == "reduce-range"
