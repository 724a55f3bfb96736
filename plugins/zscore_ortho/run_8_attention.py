"""Attention-Based Feature Reweighting Implementation: latents re-weighted by self-attention.

Notebook 000, run 8, on top of run 7: a self-attention block over the latent code, with query,
key and value projections, a residual connection and a learnable scale γ (initial
`attention_scale_init`). Each token's code f is cut into blocks of `block_size` latents, the
attention's items (B, n, s). With Q = F W_q, K = F W_k (s × d_attn) and V = F W_v (s × s),
A = softmax(Q Kᵀ / √d_attn) over the blocks and O = A V, flattened back to (B, d_sae):

    f' = ReLU(f + γ · f ⊙ tanh(O))

Readings chosen: the attention runs within a token's code, not across the batch's tokens, so a
token's code never depends on the rest of the batch (nor, in evaluation, on later tokens of its
context); its items are blocks of latents, with projections shared by every block, as a flat
vector is cut into patches for a transformer, so it costs B × (d_sae/s)² scores, never
B × d_sae × d_sae. The block's output re-weights the latents (a bounded factor 1 + γ·tanh(O) on
each): latents that did not fire stay at zero, so the attention re-weights the code without
densifying it, and the ReLU keeps latents non-negative. The last block is zero-padded when s
does not divide d_sae.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plugins.zscore_ortho import run_7_adaptive_ln as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    block_size: int = 64
    d_attn: int = 64
    attention_scale_init: float = 0.1


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device, s, d_attn = self.W_dec.device, self.hp.block_size, self.hp.d_attn
        self.W_query = torch.nn.Parameter(torch.randn(s, d_attn, device=device) / s ** 0.5)
        self.W_key = torch.nn.Parameter(torch.randn(s, d_attn, device=device) / s ** 0.5)
        self.W_value = torch.nn.Parameter(torch.randn(s, s, device=device) / s ** 0.5)
        self.attention_scale = torch.nn.Parameter(torch.tensor(self.hp.attention_scale_init, device=device))

    def activation(self, pre, x):
        f = super().activation(pre, x)
        return torch.relu(f + self.attention_scale * f * torch.tanh(self.block_attention(f)))

    def block_attention(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d_sae) -> (B, d_sae): O = softmax(Q Kᵀ / √d_attn) V over the code's blocks."""
        d_sae, s = f.shape[1], self.hp.block_size
        blocks = F.pad(f, (0, -d_sae % s)).unflatten(1, (-1, s))  # (B, n, s)
        scores = (blocks @ self.W_query) @ (blocks @ self.W_key).transpose(1, 2) / self.hp.d_attn ** 0.5
        return (torch.softmax(scores, dim=-1) @ (blocks @ self.W_value)).flatten(1)[:, :d_sae]
