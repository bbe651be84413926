"""Kernel launches and host syncs of a quantized training step (issue 22), counted on CPU.

Under ``CODEQ_KERNELS=torch`` the CPU runs the operations a GPU runs
(:func:`codeq_cli.core._kernels.gpu_path`); a ``TorchDispatchMode`` counts them
with the rule of ``bench/launches.py``. The quantizer's extra launches must not
grow with the number of layers, and a quantized forward and backward must not
read anything back to the host.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from codeq_cli import quantize_
from codeq_cli.core import _kernels

_NO_LAUNCH = {"detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
              "new_empty_strided", "_local_scalar_dense"}
_SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "bincount", "equal", "is_nonzero"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = collections.Counter()
        self.syncs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in _SYNC:
            self.syncs[name] += 1
        if not (func.is_view or name in _NO_LAUNCH or name.startswith(("sym_", "is_"))):
            self.launches[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def gpu_path(monkeypatch):
    monkeypatch.setenv("CODEQ_KERNELS", "torch")
    _kernels._numba.cache_clear()
    assert _kernels.gpu_path() and not _kernels.usable(torch.zeros(3))
    yield
    monkeypatch.delenv("CODEQ_KERNELS", raising=False)
    _kernels._numba.cache_clear()


def _net(layers: int) -> nn.Module:
    body = []
    for i in range(layers):
        body += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _step_counts(layers: int, bits, quantized: bool) -> _Count:
    torch.manual_seed(0)
    model = _net(layers)
    if quantized:
        quantize_(model, bits=bits)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    counter = _Count()
    with counter:
        nn.functional.cross_entropy(model(x), y).backward()
    return counter


@pytest.mark.parametrize("bits", [None, 4])
def test_quantizer_launches_do_not_grow_with_the_number_of_layers(gpu_path, bits):
    extra = {}
    for layers in (2, 7):
        plain = sum(_step_counts(layers, bits, False).launches.values())
        counted = _step_counts(layers, bits, True)
        extra[layers] = sum(counted.launches.values()) - plain
        assert not counted.syncs, f"host syncs in a quantized forward and backward: {dict(counted.syncs)}"
    assert extra[2] > 0  # the counter sees the quantizer
    assert extra[7] == extra[2], f"extra launches by layer count: {extra}"


def test_the_per_layer_path_would_fail_this_test(gpu_path, monkeypatch):
    """The check above can fail: each layer on its own (as before the one-pass quantizer) grows."""
    from codeq_cli.core.quantizer import DeadZoneQuantizer

    monkeypatch.setattr(DeadZoneQuantizer, "forward", DeadZoneQuantizer.forward_per_layer)
    extra = {n: sum(_step_counts(n, 4, True).launches.values()) - sum(_step_counts(n, 4, False).launches.values())
             for n in (2, 7)}
    assert extra[7] > extra[2]


def test_a_logging_step_reads_every_layer_back_at_once(gpu_path, monkeypatch):
    """``bops_rows`` (the logging step's figures) encodes all layers with one read back to the host."""
    from codeq_cli.core.bops import bops_rows, measure_macs
    from codeq_cli.core.insert import quantized_weights

    torch.manual_seed(0)
    model = _net(6)
    quantize_(model, bits=None)
    macs = measure_macs(model, (3, 8, 8))
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (reads.append(t.shape), real(t))[1])
    counter = _Count()
    with counter:
        rows = bops_rows(model, macs)
    assert len(reads) == 1 and not counter.syncs, (reads, dict(counter.syncs))
    monkeypatch.setattr(torch.Tensor, "tolist", real)
    for row, qw in zip(rows, quantized_weights(model)):
        e = qw.quantizer.encode(qw.original)  # each layer on its own agrees
        assert (row.name, row.bits) == (qw.name, e.bits)
        assert row.sparsity == 1.0 - int(torch.count_nonzero(e.codes)) / e.codes.numel()


def _controller_counts(layers: int) -> _Count:
    """The budget controller's work in one non-measuring step, as Fit does it: its penalty (forward and
    backward), the logits' copy before the optimizer step and the kept shares after it."""
    from codeq_cli.core.bops import measure_macs
    from codeq_cli.core.insert import quantizer_parameters
    from codeq_cli.train.budget import BOPS
    from codeq_cli.train.controller import BudgetRun, Controller
    from codeq_cli.train.measure import rel_bops

    torch.manual_seed(0)
    model = _net(layers)
    macs = measure_macs(model, (3, 8, 8))
    quantize_(model, bits=None)
    start = rel_bops(model, macs)
    run = BudgetRun(Controller(BOPS, start / 4, start, 100, every=5), macs)
    run.after_step(model, 5, 100)  # a measurement: per-layer weights and rates from here on
    logits = (*quantizer_parameters(model), [])
    opt = torch.optim.SGD([p for g in logits for p in g], lr=0.1, foreach=True)
    counter = _Count()
    with counter:
        run.penalty(*logits[:2], 0.02, 0.1).backward()
        before = run.before_step(logits)
        opt.step()
        run.after_optimizer_step(before, logits)
    return counter


def test_the_budget_controller_adds_no_host_sync_and_no_launch_per_layer(gpu_path):
    """Issue 22, point 3: between measurements the controller decides on the device (it used to read
    one bool() per logit and copy its weights to the device at every step)."""
    a, b = _controller_counts(2), _controller_counts(7)
    assert not a.syncs and not b.syncs, f"host syncs in the controller's step: {dict(b.syncs)}"
    assert sum(a.launches.values()) > 0
    # the stacks of the logits cost the same few launches for 3 layers as for 8 (the SGD step is one foreach)
    assert sum(b.launches.values()) == sum(a.launches.values()), (dict(a.launches), dict(b.launches))


def _loss_step(layers: int, stacked: bool) -> tuple[_Count, list[torch.Tensor]]:
    """Forward, cross-entropy plus ``train/``'s penalty, backward: counts and the logits' gradients.
    ``stacked``: the penalty on the one-pass quantizer's logit vectors (what ``Fit`` does), else on
    the parameters stacked again."""
    from codeq_cli.core.insert import quantized_weights, quantizer_parameters
    from codeq_cli.train.objective import current_logits, penalty

    torch.manual_seed(0)
    model = _net(layers)
    quantize_(model, bits=None)
    params = quantizer_parameters(model)
    qzs = [qw.quantizer for qw in quantized_weights(model)]
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    counter = _Count()
    with counter:
        out = model(x)
        dz, bit = current_logits(qzs, params) if stacked else params
        (nn.functional.cross_entropy(out, y) + penalty(dz, bit, 0.02, 0.1)).backward()
    return counter, [p.grad for g in params for p in g]


def test_the_penalty_on_the_passs_logit_vectors_adds_no_launch_per_layer(gpu_path):
    """Issue 22: each logit gets one gradient (the quantizer's and the penalty's meet in one vector),
    the same values as the penalty on the parameters, which adds one per logit."""
    counts = {(n, s): _loss_step(n, s) for n in (2, 7) for s in (True, False)}
    launches = {k: sum(c.launches.values()) for k, (c, _) in counts.items()}
    assert launches[7, True] - launches[2, True] == launches[7, False] - launches[2, False] - 2 * 5, launches
    plain = {n: sum(_step_counts(n, None, False).launches.values()) for n in (2, 7)}
    assert launches[7, True] - plain[7] == launches[2, True] - plain[2], (launches, plain)
    for n in (2, 7):
        for a, b in zip(counts[n, True][1], counts[n, False][1]):
            assert torch.equal(a, b)
