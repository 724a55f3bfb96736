"""Modified Gram-Schmidt Orthogonalization Implementation: block-orthogonal decoder in the forward pass.

Notebook 002, run 5, on top of run 4: between encoding and reconstruction the dictionary is
orthogonalised with modified Gram-Schmidt, each feature vector keeping its original magnitude,
with an epsilon guarding the normalisations; the loss structure is unchanged.
Readings chosen: the "features" orthogonalised are the decoder rows (the directions the code is
decoded onto), since orthogonalising the code itself would make a token's latents depend on the
rest of the batch. d_sae rows cannot all be orthogonal in d_in dimensions, and MGS is sequential,
so it runs within consecutive blocks of `gs_block` latents (at most d_in), all blocks at once:
gs_block sequential steps, d_sae × d_in × gs_block / 2 memory, affordable at d_sae 16384. Decode
and the contrastive penalty use the orthogonalised dictionary (so sae_bench's reconstruction
metrics do too); sae_bench's weight-based metrics and the sae_lens export read the stored W_dec.
`gs_row_shift` logs how far orthogonalisation moves rows (mean 1 − cos with the stored row).
"""

from dataclasses import dataclass

import torch

from plugins.contrastive import run_4_diversity as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    gs_block: int = 32
    gs_eps: float = 1e-6


def block_mgs(w: torch.Tensor, block: int, eps: float) -> torch.Tensor:
    """Modified Gram-Schmidt over consecutive blocks of `block` rows of w, each row keeping its
    norm. A short last block is padded with zero rows, which stay zero and are dropped."""
    n, d = w.shape
    rest = torch.cat([w, w.new_zeros(-n % block, d)]).view(-1, block, d)
    done = []
    for _ in range(block):
        q = rest[:, 0] / rest[:, 0].norm(dim=-1, keepdim=True).clamp_min(eps)
        done.append(q)
        rest = rest[:, 1:] - (rest[:, 1:] @ q.unsqueeze(-1)) * q.unsqueeze(1)
    return torch.stack(done, 1).reshape(-1, d)[:n] * w.norm(dim=1, keepdim=True)


class SAE(parent.SAE):
    def gs_block_size(self) -> int:
        return min(self.hp.gs_block, self.cfg.d_in)

    def decoder_weight(self):
        return block_mgs(self.W_dec, self.gs_block_size(), self.hp.gs_eps)

    def aux_losses(self, fwd):
        terms = super().aux_losses(fwd)
        with torch.no_grad():
            shift = 1 - torch.nn.functional.cosine_similarity(self.decoder_weight(), self.W_dec, dim=1).mean()
        fwd.stats["gs_row_shift"] = shift
        return terms
