"""Multi-Scale Normalization Implementation: softmax-weighted normalisations at four scales.

Notebook 000, run 9, on top of run 8. The encoder input is Σ_s softmax(w)_s · (s·g_s·N(x) +
r_s·x') over scales s ∈ {0.1, 0.5, 1, 2}, with x' = x − b_dec, N(x) run 7's adaptively
normalised input, learnable mixing logits w, per-scale gains g_s (initially 1) and per-scale
residual weights r_s (initially `residual_init`). Reading chosen: one shared (adaptive)
LayerNorm, kept from runs 7-8, with the scale-specific parameters being the gains, residuals and
mixing weights.
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
        self.scale_gains = torch.nn.Parameter(torch.ones(n, device=device))
        self.scale_residuals = torch.nn.Parameter(torch.full((n,), self.hp.residual_init, device=device))

    def encoder_input(self, x):
        centred = x - self.b_dec
        normed = super().encoder_input(x)
        mix = torch.softmax(self.scale_logits, dim=0)
        # The weighted sum over scales, collapsed: both parts are linear in the per-scale terms.
        return (mix * self.scales * self.scale_gains).sum() * normed + (mix * self.scale_residuals).sum() * centred
