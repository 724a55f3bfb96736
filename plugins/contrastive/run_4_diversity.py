"""Feature Diversity Loss Implementation: a progressive cosine penalty between activation patterns.

Notebook 002, run 4, on top of run 3: each latent's activations over the batch are normalised to
unit length, and their cosine similarities are penalised with a weight that grows linearly from 0
at the first step to `diversity_weight` (0.1) at the last; the dynamic L1 bounds and the contrast
threshold schedule are kept.
Readings chosen: each latent pays the weight times its mean cosine with the other latents, summed
over latents, Σ_i mean_{j≠i} cos(f_i, f_j), as each latent pays its own L1: the weight is a
per-latent price, the same at any d_sae, against a reconstruction loss summed over dimensions (not
the mean over all pairs, the same divided by d_sae). It is computed exactly from the
column-normalised code F̂ as (‖F̂ 1‖² − ‖F̂‖²) / (d_sae − 1), so no d_sae × d_sae matrix is formed.
The weight is logged as `diversity_weight`.
"""

from dataclasses import dataclass

import torch

from plugins.contrastive import run_3_lambda_bounds as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    diversity_weight: float = 0.1


class SAE(parent.SAE):
    def diversity_loss(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d_sae) code -> Σ_i mean_{j≠i} cos(f_i, f_j), f_i latent i's activations over the batch."""
        unit = f / f.norm(dim=0, keepdim=True).clamp_min(1e-8)
        n = f.shape[1]
        return (unit.sum(1).pow(2).sum() - unit.pow(2).sum()) / (n - 1)

    def aux_losses(self, fwd):
        terms = super().aux_losses(fwd)
        weight = self.hp.diversity_weight * self.progress(fwd.step)
        fwd.stats["diversity_weight"] = weight
        return {**terms, "diversity_loss": weight * self.diversity_loss(fwd.f)}
