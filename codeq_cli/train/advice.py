"""Whether a BOPs target is aggressive for the steps it is given: the warning ``compress`` gives before training.

``docs/method.md``, "Aggressive budgets in short runs" (codeq's extension,
not the paper's). With float activations a layer's BOPs are
``bits · (1 − sparsity) · 32 · MACs``, so a target of ``P`` percent of the
dense FP32 BOPs leaves the weights on average

    B = P/100 · 32 · 32 / a        bits per weight (bit-width × kept share)

for activations at ``a`` bits (32: float). ``B`` is what the weights must
be squeezed to; the steps are the time they have to recover. Measured on an
ImageNet-pretrained EfficientNet-Lite0 fine-tuned to Fashion-MNIST
(``docs/transfer.md``) the budget path held up where ``B`` stayed above
:data:`LOW_BITS` and lost many points below it in :data:`FEW_STEPS` steps or
fewer: with the recovery phase of the built-in recipes, 2.1 points below the
FP model trained as long at 10% (``B`` = 3.2; mean of three seeds; 0.3 with
``budget_ramp`` 0.3) and 5.4 at 5% (``B`` = 1.6) in 138 steps; without it 9.0 and 20.2.
With 8-bit activations (``B`` four times larger) 5% lost 1.0.
Plain Python, no torch: the CLI's tests call it directly.
"""

from __future__ import annotations

LOW_BITS = 4.0  # B below this: aggressive (10% BOPs with float activations is 3.2, 5% is 1.6)
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
    if b >= LOW_BITS or steps > FEW_STEPS:
        return None
    floats = recipe.act_bits is None
    fix = ("with 8-bit activations (--set act_bits=8) the same target leaves 4x as many" if floats
           else "raise act_bits or the target")
    if recipe.budget_recover_lr is not None and recipe.budget_ramp > RAMP and b >= RAMP_BITS:
        fix = f"reach the target sooner (--set budget_ramp={RAMP:g}: {DROP[10]:g} -> {DROP_RAMP[10]:g} at 10%); " + fix
    if recipe.budget_recover_lr is None:
        fix = f"turn the recovery phase on (--set budget_recover_lr=1e-3: {NO_RECOVERY[5]:g} -> {DROP[5]:g} at 5%); " + fix
    return (f"--target-bops {target:g} leaves the weights {b:.2g} bits each on average (bit-width x kept share) "
            f"and {steps} steps to recover: measured, a pretrained EfficientNet-Lite0 lost {DROP[10]:g} top-1 points "
            f"at 10% BOPs and {DROP[5]:g} at 5% in 138 steps (docs/transfer.md); {fix}, or give more epochs "
            f"(--max-drop finds the figure where the drop holds)")


# docs/transfer.md: against the FP model trained as long (5,000 test images), weights only, 138 steps;
# target % -> top-1 points lost with the recovery phase (bops10-recover, bops5-recover: means of seeds 0-2),
# with it and the target reached at 30% of the steps (bops10-recover-ramp0.3, seeds 0-2), and without it (seed 0)
DROP = {10: 2.1, 5: 5.4}
DROP_RAMP = {10: 0.3}
NO_RECOVERY = {10: 9.0, 5: 20.2}
RAMP, RAMP_BITS = 0.3, 2.5  # the ramp advised where it was measured to help: about 10% BOPs with float activations
