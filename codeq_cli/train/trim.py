"""The final trim: the figure moved so that it lands just under the target.

``docs/method.md``, "Compressing to a budget" (codeq's extension). Online
control leaves the figure near the target, not within a guaranteed ±3%: the
figure is a step function of the codes and the weights keep moving. After
training, the trim brings it into ``[target·(1 − 3%), target]``, aiming at
``target·(1 − 0.5%)``.

``C_ℓ`` is a layer's dense cost (``bits · act_bits · MACs`` for BOPs, with
``act_bits`` the layer's input width, 32 for float inputs; ``bits · params``
for the size): zeroing one of its ``n_ℓ`` weights frees ``C_ℓ / n_ℓ``.

Too costly (the usual case: the controller lags a little): the kept weights
that cost the task least per unit of the figure are set to zero, the fewest
that land it, found by bisection on the exact figure (codes encoded, BOPs
counted, or bytes coded). A weight's score is ``F·w² / (C_ℓ/n_ℓ)``, the loss
Optimal Brain Damage estimates it adds when zeroed, with ``F`` the Fisher
information of :mod:`codeq_cli.train.saliency`; ties, and every weight when
no Fisher information is given, go by the energy per cost ``(w/rms_ℓ)²/C_ℓ``.
Nothing else moves: not ``θ_dz``, not the range ``R`` (only weights below the
order statistic that ``R`` is taken from are candidates), so every other
weight keeps its level. (Until 2026-12-07 the trim ranked by energy alone and
raised the layers' dead zones, which also respaced every level of each layer
it touched, ``s = (R − d/2)/(Q − 1/2)``; on EfficientNet-Lite0 the energy
score's choice cost 20.9 points before batch-norm re-estimation where
Fisher's cost none: ``docs/method.md``, "The final trim".)

Too cheap (the controller overshot): a weight once pruned carries no
information to restore, so the dead zones are lowered: a layer's dead zone
of half-width ``t`` has the energy score ``(t/rms_ℓ)²/C_ℓ``; every one above a
global level ``τ`` is lowered to ``τ`` (``θ_dz = atanh(1 − t/R)``), ``τ``
found by bisection on the exact figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from codeq_cli.core.act_quant import act_bits
from codeq_cli.core._select import quantile_rank
from codeq_cli.core.bops import A_BITS
from codeq_cli.core.insert import quantized_weights
from codeq_cli.train.budget import Figure

AIM = 0.995  # land half a percent under the target


@torch.no_grad()
def trim(model: nn.Module, macs: dict[str, int], kind: Figure, target: float, figure: Callable[[], float], *,
         tolerance: float = 0.03, aim: float = AIM, saliency: Callable[[], dict[str, torch.Tensor]] | None = None) -> dict:
    """Prune (or relax dead zones) until ``figure()`` lies in ``[target·(1 − tolerance), target]``.

    ``kind`` is the figure trimmed (BOPs or the file's bytes): it prices each layer's weights.
    ``saliency()`` gives each layer's Fisher information (:func:`codeq_cli.train.saliency.fisher`),
    asked only when weights are to be pruned; without it the weights' energy stands in.
    Returns what was done: the figure before and after, the direction, and how
    many weights changed between pruned and kept.
    """
    before = figure()
    report = {"trimmed": False, "before": before, "after": before, "direction": None, "weights_changed": 0}
    if target * (1 - tolerance) <= before <= target:
        return report
    down = before > target
    layers = _layers(model, macs, kind)
    if not layers:
        return report
    if down:
        changed = _prune_lowest(layers, figure, target * aim, None if saliency is None else saliency())
    else:
        changed = _relax_dead_zones(layers, figure, target * aim)
    report.update(trimmed=True, after=figure(), direction="down" if down else "up", weights_changed=changed)
    return report


@dataclass
class _Layer:
    name: str
    qz: nn.Module  # the layer's weight quantizer
    w: torch.Tensor  # its float weight (the parameter itself)
    mags: torch.Tensor  # |w| sorted, float64 on the CPU
    R: float
    half: float  # the dead zone's half-width d/2: |w| ≤ half is pruned
    cost: float  # the layer's dense cost C_ℓ
    rms: float


def _layers(model: nn.Module, macs: dict[str, int], kind: Figure) -> list[_Layer]:
    out = []
    abits = act_bits(model)
    for qw in quantized_weights(model):
        qz, w = qw.quantizer, qw.original.detach()
        R_t = qz.absmax(w)
        R = float(R_t)
        if R <= 0:
            continue
        _, d, _, _ = qz._scalars(R_t, w.dtype)
        cost = kind.layer_cost(int(qz.bit_width()), abits.get(qw.name, A_BITS), macs.get(qw.name, 0), w.numel())
        if cost <= 0:
            continue
        mags = w.abs().reshape(-1).double().cpu().sort().values
        out.append(_Layer(qw.name, qz, w, mags, R, float(d) / 2, cost, float(mags.square().mean().sqrt()) or R))
    return out


def _smallest(n: int, good: Callable[[int], bool]) -> int:
    """The smallest ``i`` in ``[0, n]`` with ``good(i)`` (``good`` monotone; ``n`` when none is)."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if good(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _prune_lowest(layers: list[_Layer], figure: Callable[[], float], goal: float,
                  fisher: dict[str, torch.Tensor] | None) -> int:
    """Zero the kept weights that cost the task least per unit of the figure, the fewest that bring ``figure()`` to
    ``goal``; returns how many.

    A weight's score is ``F·w² / (C_ℓ/n_ℓ)``: the loss it is estimated to add
    when zeroed (:mod:`codeq_cli.train.saliency`) over the cost it frees; ties
    (``F = 0``: a weight no image reaches) go by ``(w/rms_ℓ)²/C_ℓ``, which
    alone ranks them when there is no Fisher information. Candidates are the
    kept weights (``|w| > d/2``) strictly below the order statistic ``R`` is
    interpolated from: zeroing them leaves every larger weight's rank, hence
    ``R``, ``s``, ``δ`` and every other level, unchanged.
    """
    places, values, keys = [], [], []
    for layer in layers:
        n, q = layer.mags.numel(), float(layer.qz.quantile)
        below = min(quantile_rank(n, q)[0], quantile_rank(n, q, True)[0])  # the rank as on the CPU or off it
        a = float(layer.mags[below])
        m = layer.w.abs()
        where = ((m > layer.half) & (m < a)).nonzero(as_tuple=True)
        v = layer.w[where].clone()
        energy = (v.abs().double().cpu() / layer.rms).square() / layer.cost
        f = fisher.get(layer.name) if fisher is not None else None
        first = energy if f is None else f[where].double().cpu() * v.double().cpu().square() * (n / layer.cost)
        places.append(where)
        values.append(v)
        keys.append(torch.stack([first, energy], 1))
    if not sum(v.numel() for v in values):
        return 0
    # each candidate's place in the order of (score, energy); equal keys share a place and go together
    _, rank = torch.unique(torch.cat(keys), dim=0, return_inverse=True)
    ranks = rank.split([v.numel() for v in values])
    top = int(rank.max()) + 1

    def apply(i: int) -> int:
        cut_total = 0
        for layer, where, v, r in zip(layers, places, values, ranks):
            cut = (r < i).to(v.device)
            cut_total += int(cut.sum())
            layer.w.index_put_(where, torch.where(cut, torch.zeros_like(v), v))
        return cut_total

    def fits(i: int) -> bool:
        apply(i)
        return figure() <= goal

    return apply(_smallest(top + 1, fits))  # top + 1 when none fits: every candidate, the most it can do


