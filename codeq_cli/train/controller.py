"""The budget's controller: the pressure and rates of the logits, steered along a planned path.

``docs/method.md``, "Compressing to a budget" (codeq's extension, not the
paper's). The :class:`Controller` replaces the user's guess of λ by a pressure
``p = exp(u)`` that multiplies the recipe's penalty, with per-layer weights
``w_ℓ`` proportional to each layer's share of the measured cost::

    L = task + p · (λ_dz Σ w_ℓ θ_dz,ℓ² + λ_bit Σ w_ℓ θ_bit,ℓ²)

Every ``every`` steps it measures the figure (on rank 0, shared with every rank)
and moves ``u`` by the log error against a planned path that goes
geometrically from the starting figure to the target by ``ramp`` of the
steps and then holds it (``schedule="cubic"``: fast at first, gently near
the target). Exactness at the end is the job of
:func:`codeq_cli.train.trim.trim`. :class:`BudgetRun` wires a controller to
one training run (and keeps ``max_drop``'s search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from codeq_cli.core.insert import quantized_weights
from codeq_cli.train.budget import BudgetKind
from codeq_cli.train.measure import act_layer_index, measure, rel_bops
from codeq_cli.train.objective import Logits, penalty
from codeq_cli.train.recovery import ramp_end as end_of_ramp


@dataclass
class Controller:
    """Rates and pressure of the logits from the measured figure, along a planned path.

    The plan is geometric from ``anchor`` (the figure at ``anchor_step``) to
    ``target`` at ``ramp_end``, then flat: the hold phase. After each
    measurement, with ``e = ln(measured / planned)``:

    - ``down = clip(k·e, 0, boost)``, ``up = clip(−k·e, 0, 1)`` (``max_drop``:
      ``clip(−k·e, 0, boost)``, its search also moves back up): the share of its
      optimizer step a logit keeps when the step compresses (``|θ|`` falls) or
      relaxes it. Above the plan only compressing moves happen, below it only
      relaxing ones, at a speed proportional to the error; on the plan the
      logits stand still while the weights keep training. Far above the plan
      the compressing steps are enlarged up to ``boost`` times. The cap itself
      adapts: each measurement at which it binds doubles it (up to
      ``boost_max``), each at which ``k·e`` is below half of it halves it (down
      to ``boost_min``). A run whose logit learning rate is too small for its
      budget, a short one above all, still follows the plan instead of leaving
      the distance to the final trim.
    - per-layer weights, by ``rates``:

      ``"cost"``: ``w_ℓ = sqrt(cost_ℓ / max cost)`` scales both the penalty and
      each logit's kept step: layers holding more of the figure move faster.
      ``"sensitivity"``: ``w_ℓ = cost_ℓ / max cost`` weights the penalty only,
      and every logit keeps the same share of its step. A logit then
      compresses where the weighted penalty's pull beats the task gradient's
      push back: each layer's cost saved against the loss it costs, the
      Lagrangian's own condition, decides which layers give way.
    - ``u`` (the log of the pressure ``p`` on the penalty) moves by
      ``gain·e`` (at most ``max_move``; ``|u| ≤ u_max``): when no layer's
      step compresses any more, the pull grows until some do; below the plan
      it shrinks and the task gradient relaxes the layers that need it most.
    """

    kind: BudgetKind
    target: float
    start: float
    total_steps: int
    rates: str = "cost"
    ramp: float = 0.6
    schedule: str = "geometric"  # or "cubic": the share of the log distance done by x is 1 − (1 − x)³
    every: int = 5
    k: float = 20.0
    boost_min: float = 4.0
    boost_max: float = 32.0
    boost: float = 4.0
    gain: float = 0.5
    max_move: float = 0.25
    u_max: float = 8.0
    unit_min: float = 0.1
    u: float = 0.0
    down: float = 1.0
    up: float = 0.0
    measured: float = float("nan")
    weights: list[float] = field(default_factory=list)
    act_index: list[int] = field(default_factory=list)  # learned activation widths: the layer each feeds
    act_weights: list[float] = field(default_factory=list)
    anchor_step: int = 0
    anchor: float = float("nan")
    ramp_end: int = -1
    updates: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # device copies of the kept shares

    def __post_init__(self) -> None:
        if math.isnan(self.anchor):
            self.anchor = self.start
        if math.isnan(self.measured):
            self.measured = self.start
        if self.ramp_end < 0:
            self.ramp_end = end_of_ramp(self.ramp, self.total_steps)

    @property
    def pressure(self) -> float:
        return math.exp(self.u)

    def planned(self, step: int) -> float:
        span = max(1, self.ramp_end - self.anchor_step)
        x = min(1.0, max(0.0, (step - self.anchor_step) / span))
        if self.schedule == "cubic":  # Zhu & Gupta's gradual schedule, in log space (docs/method.md)
            x = 1.0 - (1.0 - x) ** 3
        return self.anchor * (self.target / self.anchor) ** x

    @property
    def unit(self) -> float:
        """The log distance the error is counted in: the plan's own, ``|ln(anchor/target)|``, where under 1.

        A plan from 6.02% to 5% (8-bit activations: 0.19 of log distance) that
        lags by 0.08 is 40% of its way behind; the same 0.08 on a plan from 100%
        to 5% (3.0) is 3%. Counted in its own distance (floored at ``unit_min``),
        a short plan's lag moves the rates and pressure as much as a long plan's
        does at the same share of its way; plans of at least 1 (a target below
        37% of the start: every budget with float activations) are unchanged.
        """
        d = abs(math.log(max(self.anchor, 1e-12) / max(self.target, 1e-12)))
        return min(1.0, max(self.unit_min, d))

    def retarget(self, target: float, step: int, over_steps: int) -> None:
        """A new target, reached from the figure measured now within ``over_steps`` (``max_drop``)."""
        self.target, self.anchor_step, self.anchor = target, step, self.measured
        self.ramp_end = step + max(1, over_steps)

    def update(self, step: int, measured: float, costs: list[float]) -> None:
        """One measurement after ``step`` steps: new rates, weights and pressure."""
        self.measured = measured
        e = math.log(max(measured, 1e-12) / max(self.planned(step), 1e-12)) / self.unit
        raw = self.k * e
        # max_drop's search moves both ways (back up after a miss): its relaxing steps share the cap
        both_ways = self.kind.searches
        need = abs(raw) if both_ways else raw
        if need > self.boost:  # the cap binds: the logits are too slow for the plan
            self.boost = min(self.boost_max, 2.0 * self.boost)
        elif need < 0.5 * self.boost:
            self.boost = max(self.boost_min, 0.5 * self.boost)
        self.down = min(self.boost, max(0.0, raw))
        self.up = min(self.boost if both_ways else 1.0, max(0.0, -raw))
        self.u = min(self.u_max, max(-self.u_max, self.u + min(self.max_move, max(-self.max_move, self.gain * e))))
        self.updates += 1
        self._cache.clear()
        top = max(costs) if costs else 0.0
        if top <= 0:
            self.weights = [1.0] * len(costs)
        elif self.rates == "sensitivity":
            self.weights = [c / top for c in costs]
        else:
            self.weights = [math.sqrt(c / top) for c in costs]
        # a learned activation width moves with the layer it feeds (its bits multiply that layer's cost)
        self.act_weights = [self.weights[i] if 0 <= i < len(self.weights) else 1.0 for i in self.act_index]

    def _w(self, n: int) -> list[float]:
        return self.weights if len(self.weights) == n else [1.0] * n

    def _w_act(self, n: int) -> list[float]:
        return self.act_weights if len(self.act_weights) == n else [1.0] * n

    def _factors(self, g: int, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept shares of group ``g``'s steps, ``(w·down, w·up)``, as device tensors.

        Made once per measurement (the host numbers change only then) and reused
        at every step: no host-to-device copy in a step.
        """
        w = [1.0] * n if self.rates != "cost" else (self._w_act(n) if g == 2 else self._w(n))
        key = ("steps", g, like.device, like.dtype, self.down, self.up, tuple(w))
        if key not in self._cache:
            self._cache[key] = (torch.tensor([x * self.down for x in w], dtype=like.dtype, device=like.device),
                                torch.tensor([x * self.up for x in w], dtype=like.dtype, device=like.device))
        return self._cache[key]

    @torch.no_grad()
    def scale_steps(self, before: list[torch.Tensor | None], logits: list[list[torch.Tensor]]) -> None:
        """After the optimizer step: keep ``down·w_ℓ`` (compressing) or ``up·w_ℓ`` (relaxing) of each logit's move.

        ``before`` holds, per group of ``logits`` (dead-zone logits, then bit
        logits, then learned activation bit logits when the controller drives
        them), the group's logits stacked before the step (:meth:`BudgetRun.before_step`).
        The first two groups have one entry per quantized layer, the third one per
        learned activation width. A logit compresses when its ``|θ|`` fell. Each
        group is one vector operation, decided on the device (no host sync).
        """
        for g, (old, group) in enumerate(zip(before, logits)):
            if not group:
                continue
            new = torch.stack([p.detach() for p in group])
            down, up = self._factors(g, len(group), new)
            moved = old + (new - old) * torch.where(new.abs() < old.abs(), down, up)
            torch._foreach_copy_(list(group), list(moved.unbind()))

    def penalty(self, dz: Logits, bit: Logits, lambda_dz: float, lambda_bit: float,
                device=None, *, act: list[torch.Tensor] = (), lambda_act: float = 0.0) -> torch.Tensor:
        """``p · (λ_dz Σ w_ℓ θ_dz² + λ_bit Σ w_ℓ θ_bit² + λ_act_bit Σ w_a θ_act²)``.

        Before the first measurement every ``w = 1``; ``w_a`` is the weight of
        the layer the activation feeds.
        """
        return penalty(dz, bit, lambda_dz, lambda_bit, device, act=act, lambda_act=lambda_act,
                       weights=self._on_device(self._w(len(dz)), dz), act_weights=self._on_device(self._w_act(len(act)), act),
                       pressure=self.pressure)

    def _on_device(self, w: list[float], group) -> torch.Tensor | list[float]:
        """``w`` as a tensor beside ``group``'s logits, made once per measurement (no copy to the device per step)."""
        if not len(group):
            return w
        like = group[0]
        key = ("penalty", like.device, like.dtype, tuple(w))
        if key not in self._cache:
            self._cache[key] = torch.tensor(w, dtype=like.dtype, device=like.device)
        return self._cache[key]

    def log_fields(self, step: int) -> dict:
        return {"budget": self.kind.name, "target": self.target, "planned": self.planned(step), "measured": self.measured,
                "pressure": self.pressure, "rate_down": self.down, "rate_up": self.up, "boost": self.boost}

    _STATE = ("target", "u", "down", "up", "boost", "measured", "weights", "act_index", "act_weights", "anchor_step",
              "anchor", "ramp_end", "updates")
    _NEWER = ("boost", "act_index", "act_weights")  # absent from run states written before they existed

    def state_dict(self) -> dict:
        return {"kind": self.kind.name, "start": self.start, **{k: getattr(self, k) for k in self._STATE}}

    def load_state_dict(self, state: dict) -> None:
        for k in self._STATE:
            if k in self._NEWER and k not in state:
                continue
            setattr(self, k, state[k])
        self.weights = list(state["weights"])
        self._cache.clear()
        self.act_index, self.act_weights = list(self.act_index), list(self.act_weights)


