"""Gradient Balancing Implementation: every latent's encoder and decoder gradient scaled to the mean norm.

Notebook 002, run 6, on top of run 5: before the optimizer step, each latent's encoder gradient
(a column of W_enc) and decoder gradient (a row of W_dec) is rescaled to the mean norm over the
latents that received any gradient (epsilon-guarded), so every feature learns at a similar
rate; loss and architecture are unchanged. Reading chosen: "mean norm scaling" is per latent,
separately for encoder and decoder; latents with no gradient stay untouched. The spread of the
encoder's per-latent gradient norms before balancing (std / mean) is logged as `grad_norm_cv`.
"""

from dataclasses import dataclass

import torch

from plugins.contrastive import run_5_gram_schmidt as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    balance_eps: float = 1e-12


@torch.no_grad()
def balance_(grad: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    """Rescale the slices of grad along `dim` to their mean norm; returns the norms before."""
    norms = grad.norm(dim=dim, keepdim=True)
    live = norms > eps
    if live.any():
        grad.mul_(torch.where(live, norms[live].mean() / norms.clamp_min(eps), 1.0))
    return norms[live]


class Trainer(parent.Trainer):
    def __init__(self, sae, cfg):
        super().__init__(sae, cfg)
        self.grad_norm_cv = 0.0

    def apply_update(self, step):
        sae, eps = self.sae, self.sae.hp.balance_eps
        norms = balance_(sae.W_enc.grad, 0, eps)  # one column per latent
        balance_(sae.W_dec.grad, 1, eps)  # one row per latent
        self.grad_norm_cv = float(norms.std() / norms.mean()) if len(norms) > 1 else 0.0
        super().apply_update(step)

    def after_step(self, x, out, step):
        super().after_step(x, out, step)
        out.stats["grad_norm_cv"] = self.grad_norm_cv
