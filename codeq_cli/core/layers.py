"""The layer types codeq quantizes, in one place (``docs/method.md``, "Which layers").

Every module of :mod:`codeq_cli.core` that asks "is this a convolution or a
linear layer?" imports the answer from here, so the insertion of weight
quantizers (:mod:`~codeq_cli.core.insert`), of input quantizers
(:mod:`~codeq_cli.core.act_quant`) and the cost model (:mod:`~codeq_cli.core.bops`)
agree, and none of them imports another for it.
"""

from __future__ import annotations

from torch import nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LINEAR = (nn.Linear, nn.Bilinear)
