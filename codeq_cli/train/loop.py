"""CoDeQ fine-tuning: the objective, the optimizer groups, the loop and its saved state.

Shaped like torchvision's reference ``train.py``: short :func:`train_one_epoch`
(evaluation is :mod:`codeq_cli.train.accuracy`), and :func:`fit` that reads top to bottom. The CoDeQ
regularizer is one term in the loss (``docs/method.md``, "The objective")::

    L = CE(ŵ) + λ_dz · Σ θ_dz² (+ λ_bit · Σ θ_bit² in mixed precision)

Data order is a pure function of ``(seed, epoch)``: each epoch's permutation
is cut into *global* batches, every rank takes its slice of each, and every
sample's augmentation is seeded by ``(seed, epoch, index)`` (the dataset draws
``ds[(index, seed)]``, see :class:`codeq_cli.data.folders.ImageFolder`). A run can therefore
stop after any step and resume, on any number of processes, with the same
samples and augmentations it would have seen; on one CPU process the resumed
run ends with exactly the codes of an uninterrupted one.

Under DDP every rank computes the same update (gradients are averaged) and
the ranks agree once per step, on the host, about the mean loss, a non-finite
loss and a stop request (:func:`codeq_cli.train.dist.host_sum`), so they stop,
save and fail together. Per step the only device synchronisation is the read
of the loss values. Two debugging hooks come in through :class:`FitSetup`
(``codeq compress`` sets them from ``CODEQ_DEBUG_DUMP_DIR`` and
``CODEQ_DEBUG_STOP_AFTER``, see ``docs/distributed.md``): every rank writes its
quantizer logits and codes to a folder when training ends, and the last rank
asks to stop after step ``N`` as a SIGTERM would.

The library never prints: progress goes to an ``on_event`` callback and to
``metrics.jsonl`` in the run directory.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from codeq_cli.train import dist
from codeq_cli.train.accuracy import logits_of, autocast_for, eval_loader, measure_accuracy
from codeq_cli.train._compile import compile_errors
from codeq_cli.train.recipe import Recipe
from codeq_cli.core.bops import bops_rows, bops_totals
from codeq_cli.errors import InterruptedRun, TrainingError
from codeq_cli.core.insert import quantized_weights, quantizer_parameters
from codeq_cli.core.act_quant import act_parameters
from codeq_cli.formats import runstate
from codeq_cli.formats.runstate import RunPosition
from codeq_cli.data.loader import build_loader
from codeq_cli.data.sampling import GlobalBatchSampler
from codeq_cli.train.controller import BudgetRun
from codeq_cli.train.objective import current_logits, penalty
from codeq_cli.train.distill import task_loss
from codeq_cli.train.recovery import lr_factor, ramp_end, recover_factor  # docs/method.md, "Aggressive budgets"

Event = dict
OnEvent = Callable[[Event], None]


# -- the optimizer ----------------------------------------------------------
def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW or SGD with three groups: network weights, dead-zone logits, bit logits.

    With activation quantizers (``act_bits``), two more: their steps (``lr_act``)
    and their bit logits (``lr_bit``), both without weight decay.
    """
    plain = dist.unwrap(model)
    dz, bit = quantizer_parameters(plain)
    act_steps, act_bit = act_parameters(plain)
    logit_ids = {id(p) for p in dz + bit + act_steps + act_bit}
    weights = [p for p in plain.parameters() if p.requires_grad and id(p) not in logit_ids]
    groups = [
        {"params": weights, "lr": recipe.lr, "weight_decay": recipe.weight_decay, "name": "weights"},
        {"params": dz, "lr": recipe.lr_dz, "weight_decay": recipe.weight_decay_dz, "name": "dead_zone"},
    ]
    if bit:
        groups.append({"params": bit, "lr": recipe.lr_bit, "weight_decay": recipe.weight_decay_bit, "name": "bits"})
    if act_steps:
        groups.append({"params": act_steps, "lr": recipe.lr_act, "weight_decay": 0.0, "name": "act_steps"})
    if act_bit:
        groups.append({"params": act_bit, "lr": recipe.lr_bit, "weight_decay": 0.0, "name": "act_bits"})
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=recipe.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, total_steps: int, steps_per_epoch: int):
    warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
    min_factor = recipe.min_lr / recipe.lr
    schedule = recipe.schedule
    run = lambda s: lr_factor(s, total_steps, warmup, schedule, min(1.0, min_factor))  # noqa: E731
    budget = recipe.budget
    if recipe.budget_recover_lr is not None and budget is not None and not budget.kind.searches:
        end, restart = ramp_end(recipe.budget_ramp, total_steps), recipe.budget_recover_lr / recipe.lr
        ramp = recipe.ramp_lr / recipe.lr
        weights = lambda s: recover_factor(s, total_steps, end, warmup, restart, min(1.0, min_factor), schedule,  # noqa: E731
                                           ramp)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, [weights if g.get("name") == "weights" else run for g in optimizer.param_groups])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, run)


