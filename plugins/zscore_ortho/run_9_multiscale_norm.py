"""Multi-Scale Normalization Implementation: softmax-weighted normalisations at four scales.

Notebook 000, run 9, on top of run 8. With v = N(x), run 7's adaptively normalised input, v̄ its
deviation from its own mean over d_in and σ²(v) its variance, the normalisation at scale s is

    n_s(v) = v̄ / √(σ²(v) + s²)          s ∈ {0.1, 0.5, 1, 2}

and the encoder input is Σ_s softmax(w)_s · (g_s ⊙ n_s(v) + r_s · x'), x' = x − b_dec, with
learnable mixing logits w, per-scale gain vectors g_s (d_in each, initially 1) and per-scale
residual weights r_s (initially `residual_init`).

Reading chosen: a scale is the magnitude below which the input is left as it is: n_s normalises a
token whose spread σ is well above s (n_s ≈ v̄/σ, a LayerNorm) and only rescales one whose spread
is well below (n_s ≈ v̄/s). The SAE trains on activations of mean norm √d_in, a per-dimension
spread near 1, so the four scales run from full normalisation (0.1) to nearly linear (2), and the
softmax learns the mix. Each n_s is a different nonlinear function of the input, so neither the
scales nor their gains collapse into one: multiplying one normalised vector by s·g_s, the earlier
reading, summed to two scalars. The residual terms are linear in x' and do sum to one learned
multiple of x'; they are kept per scale as the notebook names them.
"""

from dataclasses import dataclass, field

import torch

from plugins.zscore_ortho import run_8_attention as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    scales: list = field(default_factory=lambda: [0.1, 0.5, 1.0, 2.0])
    residual_init: float = 0.1


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device, n = self.W_dec.device, len(self.hp.scales)
        self.register_buffer("scales", torch.tensor(self.hp.scales, device=device))
        self.scale_logits = torch.nn.Parameter(torch.zeros(n, device=device))
        self.scale_gains = torch.nn.Parameter(torch.ones(n, self.cfg.d_in, device=device))
        self.scale_residuals = torch.nn.Parameter(torch.full((n,), self.hp.residual_init, device=device))

    def multiscale_norms(self, v: torch.Tensor) -> torch.Tensor:
        """(B, d_in) -> (B, n_scales, d_in): n_s(v) = (v − mean(v)) / √(var(v) + s²) per scale."""
        deviation = v - v.mean(-1, keepdim=True)
        variance = deviation.pow(2).mean(-1, keepdim=True)
        return deviation[:, None] / (variance[:, None] + self.scales[:, None].pow(2)).sqrt()

    def encoder_input(self, x):
        centred = x - self.b_dec
        branches = self.multiscale_norms(super().encoder_input(x)) * self.scale_gains
        branches = branches + self.scale_residuals[:, None] * centred[:, None]
        return (torch.softmax(self.scale_logits, dim=0)[:, None] * branches).sum(1)
