"""Modified Gram-Schmidt Orthogonalization Implementation: an orthogonalised decoder in the forward pass.

Notebook 002, run 5, on top of run 4: between encoding and reconstruction the dictionary is
orthogonalised with Gram-Schmidt, each feature vector keeping its original magnitude; the loss
structure is unchanged.
Readings chosen: the "features" orthogonalised are the decoder rows (the directions the code is
decoded onto), since orthogonalising the code itself would make a token's latents depend on the
rest of the batch. The Gram-Schmidt is full: each row loses its projections on every row before it,
up to the d_in rows that can be mutually orthogonal in d_in dimensions; so the dictionary is
orthogonalised in consecutive blocks of d_in rows, each block a complete orthonormal basis (a
single pass over all d_sae > d_in rows would leave every row after the d_in-th a zero residual). An
earlier version used blocks of 32 rows. The output is that of modified Gram-Schmidt, computed as
the Householder QR of each block (Q, with R's diagonal made positive, is Gram-Schmidt's result in
exact arithmetic): stable without the notebook's epsilon guards, and one batched LAPACK call
instead of d_in sequential steps. Decode, the contrastive penalty and every reader of the weights
(sae_bench's metrics, absorption's latent directions, the sae_lens export, the analyses: all
through `decoder_weight()`) use the orthogonalised dictionary; the stored W_dec is only what the
optimizer moves. `gs_row_shift` logs how far orthogonalisation moves rows (mean 1 − cos with the
stored row).
"""

import torch

from plugins.contrastive import run_4_diversity as parent


def gram_schmidt(w: torch.Tensor, block: int) -> torch.Tensor:
    """(n, d) -> (n, d): Gram-Schmidt of the rows of w within consecutive blocks of `block` ≤ d rows
    (the last may be shorter), each row keeping its norm. Row i of a block becomes the unit
    component of w_i orthogonal to the block's rows before it, times ‖w_i‖."""
    n, d = w.shape
    full = n - n % block
    pieces = ([w[:full].reshape(-1, block, d)] if full else []) + ([w[full:][None]] if full < n else [])
    rows = []
    for piece in pieces:
        q, r = torch.linalg.qr(piece.transpose(1, 2))  # (k, d, b): column i spans rows ≤ i
        signs = torch.diagonal(r, dim1=1, dim2=2).sign()  # Gram-Schmidt keeps each row's own side
        rows.append((q * signs[:, None, :]).transpose(1, 2).reshape(-1, d))
    return torch.cat(rows) * w.norm(dim=1, keepdim=True)


class SAE(parent.SAE):
    def gs_block_size(self) -> int:
        return self.cfg.d_in

    def decoder_weight(self):
        return gram_schmidt(self.W_dec, self.gs_block_size())

    def aux_losses(self, fwd):
        terms = super().aux_losses(fwd)
        with torch.no_grad():
            shift = 1 - torch.nn.functional.cosine_similarity(self.decoder_weight(), self.W_dec, dim=1).mean()
        fwd.stats["gs_row_shift"] = shift
        return terms
