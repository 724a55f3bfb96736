"""JL Projection + EMA Implementation: a contrastive decoder penalty in a 128-d JL space.

Notebook 002, run 1. Decoder rows are compared in a 128-dimensional Johnson-Lindenstrauss space: a
Gaussian d_in × 128 matrix orthonormalised by QR, scaled by √(d_in/128) so that norms are kept in
expectation. The contrastive loss penalises latent pairs whose projected decoder cosine exceeds the
contrast threshold τ (fixed at 0.4 here): `contrast_weight` × Σ_{i<j} relu(|cos_ij| − τ)². Each
latent's utilisation (its firing rate) is tracked with an EMA (β = 0.9).

Readings chosen where the notebook is vague: run 1 is the notebook's starting point, so the
contrastive penalty whose threshold and weights later runs tune is defined here; it covers the m
(`contrast_latents`) most utilised latents by the EMA, so it costs m² × 128, never d_sae². The
penalty is a sum over the selected pairs, those above τ, not a mean over all m²/2 pairs: each pair
of features that is too alike pays the same however many latents there are, as each latent pays its
own L1 and each input dimension its own squared error in the summed reconstruction loss it is
weighed against.
"Validate JL approximation quality via reconstruction tests" is a check on a fixed random probe set
of `jl_check_latents` decoder rows, every step: mean and max absolute error of the projected
pairwise cosines, mean norm distortion, and the relative error of reconstructing each row from its
projection; logged as jl_* stats and as final_info["jl_check"]. With d_in ≤ 128 (the tiny preset)
the projection is a rotation and these errors are zero to rounding. The per-latent utilisation EMA
is saved as an artifact (the notebook compares sparsity distributions).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plugins.baseline import run_0_baseline as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    jl_dim: int = 128
    ema_beta: float = 0.9
    contrast_threshold: float = 0.4
    contrast_weight: float = 1.0
    contrast_latents: int = 1024
    jl_check_latents: int = 512


class SAE(parent.SAE):
    def __init__(self, d_in, d_sae, hp, cfg, device=torch.device("cpu"), dtype=torch.float32):
        super().__init__(d_in, d_sae, hp, cfg, device, dtype)
        jl, _ = torch.linalg.qr(torch.randn(d_in, min(hp.jl_dim, d_in), device=device, dtype=dtype))
        self.register_buffer("jl", jl)  # orthonormal columns
        self.register_buffer("jl_probe", torch.randperm(d_sae, device=device)[: hp.jl_check_latents])
        self.register_buffer("utilisation", torch.zeros(d_sae, device=device, dtype=dtype))

    def project(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.jl * (self.cfg.d_in / self.jl.shape[1]) ** 0.5

    def contrast_threshold(self, step: int) -> float:
        return self.hp.contrast_threshold

    def observe(self, fwd):
        super().observe(fwd)
        beta = self.hp.ema_beta
        self.utilisation.mul_(beta).add_((1 - beta) * (fwd.f > 0).float().mean(0))

    def contrastive_loss(self, w: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ over the m latents' pairs above τ of (|cos| − τ)², and the fraction of pairs above τ."""
        idx = self.utilisation.topk(min(self.hp.contrast_latents, self.cfg.d_sae)).indices
        p = F.normalize(self.project(w[idx]), dim=1)
        excess = torch.triu((p @ p.T).abs() - tau, diagonal=1).clamp_min(0)
        m = len(idx)
        return excess.pow(2).sum(), (excess > 0).sum() / max(m * (m - 1) / 2, 1)

    @torch.no_grad()
    def jl_check(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = w[self.jl_probe]
        p = self.project(w)
        off = ~torch.eye(len(w), dtype=torch.bool, device=w.device)
        exact = F.normalize(w, dim=1) @ F.normalize(w, dim=1).T
        approx = F.normalize(p, dim=1) @ F.normalize(p, dim=1).T
        cos_error = (approx - exact).abs()[off]
        norms = w.norm(dim=1).clamp_min(1e-12)
        reconstruction = (w - (w @ self.jl) @ self.jl.T).norm(dim=1) / norms
        return {"jl_cos_error_mean": cos_error.mean(), "jl_cos_error_max": cos_error.max(),
                "jl_norm_distortion": (p.norm(dim=1) / norms - 1).abs().mean(),
                "jl_recon_error": reconstruction.mean()}

    def aux_losses(self, fwd):
        w = self.decoder_weight()
        tau = self.contrast_threshold(fwd.step)
        contrast, over = self.contrastive_loss(w, tau)
        u = self.utilisation
        fwd.stats.update(contrast_threshold=tau, contrast_pairs_over=over, utilisation_mean=u.mean(),
                         utilisation_cv=u.std() / u.mean().clamp_min(1e-12), **self.jl_check(w.detach()))
        return {**super().aux_losses(fwd), "contrastive_loss": self.hp.contrast_weight * contrast}

    @torch.no_grad()
    def final_info(self):
        u = self.utilisation
        return {"jl_dim": self.jl.shape[1],
                "jl_check": {k: float(v) for k, v in self.jl_check(self.decoder_weight()).items()},
                "utilisation_ema": {"mean": float(u.mean()), "median": float(u.median()),
                                    "max": float(u.max()), "never_fired_fraction": float((u == 0).float().mean())}}

    def artifacts(self):
        return {"utilisation_ema": self.utilisation}
