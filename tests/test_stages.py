"""The stages of ``codeq compress`` (docs/architecture.md, "The run"): each one's contract, on its own.

Each stage is called as :func:`codeq_cli.commands.compress.run` calls it, with
only what it is handed, and checked for what it promises to return. The
``Budget`` type and the one penalty are checked against hand-computed values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from codeq_cli.commands import _stages as P
from codeq_cli.commands.compress import CompressOptions
from codeq_cli.errors import UsageError
from codeq_cli.train import finish as F
from codeq_cli.train import precision, prepare
from codeq_cli.train.budget import BOPS, MAX_DROP, SIZE, Budget, KINDS
from codeq_cli.train.context import RunContext
from codeq_cli.train.objective import penalty
from conftest import make_image_folder


def _opts(data: Path, tmp: Path, **kw) -> CompressOptions:
    return CompressOptions(model="timm:test_resnet", data=data, out=tmp / "m.pt", pretrained=False, img_size=32,
                           workers=0, num_classes=3, **kw)


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The first stages, run once: plan → model → data → MACs."""
    tmp = tmp_path_factory.mktemp("stages")
    data = make_image_folder(tmp / "data")
    plan = P.resolve_plan(_opts(data, tmp, epochs=1, batch_size=6, target_bops=10.0))
    loaded = P.load(plan)
    folders = P.build_data(plan, loaded)
    return tmp, plan, P.measured(plan, loaded), folders


def test_resolve_plan_applies_the_flags_as_recipe_keys_and_names_the_budget(staged):
    tmp, plan, _, _ = staged
    assert plan.recipe.epochs == 1 and plan.recipe.batch_size == 6 and plan.recipe.target_bops == 10.0
    assert plan.budget == Budget(BOPS, 10.0)  # parsed once, from the recipe
    assert plan.run_dir == tmp / "m.run" and plan.run_dir.is_dir()
    assert plan.opts.workers == 0


def test_resolve_plan_refuses_before_any_model_is_loaded(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", per_class=2)
    import codeq_cli.models.factory as factory

    monkeypatch.setattr(factory, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(UsageError, match="exists"):
        P.resolve_plan(_opts(data, tmp_path))
    with pytest.raises(UsageError, match="needs the FP top-1"):
        P.resolve_plan(_opts(data, tmp_path, overwrite=True, max_drop=1.0, skip_baseline=True))


def test_load_and_measure_give_the_model_its_data_config_and_every_layers_macs(staged):
    _, plan, loaded, _ = staged
    convs = [n for n, m in loaded.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(loaded.macs) == sorted(convs) and all(v > 0 for v in loaded.macs.values())
    assert loaded.source.data.input_size == (3, 32, 32)
    # a 1x1 conv's MACs by hand: out channels · in channels · output pixels
    name, conv = next((n, m) for n, m in loaded.model.named_modules()
                      if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1))
    assert loaded.macs[name] % (conv.in_channels * conv.out_channels) == 0


def test_build_data_finds_the_classes_and_refuses_a_batch_larger_than_the_data(staged, tmp_path):
    tmp, plan, loaded, data = staged
    assert data.classes == ["cat", "dog", "fox"] and len(data.train_set) == 18
    big = P.resolve_plan(_opts(plan.opts.data, tmp_path, batch_size=64))
    with pytest.raises(UsageError, match="batch_size 64 is larger than the 18 training images"):
        P.build_data(big, loaded)


def test_plan_budget_measures_a_quantized_copy_and_leaves_the_model_alone(staged):
    tmp, plan, loaded, data = staged
    from codeq_cli.core.insert import quantize_
    from codeq_cli.train.measure import rel_bops
    from codeq_cli.train.recipe import quantizer_kwargs
    import copy

    describe = P.checkpoint_description(plan, loaded, data)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    bp = F.plan_budget(plan.recipe, loaded.model, loaded.macs, save_kwargs=describe(), steps=3, is_main=True)
    assert bp.budget == plan.budget and bp.run.c.kind is BOPS and bp.run.c.target == 10.0
    probe = copy.deepcopy(loaded.model)
    quantize_(probe, **quantizer_kwargs(plan.recipe))
    assert bp.start["start_rel_bops"] == pytest.approx(rel_bops(probe, loaded.macs))
    assert bp.start["reachable_rel_bops"][0] < 10.0 < bp.start["start_rel_bops"]
    after = loaded.model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)  # not quantized
    no_budget = plan.recipe.model_copy(update={"target_bops": None})
    assert F.plan_budget(no_budget, loaded.model, loaded.macs, save_kwargs=describe(), steps=3, is_main=True) is None


def test_insert_then_finish_then_write(staged, tmp_path):
    """insert → (no training) → finish → write: the written file decodes to the model finish evaluated."""
    import copy

    from codeq_cli.formats import checkpoint

    tmp, plan, loaded, data = staged
    recipe = plan.recipe.model_copy(update={"target_bops": None, "bn_reestimate": 0})
    arith, _ = precision.resolve(recipe.amp, recipe.channels_last, plan.info.device)
    ctx = RunContext(recipe, plan.info, data.train_set, data.val_set, 0, 0, arith)
    model = copy.deepcopy(loaded.model)
    names = prepare.insert_quantizers(model, ctx)
    assert sorted(names) == sorted(loaded.macs)
    with pytest.raises(UsageError, match="no layer was quantized"):
        prepare.insert_quantizers(copy.deepcopy(loaded.model),
                                  RunContext(recipe.model_copy(update={"include": ["nothing*"]}), plan.info,
                                             data.train_set, data.val_set, 0, 0, arith))
    done = F.finish(model, ctx, None, spec=loaded.source.spec, macs=loaded.macs, run_dir=tmp_path, fp_top1=50.0,
                    distilled=False)
    assert done.entry == {} and done.history is None  # no budget, no training log
    assert done.metrics["top1_drop"] == pytest.approx(50.0 - done.metrics["top1"])
    assert done.metrics["val_samples"] == len(data.val_set) and done.metrics["distill_weight_used"] == 0.0
    # the accuracy finish reports is the decoded model's, measured the one way
    decoded = F.decoded_model(model, loaded.source.spec, ctx)
    assert ctx.evaluate(decoded).top1 == done.metrics["top1"]
    describe = P.checkpoint_description(plan, loaded, data)
    saved = F.write(tmp_path / "w.pt", done, None, describe)
    assert saved.file_bytes == (tmp_path / "w.pt").stat().st_size
    ckpt = checkpoint.load(tmp_path / "w.pt")
    assert ckpt.metrics == done.metrics
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.build_model().eval()(x), decoded.eval()(x), atol=1e-5, rtol=0)


