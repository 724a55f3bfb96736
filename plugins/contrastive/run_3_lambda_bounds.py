"""Step-Dependent λ_i Bounds Implementation: per-latent L1 weights in annealed bounds.

Notebook 002, run 3, on top of run 2. Each latent's L1 term is weighted by
λ_i = clamp(u_i / mean(u), lo(t), hi(t)), u being the EMA utilisation of run 1, and the bounds
move from [0.02, 1.0] at the first step to [0.01, 0.5] at the last on the same cosine as the
contrast threshold (both schedules synchronised with training progress).
Readings chosen: the notebook calls λ_i "l1 penalty bounds", so λ_i multiplies the run's
sparsity penalty per latent; λ_i grows with how much a latent is used relative to the mean, so
rarely used latents pay less L1 and frequently used ones pay at most the upper bound. The bounds
and the spread of λ are logged per step (lambda_lo, lambda_hi, lambda_min, lambda_max,
lambda_mean).
"""

from dataclasses import dataclass

import torch

from plugins.contrastive import run_2_cosine_threshold as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    lambda_lo_start: float = 0.02
    lambda_hi_start: float = 1.0
    lambda_lo_end: float = 0.01
    lambda_hi_end: float = 0.5


class SAE(parent.SAE):
    def lambda_bounds(self, step: int) -> tuple[float, float]:
        hp = self.hp
        return (self.anneal(hp.lambda_lo_start, hp.lambda_lo_end, step),
                self.anneal(hp.lambda_hi_start, hp.lambda_hi_end, step))

    def latent_lambdas(self, step: int) -> torch.Tensor:
        lo, hi = self.lambda_bounds(step)
        return (self.utilisation / self.utilisation.mean().clamp_min(1e-12)).clamp(lo, hi)

    def sparsity_loss(self, fwd):
        return self.sparsity_coefficient(fwd) * (fwd.f.abs() * self.latent_lambdas(fwd.step)).sum(-1).mean()

    def aux_losses(self, fwd):
        terms = super().aux_losses(fwd)
        lo, hi = self.lambda_bounds(fwd.step)
        lam = self.latent_lambdas(fwd.step)
        fwd.stats.update(lambda_lo=lo, lambda_hi=hi, lambda_min=lam.min(), lambda_max=lam.max(),
                         lambda_mean=lam.mean())
        return terms
