"""Whether a BOPs target is aggressive for the steps it is given: the warning ``compress`` gives before training.

``docs/method.md``, "Aggressive budgets in short runs" (codeq's extension,
not the paper's). With float activations a layer's BOPs are
``bits · (1 − sparsity) · 32 · MACs``, so a target of ``P`` percent of the
dense FP32 BOPs leaves the weights on average

    B = P/100 · 32 · 32 / a        bits per weight (bit-width × kept share)

for activations at ``a`` bits (32: float). ``B`` is what the weights must
be squeezed to; the steps are the time they have to recover. Measured on an
ImageNet-pretrained EfficientNet-Lite0 fine-tuned to Fashion-MNIST
(``docs/transfer.md``, 138 steps, against the FP model trained as long) with
the built-in recipes' schedule (the weights at :data:`RAMP_LR` while the
target is reached at 30% of the steps, then the recovery phase at
:data:`RECOVER`) the budget path lost :data:`DROP`: 0.4 points at 10% BOPs
(``B`` = 3.2, nine seeds) and more at 5% (``B`` = 1.6, six seeds). So it warns
below :data:`LOW_BITS` in :data:`FEW_STEPS` steps or fewer; a recipe that
trains the weights slower while the figure falls (at ``lr``: 0.9 and 2.9
points) or recovers slower (1e-3: 4.2 points at 5%) is pointed to the
built-in rates. A slower schedule loses more already at 10% (the ramp at 0.6:
2.1 points; no recovery phase: 9.0), so a recipe with one is warned below
:data:`SLOW_BITS` and told what the measured schedule gains.
Plain Python, no torch: the CLI's tests call it directly.
"""

from __future__ import annotations

from codeq_cli.train.recipe import Recipe

LOW_BITS = 2.5  # B below this: aggressive (10% BOPs with float activations is 3.2, 5% is 1.6) ...
SLOW_BITS = 4.0  # ... or below this with a slower schedule than the built-in recipes' (10% lost 2.1 to 9.0)
FEW_STEPS = 1000  # ... when the run has at most this many steps


def weight_bits(target_bops: float, act_bits: int = 32) -> float:
    """``B``: the average bits per weight (bit-width × kept share) a relative-BOPs target leaves."""
    return target_bops / 100.0 * 32.0 * 32.0 / act_bits


def budget_warning(recipe, steps: int) -> str | None:
    """One line when ``recipe``'s BOPs target is aggressive for ``steps`` training steps, else None.

    Learned activation widths are left alone (the controller trades them
    against the weights); size and ``max_drop`` budgets too (the size does not
    count activations; ``max_drop`` finds its own figure).
    """
    target = recipe.target_bops
    if target is None or recipe.act_bits == "learned":
        return None
    a = 32 if recipe.act_bits is None else int(recipe.act_bits)
    b = weight_bits(target, a)
    no_recovery = recipe.budget_recover_lr is None
    slow_recovery = no_recovery or recipe.budget_recover_lr < RECOVER
    slow_ramp_lr = recipe.ramp_lr < RAMP_LR  # the weights' rate while the figure falls
    slow = no_recovery or recipe.budget_ramp > RAMP
    if b >= (SLOW_BITS if slow else LOW_BITS) or steps > FEW_STEPS:
        return None
    fix = ("with 8-bit activations (--set act_bits=8) the same target leaves 4x as many" if recipe.act_bits is None
           else "raise act_bits or the target")
    if not slow and slow_ramp_lr:  # the weights at lr (1e-4) while the figure falls: measured at 10% and 5%
        fix = (f"train the weights faster while compressing (--set budget_ramp_lr={RAMP_LR:g}: {DROP_RAMP_AT_LR[10]:g} "
               f"-> {DROP[10]:g} at 10%, {DROP_RAMP_AT_LR[5]:g} -> {DROP[5]:g} at 5%); " + fix)
    if not slow and slow_recovery:  # a rate below RECOVER: measured at 5%; no different at 10% or on the demo
        fix = f"recover faster (--set budget_recover_lr={RECOVER:g}: {DROP_1E3[5]:g} -> {RECOVER_3E3[5]:g} at 5%); " + fix
    if slow:  # what the built-in schedule was measured to gain over the one nearest this recipe's
        sets = ([f"budget_recover_lr={RECOVER:g}"] if slow_recovery else []) + (
            [f"budget_ramp={RAMP:g}"] if recipe.budget_ramp > RAMP else []) + (
            [f"budget_ramp_lr={RAMP_LR:g}"] if slow_ramp_lr else [])
        before = NO_RECOVERY if no_recovery else DROP_SLOW
        fix = (f"use the built-in schedule ({' '.join('--set ' + x for x in sets)}: {before[10]:g} -> {DROP[10]:g} "
               f"at 10%, {before[5]:g} -> {DROP[5]:g} at 5%); " + fix)
    return (f"--target-bops {target:g} leaves the weights {b:.2g} bits each on average (bit-width x kept share) "
            f"and {steps} steps to recover: measured, a pretrained EfficientNet-Lite0 lost {DROP[10]:g} top-1 points "
            f"at 10% BOPs and {DROP[5]:g} at 5% in 138 steps (docs/transfer.md); {fix}, or give more epochs "
            f"(--max-drop finds the figure where the drop holds)")


# docs/transfer.md: against the FP model trained as long (5,000 test images), weights only, 138 steps; target % ->
# top-1 points lost with the built-in schedule (budget_ramp 0.3, budget_ramp_lr 3e-4, budget_recover_lr 3e-3:
# bops10-recover-ramp0.3-lr3e-3-lr3e-4, nine seeds; bops5-recover-ramp0.3-lr3e-3-lr3e-4, six; the VNNI CPU), with
# the weights at lr (1e-4) while the figure falls (the same seeds: bops*-recover-ramp0.3-lr3e-3, the default until
# stop 32), the recovery at 3e-3 (RECOVER_3E3: at 5% six seeds on two CPUs) against 1e-3 (DROP_1E3; both with the
# weights at lr; six seeds on two CPUs at 5%, nine at 10%), with the ramp at 0.6 and 1e-3 (bops10-recover, bops5-recover; seeds 0-2, the AVX2 CPU) and without
# the recovery phase (bops10, bops5: seed 0, ramp 0.6)
DROP = {10: 0.4, 5: 1.9}
DROP_RAMP_AT_LR = {10: 0.9, 5: 2.9}
RECOVER_3E3 = {5: 2.7}  # at 10% the same runs as DROP_RAMP_AT_LR[10]
DROP_1E3 = {10: 1.0, 5: 4.2}
DROP_SLOW = {10: 2.1, 5: 5.4}
NO_RECOVERY = {10: 9.0, 5: 20.2}
# the built-in schedule, read from the recipe schema's defaults (the built-in recipes set the same): budget_ramp 0.3,
# budget_recover_lr 3e-3 and budget_ramp_lr 3e-4 (since stop 32, 2026-12-07: lr before). DROP was measured with
# these: a new default needs new figures.
RAMP = Recipe.model_fields["budget_ramp"].default
RECOVER = Recipe.model_fields["budget_recover_lr"].default
RAMP_LR = Recipe.model_fields["budget_ramp_lr"].default