# -- the Budget type and the penalty, by hand -----------------------------------------------------------------
def test_budget_type_by_hand():
    from types import SimpleNamespace

    assert Budget.of(SimpleNamespace(target_bops=None, target_size=60000, max_drop=None)) == Budget(SIZE, 60000.0)
    assert Budget.of(SimpleNamespace(target_bops=None, target_size=None, max_drop=None)) is None
    assert [Budget(k, 4.5).label() for k in KINDS.values()] == ["4.5% BOPs", "4 B", "drop 4.5"]
    assert [k.flag for k in KINDS.values()] == ["--target-bops", "--target-size", "--max-drop"]
    m = Budget(BOPS, 8.0).flat_metrics({"achieved": 7.9, "target": 8.0, "before_trim": 9.1,
                                        "trim": {"weights_changed": 12}})
    assert m == {"budget_achieved": 7.9, "budget_target_bops": 8.0, "budget_before_trim": 9.1,
                 "budget_trimmed_weights": 12}
    assert Budget.from_metrics(m) == Budget(BOPS, 8.0)
    size = Budget(SIZE, 60000.0).flat_metrics({"achieved": 59000, "target": 60000, "before_trim": 61000.0,
                                               "trim": {"weights_changed": 3}})
    assert "budget_achieved" not in size  # the file's own length: the report reads it from the file
    drop = Budget(MAX_DROP, 1.0)
    assert drop.flat_metrics({"achieved": 3.2, "max_drop": 1.0, "best_epoch": 2}) == {
        "budget_achieved": 3.2, "budget_max_drop": 1.0, "budget_best_epoch": 2}
    assert drop.target_pair({"top1_drop": 0.4}, {}) == {"target": 1.0, "achieved": 0.4, "metric": "top1_drop"}
    assert drop.target_pair({}, {}) is None
    assert Budget.from_dict({"kind": "max_drop", "max_drop": 1.0, "met": True}) == drop
    assert drop.summary_line({"met": True, "best_epoch": 2}) == "top-1 within 1 points of FP; checkpoint from epoch 3"
    with pytest.raises(UsageError, match=r"--target-bops 4.5 is already met at the start \(4%\)"):
        Budget(BOPS, 4.5).check_reachable(1.0, 4.0)
    with pytest.raises(UsageError, match="below what the allowed bit-widths"):
        Budget(BOPS, 1.02).check_reachable(1.0, 4.0)  # within the 3% tolerance of the floor
    Budget(BOPS, 1.04).check_reachable(1.0, 4.0)
    with pytest.raises(UsageError, match=r"--target-size 500 is smaller than the float tensors and metadata alone"):
        Budget(SIZE, 500.0).check_reachable(100.0, 9000.0, size_floor=600.0)


def test_the_one_penalty_by_hand():
    dz = [torch.tensor(1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)]
    bit = [torch.tensor(3.0), torch.tensor(-1.0)]
    act = [torch.tensor(2.0)]
    # plain: 0.5·(1 + 4) + 0.25·(9 + 1) + 0.1·4
    assert float(penalty(dz, bit, 0.5, 0.25, act=act, lambda_act=0.1).detach()) == pytest.approx(2.5 + 2.5 + 0.4)
    # the controller's: p · (0.5·(1·1 + 0.5·4) + 0.25·(1·9 + 0.5·1) + 0.1·(2·4))
    got = penalty(dz, bit, 0.5, 0.25, act=act, lambda_act=0.1, weights=[1.0, 0.5], act_weights=[2.0], pressure=3.0)
    assert float(got.detach()) == pytest.approx(3.0 * (1.5 + 2.375 + 0.8))
    got.backward()
    assert float(dz[1].grad) == pytest.approx(3.0 * 0.5 * 0.5 * 2 * 2.0)  # p · λ · w · 2θ
    assert float(penalty([], [], 0.5, 0.25)) == 0.0 and float(penalty(dz, bit, 0.0, 0.0).detach()) == 0.0
