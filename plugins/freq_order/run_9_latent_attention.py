"""Self-Attention Implementation: the latent code attends over its own latents and feeds back.

Notebook 003, run 9, on top of run 8. From the code f₀ = ReLU(pre) of run 8, a query
q = f₀ W_Q (d_attn = 64) attends over the d_sae latents, each with a learned key k_j: scaled
dot-product weights a = softmax(q Kᵀ / √d_attn). The values are the latents' own activations
projected, v_j = f₀_j W_V[j], so the context c = Σ_j a_j v_j = (a ⊙ f₀) W_V summarises which
latents are active. Projected back, it is added to every pre-activation before the final ReLU,
with a learnable scale γ (initially `attention_scale_init`): f = ReLU(pre + γ · c W_O).
Readings chosen where the notebook is vague: the attention is the latent code attending over its
own latents, one query per token, so a token's code never depends on the rest of the batch
(attention across the batch would make sae_bench's codes batch-dependent), and its cost is
B × d_sae plus B × d_sae × d_attn in matmuls, never B × d_sae × d_sae: latent-to-latent attention
for every token would be that size. Every tensor follows the SAE's dtype ("dtype handling").
"""

from dataclasses import dataclass

import torch

from plugins.freq_order import run_8_skip_projection as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    d_attn: int = 64
    attention_scale_init: float = 0.1


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        d_sae, d_attn, device = self.cfg.d_sae, self.hp.d_attn, self.W_dec.device
        self.W_query = torch.nn.Parameter(torch.randn(d_sae, d_attn, device=device) / d_sae ** 0.5)
        self.latent_keys = torch.nn.Parameter(torch.randn(d_sae, d_attn, device=device))
        self.W_value = torch.nn.Parameter(torch.randn(d_sae, d_attn, device=device))
        self.W_out = torch.nn.Parameter(torch.randn(d_attn, d_sae, device=device) / d_attn ** 0.5)
        self.attention_scale = torch.nn.Parameter(torch.tensor(self.hp.attention_scale_init, device=device))

    def pre_activation(self, x):
        pre = super().pre_activation(x)
        f0 = torch.relu(pre)
        scores = (f0 @ self.W_query) @ self.latent_keys.T / self.hp.d_attn ** 0.5
        context = (torch.softmax(scores, dim=-1) * f0) @ self.W_value
        return pre + self.attention_scale * context @ self.W_out
