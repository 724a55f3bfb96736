"""Initial Implementation: z-score thresholds, interference-weighted orthogonality, reactivation.

Notebook 000, run 1. A latent fires only when its pre-activation exceeds EMA(μ) + z·EMA(σ) of
its own pre-activations (z = 2). The orthogonality penalty on the decoder overlap of latent pairs
is weighted linearly by EMA(h_i h_j) − τ, on the pairs whose co-activation exceeds τ. Dead
latents that interfere most with live ones are revived.

Readings chosen where the notebook is vague: h is the latents' activation, so EMA(h_i h_j) is the
EMA of the feature covariance E_batch[f_i f_j] (uncentred; the notebook's "covariance"), held at
rank 32 as a factor U (d_sae × 32, the EMA ≈ UUᵀ) and updated from a rank-32 randomized SVD of the
batch's latents (never the B × d_sae × d_sae product, nor a d_sae × d_sae buffer): the kept factor
and the batch's are stacked and re-compressed to their top 32 directions; the most co-active
pairs are read from UUᵀ in blocks of rows. τ is in its units (the SAE trains on activations of mean norm √d_in). A pair's overlap adds
2·f_i·f_j·cos(d_i, d_j) to the squared norm of a token's reconstruction, so the penalty is the
energy of that overlap beyond the tolerated co-activation, summed over at most `max_pairs` pairs,
the most co-active first:

    ortho_loss = ortho_weight · Σ 2·(EMA(h_i h_j) − τ)·|cos(d_i, d_j)|

in the reconstruction loss's own units, so that its weight is a share of something the loss
weighs.

Every `revive_every` notebook steps (500, scaled to the run's length: a tenth of the run, 1M
tokens at the notebook's scale, as the harness's dead-latent window) up to `max_revive` latents
that fired in none of the period's steps, those whose decoder row has the largest |cos| with
another row first, are re-initialised on the worst-reconstructed inputs of the batch, their
threshold statistics restart from their pre-activations on that batch, and their Adam state is
reset. Each revival is recorded (artifacts `revived_at`: the step, -1 for never; `revived_max_cos`:
the new row's max |cos| with every other row right after it is written, the revived direction at
revival) for the notebook's "reactivation impact on feature diversity" (`python experiment.py
analyse zscore_ortho reactivation`).
"""

from dataclasses import dataclass

import torch

from plugins.baseline import run_0_baseline as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    z: float = 2.0
    ema_decay: float = 0.99
    tau: float = 0.1
    ortho_weight: float = 0.1
    svd_rank: int = 32
    max_pairs: int = 4096
    revive_every: int = 500  # notebook steps
    max_revive: int = 64