def max_drop_stages(start: float, low: float, evaluations: int) -> tuple[float, float]:
    """``(first stage's figure, ratio)`` of a ``max_drop`` search with ``evaluations`` evaluations.

    Until an evaluation misses, each stage steps down by the same ratio, so that
    the evaluations spread evenly in log space from the start to the far end
    ``max(2·low, start/50)`` (the lowest reachable figure doubled: the trim's
    margin; start/50: no layer left worth its bits).
    """
    far = max(2.0 * low, start / 50.0)
    ratio = (far / start) ** (1.0 / max(1, evaluations))
    return start * ratio, ratio


# -- one run's budget: the controller wired to a model --------------------------------------------
class BudgetRun:
    """The controller of one training run, plus ``max_drop``'s bookkeeping.

    :class:`codeq_cli.train.loop.Fit` calls :meth:`penalty` in the loss,
    :meth:`before_step`/:meth:`after_optimizer_step` around the optimizer step,
    :meth:`after_step` after it and :meth:`on_eval` after each evaluation;
    :meth:`state_dict` goes into the run state. Every rank applies rank 0's
    measurement (one host all-reduce per measurement), so every rank uses the
    same rates and pressure at every step.
    """

    def __init__(self, controller: Controller, macs: dict[str, int], *, size_overhead: int = 0,
                 max_drop: float | None = None, fp_top1: float | None = None, is_main: bool = True,
                 ratio: float | None = None, eval_every: int = 1, save_kwargs: dict | None = None) -> None:
        self.c = controller
        self.macs = macs
        self.size_overhead = size_overhead
        self.max_drop = max_drop
        self.fp_top1 = fp_top1
        self.is_main = is_main
        self.best: dict | None = None  # max_drop: {"epoch", "step", "figure", "top1"}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.missed: float | None = None  # max_drop: the lowest figure whose evaluation missed the bound
        self.ratio = 0.5 if ratio is None else ratio  # max_drop: a stage's step down until a miss (:func:`max_drop_stages`)
        self.eval_every = eval_every  # max_drop: epochs between evaluations
        self.save_kwargs = save_kwargs  # a size target: what the checkpoint is written with (its metadata is measured again)

    # -- the step
    @property
    def drives_act(self) -> bool:
        """Whether the learned activation widths are the controller's too: a figure that counts them."""
        return self.c.kind.figure.counts_activations

    def _groups(self, logits: tuple) -> list[list]:
        """``(dz, bit[, act])`` as the controller moves them: the activation logits only when it drives them."""
        dz, bit, *act = logits
        groups = [dz, bit]
        if self.drives_act and act and act[0]:
            groups.append(act[0])
        return groups

    def penalty(self, dz, bit, lambda_dz: float, lambda_bit: float, device=None, *, act=(), lambda_act: float = 0.0) -> torch.Tensor:
        """The controller's penalty; the activation widths under its pressure only when it drives them
        (:attr:`drives_act`), else with plain weights and no pressure, as without a budget."""
        if self.drives_act:
            return self.c.penalty(dz, bit, lambda_dz, lambda_bit, device, act=act, lambda_act=lambda_act)
        reg = self.c.penalty(dz, bit, lambda_dz, lambda_bit, device)
        if act and lambda_act:
            reg = reg + penalty((), (), 0.0, 0.0, reg.device, act=act, lambda_act=lambda_act)
        return reg

    @torch.no_grad()
    def before_step(self, logits: tuple) -> list[torch.Tensor | None]:
        """Each group's logits before the optimizer step, stacked (one copy per group)."""
        return [torch.stack([p.detach() for p in group]) if group else None for group in self._groups(logits)]

    def after_optimizer_step(self, before: list[torch.Tensor], logits: tuple) -> None:
        self.c.scale_steps(before, self._groups(logits))  # an empty list (fixed weight bits) keeps its place

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        if step % self.c.every and step != total_steps:
            return
        from codeq_cli.train import dist

        plain = dist.unwrap(model)
        n = sum(1 for _ in quantized_weights(plain))
        if self.drives_act and not self.c.act_index:
            self.c.act_index = act_layer_index(plain)  # the same on every rank: the model's structure
        if self.is_main:
            figure, costs = measure(self.c.kind.figure, plain, self.macs, self.size_overhead)
        else:
            figure, costs = 0.0, [0.0] * n
        figure, *costs = dist.host_sum([figure, *costs])  # rank 0's numbers on every rank
        self.c.update(step, figure, costs)

    def log_fields(self, step: int) -> dict:
        return self.c.log_fields(step)

    # -- max_drop
    def on_eval(self, model: nn.Module, epoch: int, step: int, top1: float, steps_per_epoch: int, total_steps: int) -> dict:
        """After an evaluation: keep the most compressed model within ``max_drop``; back off when it is missed."""
        if self.max_drop is None or self.fp_top1 is None:
            return {}
        from codeq_cli.train import dist

        plain = dist.unwrap(model)
        figure = rel_bops(plain, self.macs) if self.is_main else 0.0
        figure = dist.host_sum([figure])[0]
        met = top1 >= self.fp_top1 - self.max_drop
        if met and (self.best is None or figure < self.best["figure"]):
            self.best = {"epoch": epoch, "step": step, "figure": figure, "top1": top1}
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in plain.state_dict().items()}
        if not met:
            self.missed = figure if self.missed is None else min(self.missed, figure)
        if step < total_steps:
            # The next stage: reach its figure within the first half of the steps to the next
            # evaluation, then hold it so the weights recover before they are judged.
            self.c.retarget(self.next_stage(figure), step, max(1, steps_per_epoch * self.eval_every // 2))
        return {"max_drop_met": met, "best_epoch": None if self.best is None else self.best["epoch"]}

    def next_stage(self, figure: float) -> float:
        """The figure the next stage of the ``max_drop`` search aims at (the log-space bracket, docs/method.md).

        Until an evaluation misses, one step of ``ratio`` below the figure now;
        then the geometric mean of the lowest figure that met the bound (the
        start, if none did) and the lowest that missed it.
        """
        if self.missed is None:
            return figure * self.ratio
        safe = self.best["figure"] if self.best is not None else self.c.start
        return math.sqrt(safe * self.missed)

    def restore_best(self, model: nn.Module) -> dict | None:
        """Load the most compressed model that met ``max_drop`` (None when none did)."""
        if self.best_state is None:
            return None
        from codeq_cli.train import dist

        dist.unwrap(model).load_state_dict(self.best_state)
        return self.best

    # -- the run state
    def state_dict(self) -> dict:
        import json

        out = {"budget": json.dumps({"controller": self.c.state_dict(), "best": self.best, "missed": self.missed})}
        if self.best_state is not None:
            out["budget_best"] = self.best_state
        return out

    def load_state_dict(self, state: dict) -> None:
        import json

        if "budget" not in state:
            return
        data = json.loads(state["budget"])
        self.c.load_state_dict(data["controller"])
        self.best = data["best"]
        self.missed = data.get("missed")  # absent from run states written before the staged search
        self.best_state = state.get("budget_best")
