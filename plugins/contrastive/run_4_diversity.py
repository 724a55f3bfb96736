"""Feature Diversity Loss Implementation: a progressive cosine penalty between activation patterns.

Notebook 002, run 4, on top of run 3: each latent's activations over the batch are normalised to
unit length, and the mean cosine similarity over all latent pairs is penalised with a weight
that grows linearly from 0 at the first step to `diversity_weight` (0.1) at the last; the
dynamic L1 bounds and the contrast threshold schedule are kept. Reading chosen: the mean over
pairs is computed exactly from the column-normalised code F̂ as (‖F̂ 1‖² − ‖F̂‖²) / (d_sae(d_sae−1)),
so no d_sae × d_sae matrix is formed. The weight is logged as `diversity_weight`.
"""

from dataclasses import dataclass

import torch

from plugins.contrastive import run_3_lambda_bounds as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    diversity_weight: float = 0.1


class SAE(parent.SAE):
    def diversity_loss(self, f: torch.Tensor) -> torch.Tensor:
        unit = f / f.norm(dim=0, keepdim=True).clamp_min(1e-8)
        n = f.shape[1]
        return (unit.sum(1).pow(2).sum() - unit.pow(2).sum()) / (n * (n - 1))

    def aux_losses(self, fwd):
        terms = super().aux_losses(fwd)
        weight = self.hp.diversity_weight * self.progress(fwd.step)
        fwd.stats["diversity_weight"] = weight
        return {**terms, "diversity_loss": weight * self.diversity_loss(fwd.f)}
