"""Gradient Clipping Implementation: the global gradient norm is clipped to 1.0.

Notebook 003, run 6, on top of run 5: before each optimizer step the gradients of all
parameters are clipped to a total norm of `grad_clip` = 1.0. Reading chosen: clipping comes
before the harness removes each decoder row's radial gradient component, i.e. on the raw
gradient, as torch's clip_grad_norm_ in "the update step" would be.
"""

from dataclasses import dataclass

import torch

from plugins.freq_order import run_5_adaptive_l1 as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    grad_clip: float = 1.0


class Trainer(parent.Trainer):
    def apply_update(self, step):
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.sae.hp.grad_clip)
        super().apply_update(step)
