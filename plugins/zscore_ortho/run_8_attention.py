"""Attention-Based Feature Reweighting Implementation: latents re-weighted by attention.

Notebook 000, run 8, on top of run 7. Each token's query q = x'W_q attends over one learned key
per latent (softmax over latents); the values are the latents' own activations, and the block is
residual with a learnable scale γ (initial `attention_scale_init`): f' = f + γ·(d_sae·a ⊙ f).
Reading chosen: attention runs over latents, not tokens, so a token's code never depends on the
rest of the batch; with d_attn-dimensional keys it costs B × d_sae × d_attn, never
B × d_sae × d_sae.
"""

from dataclasses import dataclass

import torch

from plugins.zscore_ortho import run_7_adaptive_ln as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    d_attn: int = 64
    attention_scale_init: float = 0.1


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device, d_attn = self.W_dec.device, self.hp.d_attn
        self.W_query = torch.nn.Parameter(torch.randn(self.cfg.d_in, d_attn, device=device) / self.cfg.d_in ** 0.5)
        self.latent_keys = torch.nn.Parameter(torch.randn(self.cfg.d_sae, d_attn, device=device) / d_attn ** 0.5)
        self.attention_scale = torch.nn.Parameter(torch.tensor(self.hp.attention_scale_init, device=device))

    def activation(self, pre, x):
        f = super().activation(pre, x)
        scores = (self.encoder_input(x) @ self.W_query) @ self.latent_keys.T / self.hp.d_attn ** 0.5
        attention = torch.softmax(scores, dim=-1) * self.cfg.d_sae  # mean weight 1
        return f + self.attention_scale * attention * f
