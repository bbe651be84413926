"""The CoDeQ penalty, the one regularizer of the loss (``docs/method.md``, "The objective").

::

    L = task + p · (λ_dz Σ w_ℓ θ_dz,ℓ² + λ_bit Σ w_ℓ θ_bit,ℓ² + λ_act_bit Σ w_a θ_act,a²)

With λ as given (the paper's way) every ``w = 1`` and there is no pressure
``p``: the plain sums. Under a budget the controller
(:class:`codeq_cli.train.controller.Controller`) supplies the per-layer
weights and the pressure. Both go through :func:`penalty`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def penalty(dz: Sequence[torch.Tensor], bit: Sequence[torch.Tensor], lambda_dz: float, lambda_bit: float,
            device=None, *, act: Sequence[torch.Tensor] = (), lambda_act: float = 0.0,
            weights: Sequence[float] | None = None, act_weights: Sequence[float] | None = None,
            pressure: float | None = None) -> torch.Tensor:
    """``p · Σ_groups λ Σ w θ²`` over the dead-zone, bit and activation-bit logits.

    ``weights`` (one per quantized layer, for ``dz`` and ``bit``) and
    ``act_weights`` (one per learned activation width; lists or tensors on the
    logits' device) default to 1, and
    ``pressure`` to none; a group with no logits or λ = 0 adds nothing.
    """
    total = torch.zeros((), device=dz[0].device if dz else device)
    for lam, group, w in ((lambda_dz, dz, weights), (lambda_bit, bit, weights), (lambda_act, act, act_weights)):
        if not group or not lam:
            continue
        squares = torch.stack(list(group)).square()  # one stack, one square: launches independent of the layer count
        if w is not None:
            if not isinstance(w, torch.Tensor):
                w = torch.tensor(list(w), dtype=group[0].dtype, device=group[0].device)
            squares = w * squares
        total = total + lam * squares.sum()
    return total if pressure is None else pressure * total