def compression_stats(model: nn.Module, macs: dict[str, int]) -> dict:
    """Sparsity, bits and relative BOPs of the model as it stands; only figures that were measured.

    A model without quantizers (the demo's FP32 pre-training) has none to
    report, and relative BOPs need the layers' MACs.
    """
    t = bops_totals(bops_rows(dist.unwrap(model), macs))
    if not t["quantized_layers"]:
        return {}
    keys = ("sparsity", "avg_bits", "mean_layer_sparsity", "mean_layer_bits") + (("rel_bops",) if t["macs"] else ())
    return {k: t[k] for k in keys}


def build_optimization(model: nn.Module, recipe: Recipe, total_steps: int, steps_per_epoch: int,
                       state: dict | None = None) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and its schedule, continued from a run state when there is one.

    The saved state brings the moments and the step; the recipe keeps the
    learning rates and weight decays (they differ only when ``--force``
    resumes a changed recipe).
    """
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, total_steps, steps_per_epoch)
    if state is not None:
        wanted = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for g, (lr, wd), factor in zip(optimizer.param_groups, wanted, scheduler.lr_lambdas):
            g["initial_lr"], g["weight_decay"], g["lr"] = lr, wd, lr * factor(scheduler.last_epoch)
        scheduler.base_lrs = [lr for lr, _ in wanted]
    return optimizer, scheduler


@dataclass
class FitSetup:
    """Everything :func:`fit` needs, built by the caller (see ``compress.py``)."""

    model: nn.Module  # quantized, on device, maybe DDP-wrapped
    recipe: Recipe
    train_set: Dataset
    val_set: Dataset | None
    device: torch.device
    info: dist.DistInfo
    run_dir: Path
    macs: dict[str, int]
    seed: int = 0
    workers: int = 0
    max_steps: int | None = None
    log_every: int = 20
    save_every_s: float = 600.0
    fingerprint: dict = field(default_factory=dict)
    on_event: OnEvent = lambda e: None
    should_stop: Callable[[], bool] = lambda: False
    debug_stop_after: int = 0  # the last rank asks to stop after this step (CODEQ_DEBUG_STOP_AFTER)
    debug_dump_dir: Path | None = None  # every rank dumps its quantizers here at the end (CODEQ_DEBUG_DUMP_DIR)
    budget: BudgetRun | None = None  # the controller, when compressing to a budget (train.controller)
    teacher: nn.Module | None = None  # the frozen FP model, for distillation (train.distill)


class Fit:
    """One training run: :meth:`run` reads top to bottom."""

    def __init__(self, setup: FitSetup, progress: RunPosition | None = None, state: dict | None = None):
        self.s = setup
        r = setup.recipe
        world = setup.info.world_size
        self.global_batch = r.batch_size
        self.sampler = GlobalBatchSampler(len(setup.train_set), r.batch_size, setup.seed, setup.info.rank, world)
        self.steps_per_epoch = len(setup.train_set) // r.batch_size
        planned = r.epochs * self.steps_per_epoch
        self.total_steps = min(planned, setup.max_steps) if setup.max_steps else planned
        if setup.max_steps and setup.max_steps > planned:
            self.total_steps = setup.max_steps  # --max-steps wins: more epochs as needed
        self.optimizer, self.scheduler = build_optimization(setup.model, r, self.total_steps, self.steps_per_epoch, state)
        self.progress = progress or RunPosition()
        self.loader = build_loader(setup.train_set, batch_sampler=self.sampler, workers=setup.workers,
                                   pin_memory=setup.device.type == "cuda", seed=setup.seed)
        if state is not None and setup.budget is not None:
            setup.budget.load_state_dict(state)
        self.last_save = time.monotonic()
        self.saved_step = self.progress.step if state is not None else None  # the step of the state on disk
        self.metrics_path = setup.run_dir / "metrics.jsonl"
        if setup.info.is_main and state is None and self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run (--overwrite) starts a fresh log
        self.logits = quantizer_parameters(dist.unwrap(setup.model))
        self.quantizers = [qw.quantizer for qw in quantized_weights(dist.unwrap(setup.model))]
        self.act_bit_logits = act_parameters(dist.unwrap(setup.model))[1]
        self.budget_logits = (*self.logits, self.act_bit_logits)  # what the budget's controller may move
        self.pace = Pace()

    # ---------------------------------------------------------------- logging
    def log(self, event: Event) -> None:
        event = {"time": round(time.time(), 3), **event}
        if self.s.info.is_main:
            from codeq_cli._io import append_line

            append_line(self.metrics_path, json.dumps(event))  # a failed write (disk full) is one error line
        self.s.on_event(event)

    # ---------------------------------------------------------------- state
    def save(self, reason: str) -> None:
        """Rank 0 writes the run state (every rank holds the same one); the others wait for it.

        Weights that overflowed are not written: they would replace the last
        good state with one that no change of recipe can resume.
        """
        if not self._weights_finite():
            self.last_save = time.monotonic()
            self.log({"event": "not saved", "reason": "non-finite weights", "step": self.progress.step})
            return
        rngs = runstate.gather_rng_states(self.s.device, dist.host_group())  # every rank's: dropout differs by rank
        if self.s.info.is_main:
            state = runstate.run_state(dist.unwrap(self.s.model), self.optimizer, self.scheduler, self.progress,
                                       self.s.fingerprint, self.s.info.world_size, rngs)
            if self.s.budget is not None:
                state.update(self.s.budget.state_dict())  # the controller's state (and max_drop's best model)
            runstate.save_state(state, self.s.run_dir / runstate.STATE_FILE)
        dist.barrier()
        self.last_save = time.monotonic()
        self.saved_step = self.progress.step
        self.log({"event": "saved", "reason": reason, "step": self.progress.step})

    def _weights_finite(self) -> bool:
        tensors = [t for t in dist.unwrap(self.s.model).state_dict().values() if t.is_floating_point()]
        finite = bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True
        return dist.host_sum([float(finite)])[0] == self.s.info.world_size  # every rank decides the same

    # ---------------------------------------------------------------- training
    def _stop_requested(self) -> bool:
        """This rank's wish to stop after the current step (Ctrl-C, SIGTERM, or the debug hook)."""
        info, n = self.s.info, self.s.debug_stop_after
        debug = n > 0 and info.rank == info.world_size - 1 and self.progress.step + 1 == n
        return bool(self.s.should_stop()) or debug

    def _forward_loss(self, images, target, amp: bool, label_smoothing: float, lambda_bit: float):
        s, r = self.s, self.s.recipe
        with autocast_for(s.device, amp):
            out = logits_of(s.model(images)).float()
            teacher = None
            if s.teacher is not None and r.distill_weight > 0:
                with torch.no_grad():
                    teacher = logits_of(s.teacher(images)).float()
        task = task_loss(out, target, teacher, r.distill_weight, r.distill_temperature, label_smoothing)
        # The one penalty (train.objective); under a budget with the controller's weights and pressure.
        # λ_act_bit · Σ θ_act_bit² is codeq's extension for learned activation widths.
        dz, bit = current_logits(self.quantizers, self.logits)  # as the one-pass quantizer stacked them
        reg = (s.budget.penalty if s.budget is not None else penalty)(
            dz, bit, r.lambda_dz, lambda_bit, device=task.device, act=self.act_bit_logits,
            lambda_act=r.lambda_act_bit)
        return task + reg, task, reg

    def train_one_epoch(self, epoch: int) -> bool:
        """Train until the epoch ends, ``max_steps`` is reached or a stop is asked; True when stopped early."""
        s, p, r = self.s, self.progress, self.s.recipe
        model = s.model
        model.train()
        self.sampler.set_epoch(epoch, p.batch)
        amp = r.amp
        channels_last = r.channels_last and s.device.type == "cuda"
        label_smoothing = r.label_smoothing
        grad_clip = r.grad_clip
        lambda_bit = r.lambda_bit if r.mixed else 0.0
        world = s.info.world_size
        pace = self.pace
        batches = iter(self.loader)
        while True:
            t_ask = time.perf_counter()
            try:
                images, target = next(batches)
            except StopIteration:
                break
            pace.waited(time.perf_counter() - t_ask)
            if p.step >= self.total_steps:
                return False
            if images.numel() == 0:  # every image of this batch was unreadable
                if s.info.distributed:  # skipping on one rank would stall the others' all-reduce
                    from codeq_cli.errors import DataError

                    raise DataError(f"every image of a training batch on rank {s.info.rank} is unreadable",
                                    hint="fix or remove the broken files")
                p.batch += 1
                continue
            images = images.to(s.device, non_blocking=True)
            target = target.to(s.device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with compile_errors():
                loss, task, reg = self._forward_loss(images, target, amp, label_smoothing, lambda_bit)
                values = HostCopy(torch.stack([loss.detach(), task.detach(), reg.detach()]))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            # After backward is queued (the GPU keeps working meanwhile), before the step: the
            # step's one device synchronisation (the three loss values, copied before backward)
            # and one host all-reduce: the mean loss, a non-finite loss anywhere, a stop asked
            # anywhere, a periodic save due (rank 0's clock): the ranks must not disagree.
            save_due = s.info.is_main and time.monotonic() - self.last_save >= s.save_every_s
            *totals, stops, saves = dist.host_sum([*values.tolist(), float(self._stop_requested()), float(save_due)])
            loss_value, task_value, reg_value = (v / world for v in totals)
            if not math.isfinite(loss_value):  # no step: the weights stay those before the bad batch
                raise NonFiniteLoss(p.step, loss_value, task_ok=math.isfinite(task_value))
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            before = s.budget.before_step(self.budget_logits) if s.budget is not None else None
            self.optimizer.step()
            if s.budget is not None:
                s.budget.after_optimizer_step(before, self.budget_logits)
            self.scheduler.step()
            p.step += 1
            p.batch += 1
            if s.budget is not None:
                s.budget.after_step(model, p.step, self.total_steps)
            event = {
                "event": "step",
                "epoch": epoch,
                "step": p.step,
                "total_steps": self.total_steps,
                "loss": loss_value,
                "task_loss": task_value,
                "reg_loss": reg_value,
                "lr": self.optimizer.param_groups[0]["lr"],
            }
            pace.stepped(self.global_batch)
            if p.step % s.log_every == 0 or p.step == self.total_steps:
                event.update(pace.read())  # images/s and the share of the time spent waiting for data
                if s.info.is_main:
                    event.update(compression_stats(model, s.macs))
                if s.budget is not None:
                    event.update(s.budget.log_fields(p.step))
                self.log(event)
            else:
                s.on_event(event)
            if saves:
                self.save("time")
            if stops:
                return True
        return False

    def run(self) -> RunPosition:
        s, p, r = self.s, self.progress, self.s.recipe
        self.log({"event": "start", "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                  "epoch": p.epoch, "step": p.step, "world_size": s.info.world_size,
                  "quantized_layers": len(self.logits[0])})
        while p.step < self.total_steps:
            try:
                stopped = self.train_one_epoch(p.epoch)
            except NonFiniteLoss as exc:
                # The weights are still those before the bad step. Keep them when the task loss
                # was finite (a λ too large: lower it, resume from them); weights that overflow
                # the model's output must not replace the last good state.
                if exc.task_ok:
                    self.save("non-finite loss")
                raise TrainingError(f"the loss became {exc.value} at step {exc.step + 1}",
                                    hint=_non_finite_hint(self.saved_step, p.step, exc.task_ok)) from None
            if stopped:
                self.save("interrupted")
                self.finish()
                raise InterruptedRun(f"interrupted after step {p.step}; the run state is saved", step=p.step)
            epoch_done = p.batch >= self.steps_per_epoch
            if epoch_done:
                if s.val_set is not None and (p.epoch + 1) % r.eval_every == 0:
                    self.epoch_eval(p.epoch)
                p.epoch += 1
                p.batch = 0
                self.save("epoch")
            elif p.step >= self.total_steps:
                self.save("end")
        self.finish()
        return p

    def finish(self) -> None:
        """Stop the loader's worker processes, give every rank rank 0's buffers; the debug dump when asked."""
        self.loader = None  # persistent workers exit with their iterator
        dist.broadcast_buffers(self.s.model)
        if self.s.debug_dump_dir is not None:
            extra = {} if self.s.budget is None else {"budget": self.s.budget.state_dict()["budget"]}
            dist.debug_dump(self.s.model, self.s.info, self.progress.step, self.s.debug_dump_dir, extra)

    def epoch_eval(self, epoch: int) -> None:
        s = self.s
        dist.broadcast_buffers(s.model)  # every rank evaluates rank 0's model
        loader = eval_loader(s.val_set, self.global_batch, s.info, s.workers, s.device)
        res = measure_accuracy(dist.unwrap(s.model), loader, s.device, amp=s.recipe.amp,
                       channels_last=s.recipe.channels_last)
        event = {"event": "eval", "epoch": epoch, "step": self.progress.step, **res.to_dict()}
        if s.info.is_main:
            event.update(compression_stats(s.model, s.macs))
        if s.budget is not None:
            event.update(s.budget.on_eval(s.model, epoch, self.progress.step, res.top1, self.steps_per_epoch,
                                          self.total_steps))
        self.progress.history.append({k: event[k] for k in event if k != "event"})
        self.log(event)


class Pace:
    """Throughput and data wait over a logging interval (host clock; no device synchronisation).

    ``waited(s)`` adds the time the loop spent asking the loader for a batch,
    ``stepped(n)`` counts a step of ``n`` images (global), ``read()`` gives the
    interval's ``images_per_s`` and ``data_wait`` (its share of the interval's
    wall time spent waiting for data) and starts a new interval. On a GPU the
    figures are those of the host: it runs ahead by the queued work, so they
    settle over a few intervals.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0
        self.images = 0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def stepped(self, images: int) -> None:
        self.images += images

    def read(self) -> dict:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        out = {"images_per_s": self.images / elapsed, "data_wait": min(1.0, self.wait / elapsed)}
        self.start, self.wait, self.images = now, 0.0, 0
        return out


class HostCopy:
    """A small device tensor on its way to the host, started now and read later.

    On CUDA the copy goes into pinned memory without blocking and an event marks
    it: the copy is queued behind the forward, so :meth:`tolist` waits for the
    forward only, not for the backward queued after it. Elsewhere it is a plain copy.
    """

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def _non_finite_hint(saved_step: int | None, step: int, saved_now: bool) -> str:
    cause = "the learning rate or a λ is probably too large: lower lr/lr_dz/lr_bit or lambda_dz/lambda_bit with --set"
    if saved_step == step and saved_now:
        return f"{cause}, then resume with --resume --force (the state before the bad step is saved) or start over with --overwrite"
    if saved_step is not None and saved_step < step:
        return f"{cause}; the last good state (step {saved_step}) is kept: resume from it with --resume --force or start over with --overwrite"
    if saved_step is not None:
        return f"{cause}; the state saved at step {saved_step} holds the weights that overflowed: start over with --overwrite"
    return f"{cause}; no run state was saved before it: start over with --overwrite"


class NonFiniteLoss(Exception):
    def __init__(self, step: int, value: float, task_ok: bool = True):
        self.step, self.value, self.task_ok = step, value, task_ok  # task_ok: only the regularizer overflowed

