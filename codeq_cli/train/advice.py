"""Whether a BOPs target is aggressive for the steps it is given: the warning ``compress`` gives before training.

``docs/method.md``, "Aggressive budgets in short runs" (codeq's extension,
not the paper's). With float activations a layer's BOPs are
``bits · (1 − sparsity) · 32 · MACs``, so a target of ``P`` percent of the
dense FP32 BOPs leaves the weights on average

    B = P/100 · 32 · 32 / a        bits per weight (bit-width × kept share)

for activations at ``a`` bits (32: float). ``B`` is what the weights must
be squeezed to; the steps are the time they have to recover. Measured on an
ImageNet-pretrained EfficientNet-Lite0 fine-tuned to Fashion-MNIST
(``docs/transfer.md``, 138 steps, means of six seeds on two CPUs against the
FP model trained as long) with the built-in recipes' schedule (the recovery
phase at :data:`RECOVER`, the target reached at 30% of the steps) the budget
path lost :data:`DROP`: 1.1 points at 10% BOPs (``B`` = 3.2) and more at 5%
(``B`` = 1.6). So it warns below :data:`LOW_BITS` in :data:`FEW_STEPS` steps
or fewer; a recipe that recovers slower (1e-3: 4.2 points at 5%) is pointed to
the built-in rate. A slower
schedule loses more already at 10% (the ramp at 0.6: 2.1 points; no recovery
phase: 9.0), so a recipe with one is warned below :data:`SLOW_BITS` and told
what the measured schedule gains.
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
    slow = no_recovery or recipe.budget_ramp > RAMP
    if b >= (SLOW_BITS if slow else LOW_BITS) or steps > FEW_STEPS:
        return None
    fix = ("with 8-bit activations (--set act_bits=8) the same target leaves 4x as many" if recipe.act_bits is None
           else "raise act_bits or the target")
    if not slow and slow_recovery:  # a rate below RECOVER: measured at 5%; no different at 10% or on the demo
        fix = f"recover faster (--set budget_recover_lr={RECOVER:g}: {DROP_1E3[5]:g} -> {DROP[5]:g} at 5%); " + fix
    if slow:  # what the built-in schedule was measured to gain over the one nearest this recipe's
        sets = ([f"budget_recover_lr={RECOVER:g}"] if slow_recovery else []) + (
            [f"budget_ramp={RAMP:g}"] if recipe.budget_ramp > RAMP else [])
        before = NO_RECOVERY if no_recovery else DROP_SLOW
        fix = (f"use the built-in schedule ({' '.join('--set ' + x for x in sets)}: {before[10]:g} -> {DROP[10]:g} "
               f"at 10%, {before[5]:g} -> {DROP[5]:g} at 5%); " + fix)
    return (f"--target-bops {target:g} leaves the weights {b:.2g} bits each on average (bit-width x kept share) "
            f"and {steps} steps to recover: measured, a pretrained EfficientNet-Lite0 lost {DROP[10]:g} top-1 points "
            f"at 10% BOPs and {DROP[5]:g} at 5% in 138 steps (docs/transfer.md); {fix}, or give more epochs "
            f"(--max-drop finds the figure where the drop holds)")


# docs/transfer.md: against the FP model trained as long (5,000 test images), weights only, 138 steps; target % ->
# top-1 points lost with the built-in schedule (budget_recover_lr 3e-3, budget_ramp 0.3:
# bops10-recover-ramp0.3-lr3e-3, bops5-recover-ramp0.3-lr3e-3; six seeds each, the 5% ones on two CPUs), with the
# recovery at 1e-3 (the default until 2026-12-07: bops10-recover-ramp0.3, nine seeds; bops5-recover-ramp0.3, six),
# with the ramp at 0.6 and 1e-3 (bops10-recover, bops5-recover; seeds 0-2, the AVX2 CPU) and without the recovery
# phase (bops10, bops5: seed 0, ramp 0.6)
DROP = {10: 1.1, 5: 2.7}
DROP_1E3 = {10: 1.0, 5: 4.2}
DROP_SLOW = {10: 2.1, 5: 5.4}
NO_RECOVERY = {10: 9.0, 5: 20.2}
# the built-in schedule, read from the recipe schema's defaults (the built-in recipes set the same): budget_ramp 0.3
# and budget_recover_lr 3e-3 since 2026-12-07 (1e-3 before: +1.58 +- 0.41 at 5% with 3e-3, six seeds; +0.20 +- 0.70
# at 10%, six; -0.4 +- 0.5 on the demo at 3%, five). DROP was measured with these: a new default needs new figures.
RAMP = Recipe.model_fields["budget_ramp"].default
RECOVER = Recipe.model_fields["budget_recover_lr"].default
