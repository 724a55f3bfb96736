"""Hard Orthogonality Constraints with Feature Decorrelation: orthonormal decoder blocks, decorrelated codes.

Notebook 002, run 10, on top of run 9: (1) hard orthogonality: after every optimizer step the
stored decoder rows are re-orthonormalised with the full Gram-Schmidt of run 5, in its blocks of
d_in rows (and at initialisation, with the encoder re-tied), so the constraint holds for the
weights themselves, not only in (2) the forward pass's Gram-Schmidt, which is kept; (3) a
decorrelation loss, `decorrelation_weight` × Σ_{i≠j} corr(f_i, f_j)² / d_sae over the batch; (4)
adaptive pruning: latents whose utilisation EMA falls to `prune_fraction` × the mean utilisation
are pruned; (5) the decoder gradient is projected onto the tangent space of the block-orthonormal
set, G ← G − sym(G Qᵀ) Q per block; (6) every `reinit_every` notebook steps the pruned (dead)
units, least used first and at most `max_reinit`, are re-initialised on the residuals of the
batch's worst-reconstructed inputs, their Adam state reset and their utilisation set to the mean;
each new row is the Gram-Schmidt of its residual against the other rows of its block, so the
live latents keep their rows exactly (re-orthonormalising the whole block would move them);
(7) batch-wise diversity tracking: the fraction of latents firing in the batch and the mean squared
off-diagonal correlation are logged per step, with the blocks' orthogonality error and the number
of re-initialised units.
Readings chosen: "pruning" selects the units the re-initialisation replaces (prune and regrow); the
threshold is adaptive through the mean utilisation. The correlation term uses the B × B Gram of the
standardised code, ‖C‖_F² = ‖Z Zᵀ‖_F² / B², never the d_sae × d_sae correlation matrix. Order of
the update: tangent projection, then run 8's and 6's updates, then the retraction.
"""

from dataclasses import dataclass

import torch

from plugins.contrastive import run_9_wta as parent
from plugins.contrastive.run_5_gram_schmidt import gram_schmidt


@dataclass
class Hyperparams(parent.Hyperparams):
    decorrelation_weight: float = 0.01
    prune_fraction: float = 0.01
    reinit_every: int = 250
    max_reinit: int = 256
    reinit_encoder_scale: float = 0.2


def blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """(n, d) -> (n_blocks, block, d), zero-padded at the end."""
    return torch.cat([w, w.new_zeros(-len(w) % block, w.shape[1])]).view(-1, block, w.shape[1])


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.retract()
        self.W_enc.data.copy_(self.W_dec.data.T)

    @torch.no_grad()
    def retract(self) -> None:
        self.W_dec.data.copy_(gram_schmidt(self.W_dec.data, self.gs_block_size()))

    @torch.no_grad()
    def place(self, rows: torch.Tensor, directions: torch.Tensor) -> None:
        """Decoder rows `rows` ← the Gram-Schmidt of `directions` (one each) within each block,
        orthogonal to the block's other rows, which stay exactly as they are."""
        w, block = self.W_dec.data, self.gs_block_size()
        for b in (rows // block).unique():
            mine = rows // block == b
            others = torch.arange(b * block, min((b + 1) * block, len(w)), device=w.device)
            others = others[~torch.isin(others, rows[mine])]
            d = directions[mine]
            for _ in range(2):  # twice: what is left of d can be small, and one pass loses its orthogonality
                d = d - (d @ w[others].T) @ w[others]
            q, r = torch.linalg.qr(d.T)
            w[rows[mine]] = (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).T

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        g, q = blocks(self.W_dec.grad, self.gs_block_size()), blocks(self.W_dec.data, self.gs_block_size())
        a = g @ q.transpose(1, 2)
        self.W_dec.grad.copy_((g - (a + a.transpose(1, 2)) / 2 @ q).flatten(0, 1)[: self.cfg.d_sae])

    @torch.no_grad()
    def ortho_error(self) -> torch.Tensor:
        q = blocks(self.W_dec.data, self.gs_block_size())
        gram = q @ q.transpose(1, 2)
        eye = torch.eye(gram.shape[-1], device=gram.device)
        real = (q.norm(dim=-1) > 0).float()  # padding rows are not part of the constraint
        return ((gram - eye) * real[:, :, None] * real[:, None, :]).abs().max()

    def correlation(self, f: torch.Tensor) -> torch.Tensor:
        """Σ_{i≠j} corr(f_i, f_j)² over the batch; constant (dead) latents count as uncorrelated."""
        z = f - f.mean(0)
        z = z / (z.pow(2).mean(0) + 1e-6).sqrt()
        gram = z @ z.T / len(f)
        return gram.pow(2).sum() - z.pow(2).mean(0).pow(2).sum()

    def aux_losses(self, fwd):
        terms = super().aux_losses(fwd)
        f, n = fwd.f, self.cfg.d_sae
        off_diagonal = self.correlation(f)
        fwd.stats.update(batch_active_fraction=(f > 0).any(0).float().mean(),
                         batch_mean_sq_corr=off_diagonal.detach() / (n * (n - 1)),
                         block_ortho_error=self.ortho_error())
        return {**terms, "decorrelation_loss": self.hp.decorrelation_weight * off_diagonal / n}

    def final_info(self):
        return {**super().final_info(), "block_ortho_error": float(self.ortho_error())}


class Trainer(parent.Trainer):
    def __init__(self, sae, cfg):
        super().__init__(sae, cfg)
        self.reinitialised = 0

    def apply_update(self, step):
        self.sae.project_decoder_grad()
        super().apply_update(step)
        self.sae.retract()

    def after_step(self, x, out, step):
        super().after_step(x, out, step)
        if step > 0 and step % self.run_cfg.scaled_steps(self.sae.hp.reinit_every) == 0:
            self.reinitialise(x)
        out.stats["reinitialised_total"] = self.reinitialised

    @torch.no_grad()
    def reinitialise(self, x: torch.Tensor) -> None:
        sae, hp = self.sae, self.sae.hp
        u = sae.utilisation
        pruned = (u <= hp.prune_fraction * u.mean()).nonzero().squeeze(-1)
        pruned = pruned[u[pruned].argsort()][: min(hp.max_reinit, len(x))]
        if len(pruned) == 0:
            return
        residual = x - sae.decode(sae.encode(x))
        worst = residual.norm(dim=-1).argsort(descending=True)[: len(pruned)]
        sae.place(pruned, residual[worst])
        sae.W_enc[:, pruned] = sae.W_dec[pruned].T * hp.reinit_encoder_scale
        sae.b_enc[pruned] = 0.0
        self.reset_optimizer_state(pruned)
        u[pruned] = u.mean()
        self.reinitialised += len(pruned)

