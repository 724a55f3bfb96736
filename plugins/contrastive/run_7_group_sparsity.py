"""Hierarchical Group-Sparse Feature Structure Implementation: 16 latent groups with structured sparsity.

Notebook 002, run 7, on top of run 6. The latents are split into 16 contiguous groups. Each group
has a learnable activation threshold subtracted from its latents' pre-activations (group-specific
activation); per token only the `active_groups` strongest groups are kept (masking); a group
lasso term Σ_g ‖f_g‖₂ adds structured sparsity; and a cosine penalty between the groups'
activation profiles over the batch, weighted progressively 0 → `group_similarity_weight` like the
diversity loss, pushes groups to specialise. Diversity loss, gradient balancing and every
schedule are kept.
Readings chosen: a group's strength is the RMS of its latents' activations (group-wise
normalisation, so groups compare on one scale), used for the masking and, normalised over the
batch, for the group similarity; the latent activations themselves are not rescaled (a linear
decoder would absorb it). The group lasso weight is relative to the run's sparsity penalty.
Group activity (EMA of the fraction of tokens on which each group is kept and fires) and the
group thresholds go into the train log (min/max) and final_info (per group).
"""

from dataclasses import dataclass

import torch

from plugins.contrastive import run_6_grad_balance as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    n_groups: int = 16
    active_groups: int = 8
    group_sparsity_weight: float = 0.5
    group_similarity_weight: float = 0.1


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device, d_sae, n = self.W_dec.device, self.cfg.d_sae, self.hp.n_groups
        self.register_buffer("group_index", torch.arange(d_sae, device=device) * n // d_sae)
        self.register_buffer("group_sizes", torch.bincount(self.group_index, minlength=n).float())
        self.register_buffer("group_activity", torch.zeros(n, device=device))
        self.group_thresholds = torch.nn.Parameter(torch.zeros(n, device=device))

    def group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """(B, d_sae) -> (B, n_groups): sums over each group's latents."""
        return values.new_zeros(len(values), self.hp.n_groups).index_add(1, self.group_index, values)

    def group_strength(self, f: torch.Tensor) -> torch.Tensor:
        return (self.group_sum(f.pow(2)) / self.group_sizes + 1e-12).sqrt()

    def pre_activation(self, x):
        return super().pre_activation(x) - self.group_thresholds[self.group_index]

    def activation(self, pre, x):
        f = super().activation(pre, x)
        with torch.no_grad():
            top = self.group_strength(f).topk(min(self.hp.active_groups, self.hp.n_groups), dim=1).indices
            kept = torch.zeros(len(f), self.hp.n_groups, device=f.device).scatter_(1, top, 1.0)
        return f * kept[:, self.group_index]

    def group_similarity(self, f: torch.Tensor) -> torch.Tensor:
        profiles = torch.nn.functional.normalize(self.group_strength(f), dim=0)
        n = self.hp.n_groups
        return ((profiles.T @ profiles).sum() - profiles.pow(2).sum()) / (n * (n - 1))

    def observe(self, fwd):
        super().observe(fwd)
        beta = self.hp.ema_beta
        active = (self.group_sum((fwd.f > 0).float()) > 0).float().mean(0)
        self.group_activity.mul_(beta).add_((1 - beta) * active)

    def aux_losses(self, fwd):
        terms = super().aux_losses(fwd)
        f, hp = fwd.f, self.hp
        group_norms = (self.group_sum(f.pow(2)) + 1e-12).sqrt()
        similarity_weight = hp.group_similarity_weight * self.progress(fwd.step)
        fwd.stats.update(group_activity_min=self.group_activity.min(), group_activity_max=self.group_activity.max(),
                         group_threshold_min=self.group_thresholds.detach().min(),
                         group_threshold_max=self.group_thresholds.detach().max())
        return {**terms,
                "group_sparsity_loss": self.sparsity_coefficient(fwd) * hp.group_sparsity_weight
                * group_norms.sum(-1).mean(),
                "group_similarity_loss": similarity_weight * self.group_similarity(f)}

    def final_info(self):
        return {**super().final_info(), "n_groups": self.hp.n_groups,
                "group_activity": [round(v, 6) for v in self.group_activity.tolist()],
                "group_thresholds": [round(v, 6) for v in self.group_thresholds.detach().tolist()]}

