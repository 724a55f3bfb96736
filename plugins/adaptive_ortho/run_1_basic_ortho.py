"""Basic Orthogonality Loss (α=0.1): between-group orthogonality over periodically regrouped latents.

Notebook 001, run 1. Latents are split into `n_groups` feature groups; decoder directions of
latents in different groups are pushed to be orthogonal, while latents of the same group may
share directions (the controlled sharing). The loss adds α · (1/d_sae) Σ_i Σ_j cos²(d_i, d_j)
over pairs (i, j) in different groups, i.e. α times each latent's summed squared overlap with the
other groups, averaged over latents, with α = 0.1. Every `group_every` notebook steps the groups
are recomputed from the current batch. At the end, the condition number σ_max/σ_min of each
group's decoder subspace (its decoder rows) goes to final_info.json under
`subspace_condition_numbers` (per group, max, mean, group sizes); the groups are saved as the
`feature_group` artifact.

Readings chosen where the notebook is vague: α is the weight of the orthogonality loss (the
notebook's run 7 calls it so), so a smaller α allows more sharing; `--set alpha=...` is the
α ablation. "Adaptive" means the penalty follows the learned grouping. Batch-wise grouping is a
spherical k-means, warm-started from the current groups, of each latent's activation-weighted
mean of the batch's centred inputs (latents that fire on similar inputs share a group); latents
that do not fire in the batch keep their group. The between-group sum of cos² is the full sum
‖WᵀW‖²_F minus the within-group sums, so only d_in × d_in (or group-sized) Gram matrices are
formed, never d_sae × d_sae.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plugins.baseline import run_0_baseline as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    alpha: float = 0.1
    n_groups: int = 8
    group_every: int = 100  # notebook steps between regroupings
    kmeans_iters: int = 5


def latent_profiles(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """(d_sae, d_in): each latent's activation-weighted sum of the batch's centred inputs."""
    return f.T @ (x - x.mean(0))


class SAE(parent.SAE):
    def __init__(self, d_in, d_sae, hp, cfg, device=torch.device("cpu"), dtype=torch.float32):
        super().__init__(d_in, d_sae, hp, cfg, device, dtype)
        self.register_buffer("groups", torch.arange(d_sae, device=device) % hp.n_groups)

    def ortho_weight(self, step: int) -> float:
        """α, the orthogonality weight at this step (run 7 makes it a curriculum)."""
        return self.hp.alpha

    def aux_losses(self, fwd):
        alpha = self.ortho_weight(fwd.step)
        fwd.stats["alpha"] = torch.tensor(alpha)
        return {"ortho_loss": alpha * self.ortho_penalty()}

    def observe(self, fwd):
        """Batch-wise grouping: regroup from this batch every `group_every` (scaled) steps."""
        if fwd.step % self.run_cfg.scaled_steps(self.hp.group_every) == 0:
            self.regroup(latent_profiles(fwd.x, fwd.f), (fwd.f > 0).any(0))

    @torch.no_grad()
    def regroup(self, profiles: torch.Tensor, fired: torch.Tensor) -> None:
        """Spherical k-means of the fired latents' profiles, warm-started from the current groups;
        an emptied group is reseeded with a random fired latent."""
        if not fired.any():
            return
        points = F.normalize(profiles[fired], dim=1)
        groups, n = self.groups[fired], self.hp.n_groups
        for _ in range(self.hp.kmeans_iters):
            centroids = points.new_zeros(n, points.shape[1]).index_add_(0, groups, points)
            empty = torch.bincount(groups, minlength=n) == 0
            centroids[empty] = points[torch.randint(len(points), (int(empty.sum()),), device=points.device)]
            groups = (points @ F.normalize(centroids, dim=1).T).argmax(1)
        self.groups[fired] = groups

    def group_blocks(self) -> tuple[torch.Tensor, ...]:
        """The decoder rows of each group (one block per group, possibly empty)."""
        sizes = torch.bincount(self.groups, minlength=self.hp.n_groups).tolist()
        return self.decoder_weight()[self.groups.argsort()].split(sizes)

    def ortho_penalty(self) -> torch.Tensor:
        """Σ cos² over pairs of (unit) decoder rows in different groups, per latent."""
        w = self.decoder_weight()
        total = (w.T @ w).pow(2).sum()
        within = 0.0
        for rows in self.group_blocks():
            gram = rows @ rows.T if len(rows) < rows.shape[1] else rows.T @ rows
            within = within + gram.pow(2).sum()
        return (total - within) / self.cfg.d_sae

    @torch.no_grad()
    def final_info(self):
        """Condition number σ_max/σ_min of each group's decoder rows (None for an empty group)."""
        conds = []
        for rows in self.group_blocks():
            s = torch.linalg.svdvals(rows.double()) if len(rows) else None
            conds.append(None if s is None else round((s[0] / s[-1]).item(), 4))
        found = [c for c in conds if c is not None]
        return {"subspace_condition_numbers": {
            "per_group": conds, "max": max(found), "mean": round(sum(found) / len(found), 4),
            "group_sizes": torch.bincount(self.groups, minlength=self.hp.n_groups).tolist()}}

    def artifacts(self):
        return {"feature_group": self.groups}