def _relax_dead_zones(layers: list[_Layer], figure: Callable[[], float], goal: float) -> int:
    """Lower every layer's dead-zone score above a level τ to τ: the lowest τ whose figure stays at most ``goal``."""
    base = []
    for layer in layers:
        sigma0 = (min(layer.half, layer.R) / layer.rms) ** 2 / layer.cost
        base.append((sigma0, float(layer.qz.theta_dz), int((layer.mags <= layer.half).sum())))
    # every weight up to its layer's range R (beyond it the dead zone cannot reach)
    scores = torch.cat([(l.mags[l.mags <= l.R] / l.rms).square() / l.cost for l in layers]).sort().values

    def apply(tau: float) -> None:
        for layer, (sigma0, theta0, _) in zip(layers, base):
            if tau >= sigma0:
                layer.qz.theta_dz.fill_(theta0)
                continue
            limit = min(layer.R, layer.rms * math.sqrt(tau * layer.cost))
            # the threshold halfway between the last weight to prune and the next one
            k = int(torch.searchsorted(layer.mags, torch.tensor(limit, dtype=layer.mags.dtype), right=True))
            lo = float(layer.mags[k - 1]) if k > 0 else 0.0
            hi = float(layer.mags[k]) if k < len(layer.mags) else layer.R
            layer.qz.set_threshold(min(layer.R, 0.5 * (lo + hi) if k < len(layer.mags) else layer.R), layer.R)

    # g(i) = the figure with τ = scores[i]: falling in i (a lower τ relaxes more). The smallest i with
    # g(i) ≤ goal relaxes most without passing it; if every τ passes it, the last one (the least relaxed).
    def fits(j: int) -> bool:
        apply(float(scores[j]))
        return figure() <= goal

    i = min(_smallest(len(scores), fits), len(scores) - 1)
    apply(float(scores[i]))
    changed = 0
    for layer, (_, _, pruned0) in zip(layers, base):
        _, d, _, _ = layer.qz._scalars(torch.tensor(layer.R, dtype=torch.float32), torch.float32)
        changed += abs(int((layer.mags <= float(d) / 2).sum()) - pruned0)
    return changed
