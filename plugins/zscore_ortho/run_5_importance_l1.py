"""Gradient Scaling Based on Feature Importance: a per-latent weighted L1.

Notebook 000, run 5, on top of run 4. Each latent's L1 weight is its importance, the EMA of its
mean activation over the batch, divided by the mean importance and clipped to
[min_weight, max_weight]: heavily used latents pay more sparsity, and each latent's sparsity
gradient is scaled by its importance.

Readings chosen: the notebook names "the weighted L1 loss and scaled gradients". Importance
scores in the SAE literature are usage × decoder norm; decoder rows are unit norm here, so that
factor is 1 and importance is usage, the mean norm of the latent's contribution f_i·d_i to the
reconstruction. Multiplying a latent's gradients by a factor would change almost nothing under
Adam (its update is invariant to a constant scale of the gradient), so the scaling acts through
the L1 weights, where it shifts each latent's balance between reconstruction and sparsity. The
importance EMA starts from the first batch's usage (run 2's initialisation), so the weights act
from the first step; they are statistics (no gradient flows through them).
"""

from dataclasses import dataclass

import torch

from plugins.zscore_ortho import run_4_skip as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    min_weight: float = 0.5
    max_weight: float = 2.0


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("importance", torch.ones(self.cfg.d_sae, device=self.W_dec.device))

    def observe(self, fwd):
        super().observe(fwd)
        self.update_ema(self.importance, fwd.f.mean(0))

    def l1_weights(self) -> torch.Tensor:
        """(d_sae,) importance / its mean, clipped to [min_weight, max_weight]."""
        return (self.importance / self.importance.mean().clamp_min(1e-12)).clamp(self.hp.min_weight, self.hp.max_weight)

    def sparsity_loss(self, fwd):
        return self.sparsity_coefficient(fwd) * (fwd.f.abs() * self.l1_weights()).sum(-1).mean()
