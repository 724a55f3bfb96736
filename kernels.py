"""The base SAE's training step, computed faster than its formula reads, with the same numbers.

experiment.SAE is  pre = (x − b_dec) W_enc + b_enc,  f = ReLU(pre),  x̂ = f W_dec + b_dec.
`SAE.training_pass` takes one of these two paths where a plugin kept those pieces:

- `pre_activation`: the formula's values exactly, with b_dec's gradient routed through a
  zero-valued term, so that autograd gets it from a vector-matrix product instead of a
  (B × d_sae) × (d_sae × d_in) input-gradient matmul: five matmuls per step instead of six.
- `SparseReLU`: forward and backward over the active latents only (sparse × dense products, as
  the TopK kernels of OpenAI's sparse_autoencoder and EleutherAI's sparsify do), used while few
  latents fire (`use_sparse_step`); the same gradients as the dense path (tested).

Shapes: x (B, d_in), W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in),
pre and f (B, d_sae), x̂ (B, d_in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Latent density below which the sparse step is faster, per device type; the README's benchmark
# section has the measurements. None on CUDA: unmeasured there, and `nonzero` syncs the host.
SPARSE_BELOW = {"cpu": 0.10}
CHECK_EVERY = 10  # steps between density checks


def use_sparse_step(latents: torch.Tensor, step: int, current: bool) -> bool:
    """Whether the coming steps should take the sparse path, from this step's latents."""
    threshold = SPARSE_BELOW.get(latents.device.type)
    if threshold is None or step % CHECK_EVERY:
        return current and threshold is not None
    return (latents.detach() > 0).float().mean().item() < threshold


def pre_activation(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """(x − b_dec) W_enc + b_enc, valued exactly so; b_dec's gradient is −Σ_tokens ∂pre · W_encᵀ."""
    fixed = b_dec.detach()
    return (x - fixed) @ W_enc + b_enc - (b_dec - fixed) @ W_enc


class SparseReLU(torch.autograd.Function):
    """(f, x̂) of the base SAE; the decoder forward and the input, W_enc and W_dec gradients run
    over the active latents only. `embedding_bag` with per-sample weights is the sparse × dense
    product: each output row is a weighted sum of a few gathered rows."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec):
        x_c = x - b_dec
        f = torch.relu(torch.addmm(b_enc, x_c, W_enc))
        tokens, latents = f.nonzero(as_tuple=True)  # sorted by token
        token_starts = torch.searchsorted(tokens, torch.arange(len(f), device=f.device))
        values = f[tokens, latents]
        x_hat = F.embedding_bag(latents, W_dec, token_starts, mode="sum", per_sample_weights=values) + b_dec
        ctx.save_for_backward(x_c, W_enc, W_dec, tokens, latents, token_starts, values)
        return f, x_hat

    @staticmethod
    def backward(ctx, grad_f, grad_x_hat):
        x_c, W_enc, W_dec, tokens, latents, token_starts, values = ctx.saved_tensors
        d_sae = W_dec.shape[0]
        # ∂loss/∂pre at the active latents, from one dense product (a gather per active latent is slower)
        grad_pre = torch.addmm(grad_f, grad_x_hat, W_dec.T).view(-1)[tokens * d_sae + latents]
        grad_b_enc = torch.zeros(d_sae, dtype=grad_pre.dtype, device=grad_pre.device).index_add_(0, latents, grad_pre)
        grad_x_c = None  # training activations need none
        if ctx.needs_input_grad[0]:
            grad_x_c = F.embedding_bag(latents, W_enc.T.contiguous(), token_starts, mode="sum",
                                       per_sample_weights=grad_pre)
        latents_sorted, by_latent = torch.sort(latents, stable=True)
        latent_starts = torch.searchsorted(latents_sorted, torch.arange(d_sae, device=latents.device))
        tokens_by_latent = tokens[by_latent]
        grad_W_enc = F.embedding_bag(tokens_by_latent, x_c, latent_starts, mode="sum",
                                     per_sample_weights=grad_pre[by_latent]).T
        grad_W_dec = F.embedding_bag(tokens_by_latent, grad_x_hat, latent_starts, mode="sum",
                                     per_sample_weights=values[by_latent])
        grad_b_dec = grad_x_hat.sum(0) - W_enc @ grad_b_enc  # the second term: x_c's gradient summed over tokens
        return grad_x_c, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec
