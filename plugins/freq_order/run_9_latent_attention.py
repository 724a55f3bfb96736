"""Self-Attention Implementation: the latent code attends over its own latents and feeds back.

Notebook 003, run 9, on top of run 8. Each token's latents form the sequence attended over: from
the code f₀ = ReLU(pre) of run 8, latent j's token is what it writes into the reconstruction,
e_j = f₀_j · d_j (d_j its decoder row, d_in wide). Query, key and value are linear projections
(d_in → d_attn = 64, no bias) of these tokens: k_j = e_j W_K, v_j = e_j W_V, and one query per
token, q = (Σ_j e_j) W_Q, the projection of the pooled sequence (the code's reconstruction, less
b_dec). Scaled dot-product attention over the latents that fire for the token (f₀_j > 0: a
silent latent writes nothing, so it is no token of the sequence), a = softmax_j(q · k_j / √d_attn),
gives the context c = Σ_j a_j v_j, projected back to the latents and added to every pre-activation before the final
ReLU with a learnable scale γ (initially `attention_scale_init`): f = ReLU(pre + γ · c W_O).
Readings chosen where the notebook is vague: the attention is over a token's own latents, so a
token's code never depends on the rest of the batch (attention across the batch would make
sae_bench's codes batch-dependent). The tokens are linear in f₀_j, so keys and values are
computed as k_j = f₀_j (D W_K)_j and v_j = f₀_j (D W_V)_j from the d_sae × d_attn products with the
dictionary D, once per batch: the cost is B × d_sae × d_attn, never B × d_sae × d_in or
B × d_sae × d_sae (one query per latent would need that: latent-to-latent attention for every token).
An earlier version had a learned key per latent and values f₀_j W_V[j], no projections of anything
the latents carry; another took the softmax over all d_sae latents, silent ones included, so the
firing latents got about L0/d_sae of the attention. Resampling (run 4) zeroes a resampled latent's column of W_O, with its Adam
state. Every tensor follows the SAE's dtype ("dtype handling").
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
        d_in, d_sae, d_attn, device = self.cfg.d_in, self.cfg.d_sae, self.hp.d_attn, self.W_dec.device
        self.W_query, self.W_key, self.W_value = (
            torch.nn.Parameter(torch.randn(d_in, d_attn, device=device) / d_in ** 0.5) for _ in range(3))
        self.W_out = torch.nn.Parameter(torch.randn(d_attn, d_sae, device=device) / d_attn ** 0.5)
        self.attention_scale = torch.nn.Parameter(torch.tensor(self.hp.attention_scale_init, device=device))

    def attention(self, f0: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
        """(B, d_sae) weights a_j = softmax over the token's firing latents (f₀_j > 0) of q · k_j / √d_attn;
        0 on silent latents (a token with none firing attends to nothing)."""
        query = (f0 @ dictionary) @ self.W_query  # (B, d_attn): the pooled tokens, projected
        scores = f0 * (query @ (dictionary @ self.W_key).T) / self.hp.d_attn ** 0.5
        firing = f0 > 0
        scores = torch.where(firing.any(-1, keepdim=True), scores.masked_fill(~firing, float("-inf")), 0.0)
        return torch.softmax(scores, dim=-1) * firing

    def pre_activation(self, x):
        """pre + γ · c W_O, c the attention context over the tokens e_j = f₀_j d_j: (B, d_sae)."""
        pre = super().pre_activation(x)
        f0, dictionary = torch.relu(pre), self.decoder_weight()
        context = (self.attention(f0, dictionary) * f0) @ (dictionary @ self.W_value)
        return pre + self.attention_scale * context @ self.W_out

    def latent_slices(self):
        return [*super().latent_slices(), (self.W_out, 1)]

    @torch.no_grad()
    def resample(self, dead, directions):
        super().resample(dead, directions)
        self.W_out[:, dead] = 0.0
