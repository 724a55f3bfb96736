"""Matryoshka BatchTopK SAE: nested prefixes of the dictionary, each reconstructing the input on its own.

Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with Matryoshka Sparse
Autoencoders" (arXiv:2503.17547), after Nabeshima's Matryoshka SAEs (2024), as SAELens's
`MatryoshkaBatchTopKTrainingSAE` computes it, on top of the BatchTopK SAE (run_0_batchtopk):

    f    = BatchTopK_k(pre) over the whole dictionary, as BatchTopK (JumpReLU with θ at inference)
    x̂_m  = f[:, :m] W_dec[:m] + b_dec              for each prefix width m in m_1 < m_2 < … < d_sae
    loss = Σ_m<d_sae ‖x − x̂_m‖² + ‖x − x̂‖² + AuxK   per token, averaged over the batch

The latents are chosen once, by the whole dictionary's BatchTopK; each inner prefix then has to
reconstruct x with its own latents only, so the first latents learn the general, frequent
features and later ones refine them instead of absorbing them. The whole dictionary's term is
the harness's l2_loss (SAELens's mse_loss); each inner prefix's is `inner_mse_loss_<m>`, named as
SAELens names it, and all are summed with weight 1, as SAELens does. θ, AuxK
(`auxiliary_reconstruction_loss`, from step dead_steps + 1), the absent sparsity penalty and the
unit-norm decoder are BatchTopK's, unchanged; the export is the same JumpReLU SAE.

Prefix widths: `prefix_fractions` of d_sae (rounded), the whole dictionary added last if missing
(as SAELens appends d_sae to `matryoshka_widths`); they must increase strictly. The default is the
paper's code's (bartbussmann/matryoshka_sae): group sizes d/16, d/16, d/8, d/4, d/2, i.e. prefixes of d/16, d/8, d/4, d/2 and d latents
(16, 32, 64, 128, 256 at tiny's d_sae 256). SAELens has no default widths (it requires them).

Readings chosen: fixed prefixes (the paper's and SAELens's), not Nabeshima's prefix lengths
sampled afresh each batch. SAELens's optional per-level AuxK (`use_matryoshka_aux_loss`, off by
default) is not implemented: AuxK is BatchTopK's, on the whole dictionary's residual, as SAELens's
default.
"""

from dataclasses import dataclass

import torch

import kernels
from experiment import FORMULA
from plugins.baseline import run_0_batchtopk as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    prefix_fractions: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)


def prefix_widths(fractions, d_sae: int) -> list[int]:
    """The nested prefixes' widths in latents, the whole dictionary last."""
    widths = [round(f * d_sae) for f in fractions]
    if not widths or widths[-1] != d_sae:
        widths.append(d_sae)
    if widths[0] <= 0 or any(a >= b for a, b in zip(widths, widths[1:])) or widths[-1] != d_sae:
        raise ValueError(f"prefix_fractions {tuple(fractions)} give prefix widths {widths} at d_sae {d_sae}: "
                         "they must increase strictly, from at least one latent up to d_sae")
    return widths


class SAE(parent.SAE):
    def __init__(self, d_in, d_sae, hp, cfg, device=torch.device("cpu"), dtype=torch.float32):
        super().__init__(d_in, d_sae, hp, cfg, device, dtype)
        self.widths = prefix_widths(hp.prefix_fractions, d_sae)

    def aux_losses(self, fwd):
        """Each inner prefix's reconstruction error (the whole dictionary's is l2_loss), built up
        prefix by prefix as SAELens's `_iterable_decode` does."""
        terms = super().aux_losses(fwd)
        weight, decoded, start = self.decoder_weight(), self.b_dec, 0
        for width in self.widths[:-1]:
            decoded = kernels.decode(fwd.f[:, start:width], weight[start:width], self.sparse_backward) + decoded
            terms[f"inner_mse_loss_{width}"] = (decoded - fwd.x).pow(2).sum(-1).mean()
            start = width
        return terms

    def takes_sparse_step(self):
        """The sparse step is exact here: BatchTopK's latents, and each prefix decodes its own
        active latents only."""
        return self.keeps(*FORMULA, since=SAE)

    def sae_lens_training(self):
        """SAELens's MatryoshkaBatchTopKTrainingSAE holding these weights and θ."""
        if not self.keeps(*FORMULA, "update_dead_counters", since=SAE):
            return None
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )

        ref = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            **self.sae_lens_config(), matryoshka_widths=list(self.widths)))
        ref.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()}, strict=False)
        return ref, {}