class SAE(parent.SAE):
    def __init__(self, d_in, d_sae, hp, cfg, device=torch.device("cpu"), dtype=torch.float32):
        super().__init__(d_in, d_sae, hp, cfg, device, dtype)
        self.register_buffer("pre_mean", torch.zeros(d_sae, device=device))
        self.register_buffer("pre_var", torch.zeros(d_sae, device=device))
        self.register_buffer("coactivation_factor", torch.zeros(d_sae, min(hp.svd_rank, d_sae), device=device))
        # The revival record, for the reactivation analysis (analyses.py): each latent's step of
        # last revival (-1: never) and its new decoder row's max |cos| with every other row then.
        self.register_buffer("revived_at", torch.full((d_sae,), -1, dtype=torch.long, device=device))
        self.register_buffer("revived_max_cos", torch.zeros(d_sae, device=device))

    def threshold(self) -> torch.Tensor:
        return self.pre_mean + self.hp.z * self.pre_var.sqrt()

    def activation(self, pre, x):
        return torch.relu(pre) * (pre > self.threshold())

    def observe(self, fwd):
        """EMA of each latent's pre-activation mean and variance, and of the latents' covariance
        FᵀF / B (rank-`svd_rank` randomized SVD of F, the batch's (B, d_sae) latents)."""
        self.update_ema(self.pre_mean, fwd.pre.mean(0))
        self.update_ema(self.pre_var, fwd.pre.var(0))
        self.update_coactivation(fwd.f)

    def ema_keep(self) -> float:
        """d, the share of a running statistic each update keeps: ema_decay."""
        return self.hp.ema_decay

    def update_ema(self, statistic: torch.Tensor, batch_value: torch.Tensor) -> None:
        """statistic ← d·statistic + (1 − d)·batch_value."""
        statistic.lerp_(batch_value, 1 - self.ema_keep())

    def update_coactivation(self, f: torch.Tensor) -> None:
        """UUᵀ ← the best rank-r approximation of d·UUᵀ + (1 − d)·FᵀF/B, FᵀF/B ≈ (V S)(V S)ᵀ/B from
        the randomized SVD: the factor [√d U, √(1−d) V S/√B] re-compressed by a QR and the SVD of
        its small R (d_sae × 2r at most, never d_sae × d_sae)."""
        _, s, v = torch.svd_lowrank(f, q=min(self.hp.svd_rank, *f.shape), niter=2)
        keep, u = self.ema_keep(), self.coactivation_factor
        stacked = torch.cat([keep ** 0.5 * u, (1 - keep) ** 0.5 * v * s / len(f) ** 0.5], dim=1)
        q, r = torch.linalg.qr(stacked)
        left, sv, _ = torch.linalg.svd(r, full_matrices=False)
        rank = u.shape[1]
        u.copy_((q @ left[:, :rank]) * sv[:rank])

    def aux_losses(self, fwd):
        return {"ortho_loss": self.hp.ortho_weight * self.ortho_penalty()}

    def ortho_penalty(self) -> torch.Tensor:
        """Σ 2·(EMA(h_i h_j) − τ)·|cos(d_i, d_j)| over the `max_pairs` most co-active pairs i < j;
        pairs at or below τ weigh 0."""
        weights, flat = self.coactive_pairs()
        w_dec = self.decoder_weight()
        cos = (w_dec[flat // self.cfg.d_sae] * w_dec[flat % self.cfg.d_sae]).sum(-1)
        return (2 * weights * cos.abs()).sum()

    @torch.no_grad()
    def max_abs_cosine(self, latents: torch.Tensor) -> torch.Tensor:
        """Each of these latents' decoder row's max |cos| with every other row (of the decoder used)."""
        w = torch.nn.functional.normalize(self.decoder_weight(), dim=1)
        cos = (w[latents] @ w.T).abs()
        cos[torch.arange(len(latents)), latents] = 0.0
        return cos.amax(dim=1)

    @torch.no_grad()
    def coactive_pairs(self, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """The `max_pairs` largest max(EMA(h_i h_j) − τ, 0) over pairs i < j and their flat ids
        i·d_sae + j, from UUᵀ `rows` rows at a time."""
        u, n = self.coactivation_factor, self.cfg.d_sae
        k = min(self.hp.max_pairs, n * (n - 1) // 2)
        columns, weights, ids = torch.arange(n, device=u.device), [], []
        for start in range(0, n, rows):
            block = u[start:start + rows] @ u.T - self.hp.tau
            upper = columns > columns[start:start + rows, None]  # j > i: each pair once
            top = block.where(upper, 0.0).clamp_min(0).flatten().topk(min(k, block.numel()))
            weights.append(top.values)
            ids.append(top.indices + start * n)
        top = torch.cat(weights).topk(k)
        return top.values, torch.cat(ids)[top.indices]

    def artifacts(self):
        return {"revived_at": self.revived_at, "revived_max_cos": self.revived_max_cos}


class Trainer(parent.Trainer):
    """Adds dead-latent reactivation after the optimizer step."""

    def __init__(self, sae, cfg):
        super().__init__(sae, cfg)
        self.last_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_dec.device)
        self.revived = 0

    def after_step(self, x, out, step):
        self.last_fired[(out.latents > 0).any(0)] = step
        period = self.run_cfg.scaled_steps(self.sae.hp.revive_every)
        if step > 0 and step % period == 0:
            self.revive(x, step, period)
        out.stats["revived_total"] = torch.tensor(self.revived)

    @torch.no_grad()
    def revive(self, x: torch.Tensor, step: int, period: int) -> None:
        """Re-initialise up to max_revive latents that fired in none of the last `period` steps."""
        sae, hp = self.sae, self.sae.hp
        dead = (self.last_fired <= step - period).nonzero().squeeze(-1)
        if len(dead) == 0:
            return
        cos = sae.W_dec[dead] @ sae.W_dec.T
        cos[torch.arange(len(dead)), dead] = 0
        interference = cos.abs().amax(dim=1)
        order = interference.argsort(descending=True)[: hp.max_revive]
        dead = dead[order]
        residual = x - sae.reconstruct(x, sae.encode(x))  # skip paths (run 4 on) included
        worst = residual.norm(dim=-1).argsort(descending=True)[: len(dead)]
        directions = residual[worst] / residual[worst].norm(dim=-1, keepdim=True).clamp_min(1e-8)
        dead = dead[: len(directions)]
        sae.revived_at[dead] = step
        sae.W_dec[dead] = directions
        sae.revived_max_cos[dead] = sae.max_abs_cosine(dead)
        sae.W_enc[:, dead] = directions.T * 0.2
        sae.b_enc[dead] = 0.0
        # A revived latent is a new latent: its threshold statistics restart from its
        # pre-activations on this batch, so it fires only above mean + z·σ like every other latent.
        pre = sae.pre_activation(x)[:, dead]
        sae.pre_mean[dead] = pre.mean(0)
        sae.pre_var[dead] = pre.var(0)
        sae.coactivation_factor[dead] = 0.0  # their rows and columns of UUᵀ
        self.reset_optimizer_state(dead)
        self.last_fired[dead] = step
        self.revived += len(dead)

