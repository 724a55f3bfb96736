"""Adaptive Learning Rates with Momentum-Based Importance Sampling Implementation.

Notebook 002, run 8, on top of run 7. Each latent's importance (its mean activation; decoder rows
have unit norm) is tracked with momentum (β = 0.9). (1) Per-group learning rates: a group's
update is scaled by √(mean importance / group importance), clipped to [`lr_min`, `lr_max`], so
under-used groups learn faster. (2) Importance sampling for batch construction: the training
batch is redrawn, with replacement and the same size, from the harness's batch with
probabilities mixing uniform and a score (weight `sampling_mix`): the score of a token is its
code weighted by each latent's rarity 1 / (1 + importance / mean importance), so tokens that use
under-trained latents are seen more often.
Readings chosen: Adam is invariant to gradient scale, so the per-group rate scales the
parameter update itself (W_enc columns, W_dec rows, b_enc and the group thresholds), not the
gradient; the sampling draws from the current batch (the harness supplies the data) with
torch's global RNG, and the loss is not reweighted (the sampling is meant to shift emphasis).
Logged: the multipliers' min/max and the sample's effective size and unique fraction per step;
final_info holds the per-group multipliers and importances.
"""

from dataclasses import dataclass

import torch

from plugins.contrastive import run_7_group_sparsity as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    importance_momentum: float = 0.9
    lr_min: float = 0.5
    lr_max: float = 2.0
    sampling_mix: float = 0.5


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("importance", torch.zeros(self.cfg.d_sae, device=self.W_dec.device))

    def group_importance(self) -> torch.Tensor:
        return self.group_sum(self.importance[None])[0] / self.group_sizes

    def group_lr_multipliers(self) -> torch.Tensor:
        g = self.group_importance()
        return ((g.mean() + 1e-12) / (g + 1e-12)).sqrt().clamp(self.hp.lr_min, self.hp.lr_max)

    @torch.no_grad()
    def training_batch(self, x, step):
        rarity = 1 / (1 + self.importance / self.importance.mean().clamp_min(1e-12))
        score = self.encode(x) @ rarity
        mix = self.hp.sampling_mix
        p = (1 - mix) / len(x) + mix * score / score.sum().clamp_min(1e-12)
        p = p / p.sum()
        idx = torch.multinomial(p, len(x), replacement=True)
        return x[idx], {"sampling_ess_fraction": 1 / (p.pow(2).sum() * len(x)),
                        "sampling_unique_fraction": idx.unique().numel() / len(x)}

    def observe(self, fwd):
        super().observe(fwd)
        m = self.hp.importance_momentum
        self.importance.mul_(m).add_((1 - m) * fwd.f.mean(0))

    def aux_losses(self, fwd):
        terms = super().aux_losses(fwd)
        lr = self.group_lr_multipliers()
        fwd.stats.update(group_lr_min=lr.min(), group_lr_max=lr.max())
        return terms

    def final_info(self):
        return {**super().final_info(),
                "group_lr_multipliers": [round(v, 6) for v in self.group_lr_multipliers().tolist()],
                "group_importance": [round(v, 6) for v in self.group_importance().tolist()]}


class Trainer(parent.Trainer):
    def update_scales(self):
        """Each latent's weights at its group's rate, and each group's threshold."""
        sae = self.sae
        group = sae.group_lr_multipliers()
        latent = group[sae.group_index]
        return [*super().update_scales(), (sae.W_enc, latent, 1), (sae.W_dec, latent, 0), (sae.b_enc, latent, 0),
                (sae.group_thresholds, group, 0)]
