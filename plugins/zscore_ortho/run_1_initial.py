"""Initial Implementation: z-score thresholds, interference-weighted orthogonality, reactivation.

Notebook 000, run 1. A latent fires only when its pre-activation exceeds EMA(μ) + z·EMA(σ) of
its own pre-activations (z = 2). The orthogonality penalty is weighted linearly by
EMA(h_i h_j) − τ on the latent pairs whose co-activation exceeds τ, times their squared decoder
cosine. Dead latents that interfere most with live ones are revived.

Readings chosen where the notebook is vague: h is the firing indicator, so EMA(h_i h_j) is the
co-firing rate and τ a rate; the co-activation EMA is updated from a rank-32 randomized SVD of
the batch's firing matrix (never the B × d_sae × d_sae product); the penalty covers at most
`max_pairs` pairs, the most co-active first; every `revive_every` steps up to `max_revive` dead
latents, those whose decoder row has the largest |cos| with another row first, are re-initialised
on the worst-reconstructed inputs of the batch, their threshold statistics restart from their
pre-activations on that batch, and their Adam state is reset.
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
    revive_every: int = 50
    max_revive: int = 64


class SAE(parent.SAE):
    def __init__(self, d_in, d_sae, hp, cfg, device=torch.device("cpu"), dtype=torch.float32):
        super().__init__(d_in, d_sae, hp, cfg, device, dtype)
        self.register_buffer("pre_mean", torch.zeros(d_sae, device=device))
        self.register_buffer("pre_var", torch.zeros(d_sae, device=device))
        self.register_buffer("coactivation", torch.zeros(d_sae, d_sae, device=device))

    def threshold(self) -> torch.Tensor:
        return self.pre_mean + self.hp.z * self.pre_var.sqrt()

    def activation(self, pre, x):
        return torch.relu(pre) * (pre > self.threshold())

    def observe(self, fwd):
        """EMA of each latent's pre-activation mean and variance, and of the co-firing matrix."""
        d = self.hp.ema_decay
        self.pre_mean.mul_(d).add_((1 - d) * fwd.pre.mean(0))
        self.pre_var.mul_(d).add_((1 - d) * fwd.pre.var(0))
        fired = (fwd.f > 0).float()
        _, s, v = torch.svd_lowrank(fired, q=min(self.hp.svd_rank, *fired.shape), niter=2)
        batch_coact = (v * s.pow(2)) @ v.T / len(fired)
        self.coactivation.mul_(d).add_((1 - d) * batch_coact)

    def aux_losses(self, fwd):
        return {"ortho_loss": self.hp.ortho_weight * self.ortho_penalty()}

    def ortho_penalty(self) -> torch.Tensor:
        """Σ (EMA(h_i h_j) − τ) cos²(d_i, d_j) over the most co-active pairs above τ, per pair."""
        excess = torch.triu(self.coactivation - self.hp.tau, diagonal=1).clamp_min(0).flatten()
        weights, flat = excess.topk(min(self.hp.max_pairs, excess.numel()))
        keep = weights > 0
        w_dec = self.decoder_weight()
        if not keep.any():
            return w_dec.sum() * 0.0
        d_sae = self.cfg.d_sae
        i, j = flat[keep] // d_sae, flat[keep] % d_sae
        cos = (w_dec[i] * w_dec[j]).sum(-1)
        return (weights[keep] * cos.pow(2)).sum() / keep.sum()


class Trainer(parent.Trainer):
    """Adds dead-latent reactivation after the optimizer step."""

    def __init__(self, sae, cfg):
        super().__init__(sae, cfg)
        self.last_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_dec.device)
        self.revived = 0

    def after_step(self, x, out, step):
        self.last_fired[(out.latents > 0).any(0)] = step
        if step > 0 and step % self.sae.hp.revive_every == 0:
            self.revive(x, step)
        out.stats["revived_total"] = torch.tensor(self.revived)

    @torch.no_grad()
    def revive(self, x: torch.Tensor, step: int) -> None:
        sae, hp = self.sae, self.sae.hp
        dead = (self.last_fired < step - hp.revive_every).nonzero().squeeze(-1)
        if len(dead) == 0:
            return
        cos = sae.W_dec[dead] @ sae.W_dec.T
        cos[torch.arange(len(dead)), dead] = 0
        interference = cos.abs().amax(dim=1)
        dead = dead[interference.argsort(descending=True)[: hp.max_revive]]
        residual = x - sae.decode(sae.encode(x))
        worst = residual.norm(dim=-1).argsort(descending=True)[: len(dead)]
        directions = residual[worst] / residual[worst].norm(dim=-1, keepdim=True).clamp_min(1e-8)
        dead = dead[: len(directions)]
        sae.W_dec[dead] = directions
        sae.W_enc[:, dead] = directions.T * 0.2
        sae.b_enc[dead] = 0.0
        # A revived latent is a new latent: its threshold statistics restart from its
        # pre-activations on this batch, so it fires only above mean + z·σ like every other latent.
        # (With the dead latent's stale threshold, the revived ones fired on most inputs at once.)
        pre = sae.pre_activation(x)[:, dead]
        sae.pre_mean[dead] = pre.mean(0)
        sae.pre_var[dead] = pre.var(0)
        sae.coactivation[dead] = 0.0
        sae.coactivation[:, dead] = 0.0
        self.reset_adam_state(dead)
        self.last_fired[dead] = step
        self.revived += len(dead)

    def reset_adam_state(self, dead: torch.Tensor) -> None:
        """Zero the optimizer's per-parameter buffers (moments) of the revived latents."""
        sae = self.sae
        for param, rows in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
            for buffer in self.optimizer.state.get(param, {}).values():
                if torch.is_tensor(buffer) and buffer.shape == param.shape:
                    buffer[rows] = 0.0
