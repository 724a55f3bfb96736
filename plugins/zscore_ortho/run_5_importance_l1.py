"""Gradient Scaling Based on Feature Importance: a per-latent weighted L1.

Notebook 000, run 5, on top of run 4. Each latent's L1 weight is its importance, the EMA of its
mean activation times its decoder norm, divided by the mean importance and clipped to
[min_weight, max_weight]; heavily used latents pay more, which scales their gradients.
Reading chosen: importance is usage (mean activation) × decoder norm, as in feature-importance
scores of the SAE literature; the weights are statistics (no gradient flows through them).
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
        usage = fwd.f.mean(0) * self.decoder_weight().norm(dim=1)
        d = self.hp.ema_decay
        self.importance.mul_(d).add_((1 - d) * usage)

    def sparsity_loss(self, fwd):
        weights = (self.importance / self.importance.mean().clamp_min(1e-12)).clamp(
            self.hp.min_weight, self.hp.max_weight)
        return self.sparsity_coefficient(fwd) * (fwd.f.abs() * weights).sum(-1).mean()
