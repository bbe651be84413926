"""The final trim: dead zones moved so that the figure lands just under the target.

``docs/method.md``, "Compressing to a budget" (codeq's extension). Online
control leaves the figure near the target, not within a guaranteed ±3%: the
figure is a step function of the codes and the weights keep moving. After
training, the trim sets the dead-zone logits deterministically so that the
figure lies in ``[target·(1 − 3%), target]``, aiming at ``target·(1 − 0.5%)``.

Each weight gets a score ``(w² / ‖w_ℓ‖²) / (C_ℓ / n_ℓ)``: the share of its
layer's energy it carries (the layer's relative error if it is pruned) over
what it costs, ``C_ℓ / n_ℓ`` with ``C_ℓ`` the layer's dense cost
(``bits · act_bits · MACs`` for BOPs, with ``act_bits`` the layer's input
width, 32 for float inputs; ``bits · params`` for the size). Up to a
constant that is ``(w/rms_ℓ)² / C_ℓ``. (A first version divided by the
layer's range ``R_ℓ²`` and by the cost per weight instead; on the demo it
pruned the early, high-resolution convolutions, whose few weights each cost
many MACs, to 99% and lost 70 points: per weight they looked cheap.)
A layer's current dead zone corresponds to a score ``σ_ℓ``. Trimming down (too
costly) raises every ``σ_ℓ`` below a global level ``τ`` to ``τ``, so the layers
where pruning is cheapest give first; trimming up (too cheap) lowers every
``σ_ℓ`` above ``τ`` to ``τ``. ``τ`` runs over the sorted scores and is found by
bisection on the exact figure (codes encoded, BOPs counted, or bytes coded).
Only ``θ_dz`` changes: ``θ_dz = atanh(1 − t/R)`` for the threshold ``t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from codeq_cli.core.act_quant import act_bits
from codeq_cli.core.bops import A_BITS
from codeq_cli.core.insert import quantized_weights
from codeq_cli.train.budget import Figure

AIM = 0.995  # land half a percent under the target


@torch.no_grad()
def trim(model: nn.Module, macs: dict[str, int], kind: Figure, target: float, figure: Callable[[], float], *,
         tolerance: float = 0.03, aim: float = AIM) -> dict:
    """Move the dead zones of ``model`` until ``figure()`` lies in ``[target·(1 − tolerance), target]``.

    ``kind`` is the figure trimmed (BOPs or the file's bytes): it prices each layer's weights.
    Returns what was done: the figure before and after, the direction, and how
    many weights changed between pruned and kept.
    """
    before = figure()
    report = {"trimmed": False, "before": before, "after": before, "direction": None, "weights_changed": 0}
    if target * (1 - tolerance) <= before <= target:
        return report
    down = before > target
    layers = []
    abits = act_bits(model)
    for qw in quantized_weights(model):
        qz, w = qw.quantizer, qw.original.detach()
        R_t = qz.absmax(w)
        R = float(R_t)
        if R <= 0:
            continue
        _, d, _, _ = qz._scalars(R_t, w.dtype)
        bits = int(qz.bit_width())
        cost = kind.layer_cost(bits, abits.get(qw.name, A_BITS), macs.get(qw.name, 0), w.numel())
        if cost <= 0:
            continue
        mags = w.abs().reshape(-1).double().cpu().sort().values
        rms = float(mags.square().mean().sqrt()) or R
        sigma0 = (min(float(d) / 2, R) / rms) ** 2 / cost
        layers.append((qz, mags, R, cost, sigma0, float(qz.theta_dz), int((mags <= float(d) / 2).sum()), rms))
    if not layers:
        return report
    # Every weight up to its layer's range R (beyond it the dead zone cannot reach).
    scores = torch.cat([(m[m <= R] / rms).square() / c for _, m, R, c, _, _, _, rms in layers]).sort().values

    def apply(tau: float) -> None:
        for qz, mags, R, cost, sigma0, theta0, _, rms in layers:
            sigma = max(sigma0, tau) if down else min(sigma0, tau)
            if sigma == sigma0:
                qz.theta_dz.fill_(theta0)
                continue
            limit = min(R, rms * math.sqrt(sigma * cost))
            # the threshold halfway between the last weight to prune and the next one
            k = int(torch.searchsorted(mags, torch.tensor(limit, dtype=mags.dtype), right=True))
            lo = float(mags[k - 1]) if k > 0 else 0.0
            hi = float(mags[k]) if k < len(mags) else R
            t = min(R, 0.5 * (lo + hi) if k < len(mags) else R)
            qz.set_threshold(t, R)

    goal = target * aim
    # g(i) = figure with τ = scores[i]; decreasing in i in both directions. Find the smallest i with g ≤ goal.
    # If even the last score misses the goal, the bisection ends there: the most it can do.
    lo, hi = 0, len(scores) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        apply(float(scores[mid]))
        if figure() <= goal:
            hi = mid
        else:
            lo = mid + 1
    apply(float(scores[hi]))
    after = figure()
    changed = 0
    for qz, mags, R, cost, sigma0, theta0, pruned0, _ in layers:
        _, d, _, _ = qz._scalars(torch.tensor(R, dtype=torch.float32), torch.float32)
        changed += abs(int((mags <= float(d) / 2).sum()) - pruned0)
    report.update(trimmed=True, after=after, direction="down" if down else "up", weights_changed=changed)
    return report
