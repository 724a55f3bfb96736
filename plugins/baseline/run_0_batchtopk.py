"""BatchTopK SAE: the batch's k·B largest activations in training, one JumpReLU threshold at inference.

Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders" (arXiv:2412.06410), as SAELens's
`BatchTopKTrainingSAE` computes it:

    pre = (x − b_dec) W_enc + b_enc
    training:   f = the k·B largest entries of ReLU(pre) over the whole (B, d_sae) batch, the rest 0
    inference:  f = ReLU(pre) · 1[pre > θ]        (a JumpReLU SAE with one threshold θ for every latent)
    θ ← (1 − η) θ + η · min{f > 0}                 after every training batch, from θ = 0 (float64)
    loss = ‖x − x̂‖² + α · s · ‖ê − (x − x̂)‖²      per token, averaged over the batch

k is the average number of active latents per token; each token takes as many as the batch's
competition gives it. θ is the running mean (rate η = `topk_threshold_lr`) of the smallest
activation each training batch kept, so that at inference the encoding no longer depends on the
batch and fires about k latents per token on data like the training data (the mean of the
batches' cut-offs is no one batch's cut-off). θ starts at 0, where the eval-mode encoding is plain
ReLU: an SAE evaluated before θ has converged (a few hundred training steps at η = 0.01) fires far
more than k latents. Only training passes move θ.

The second term is the TopK family's auxiliary loss for dead latents (AuxK), its dead mask and its
logging exactly as in the TopK baseline this one builds on (run_0_topk, SAELens's
`calculate_topk_aux_loss`). BatchTopK has no sparsity penalty (k sets the sparsity), so it logs no
`sparsity_loss`, and the run's --sparsity-penalty does nothing here.

Decoder rows are kept at unit norm with the parallel gradient projected out (the harness's
trainer), as the paper's code and dictionary_learning's BatchTopK trainer do. SAELens instead
leaves the decoder free and multiplies pre-activations by ‖W_dec,i‖ (`rescale_acts_by_decoder_norm`):
on unit rows the same latents, losses and gradients along the sphere, but its free rows' norms
become per-latent gains on the batch-wide competition, which train differently (docs/synthetic.md,
the peer check; kept at unit norm, SAELens's trainer moves every parameter as ours does). The
harness's trainer clips the gradient norm at 1, as SAELens's does. The export is the JumpReLU SAE
this one is at inference (`sae_lens.JumpReLUSAE`, θ in every latent, in float32 as the eval-mode
SAE compares it), as SAELens saves a BatchTopK SAE; θ needs no rescaling for the model's
activation scale, since the export folds the scale into W_enc and leaves the pre-activations as
they were.

Defaults: k = 64 (this harness's baseline k), η = 0.01 (SAELens's), α = 1/32 (the paper's code,
Gao et al. and dictionary_learning; SAELens's config default is 1.0), dead_steps as TopK's: the
run's dead-latent window (SAELens's `dead_feature_window` is 1,000 steps; the paper's code counts
a latent dead after 5 batches). The loss is
SAELens's, Σ over d_in (the paper's code averages both terms over d_in, so α means the same).

Readings chosen: `topk_threshold` (logged) is θ after the step's update. Under torchrun each
rank's share of the batch competes for its own k·B_rank slots, and DistributedDataParallel keeps
rank 0's θ.
"""

from dataclasses import dataclass

import torch

from experiment import FORMULA
from plugins.baseline import run_0_topk as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    topk_threshold_lr: float = 0.01


def batch_topk(pre: torch.Tensor, k: float) -> torch.Tensor:
    """The int(k·B) largest entries of ReLU(pre) over the whole (B, d_sae) batch, where they
    are; zeros elsewhere (SAELens's BatchTopK module)."""
    acts = pre.relu().flatten()
    top = acts.topk(min(int(k * pre.shape[0]), acts.numel()))  # k ≥ d_sae keeps every activation
    return torch.zeros_like(acts).scatter(-1, top.indices, top.values).reshape(pre.shape)


class SAE(parent.SAE):
    def __init__(self, d_in, d_sae, hp, cfg, device=torch.device("cpu"), dtype=torch.float32):
        super().__init__(d_in, d_sae, hp, cfg, device, dtype)
        # float64 as SAELens keeps it: an EMA at rate 0.01 in float32 loses the small updates.
        self.register_buffer("topk_threshold", torch.tensor(0.0, dtype=torch.float64, device=device))

    def _apply(self, *args, **kwargs):
        out = super()._apply(*args, **kwargs)
        # .to(dtype) casts every float buffer (sae_bench casts the SAE to the model's dtype); θ
        # stays float64, and is compared in the pre-activations' dtype.
        threshold = self._buffers.get("topk_threshold")  # absent while the base __init__ runs
        if threshold is not None:
            self._buffers["topk_threshold"] = threshold.to(torch.float64)
        return out

    def activation(self, pre, x):
        if self.training:
            return batch_topk(pre, self.hp.k)
        return torch.relu(pre) * (pre > self.topk_threshold.to(pre.dtype))  # JumpReLUSAE.encode's formula

    def observe(self, fwd):
        """θ's running mean of the batch's smallest kept activation (SAELens's update_topk_threshold)."""
        kept = fwd.f > 0
        smallest = torch.where(kept, fwd.f, torch.inf).min().to(torch.float64)
        lr = self.hp.topk_threshold_lr
        updated = (1 - lr) * self.topk_threshold + lr * smallest  # SAELens's arithmetic, in float64
        self.topk_threshold.copy_(torch.where(smallest.isfinite(), updated, self.topk_threshold))
        fwd.stats["topk_threshold"] = self.topk_threshold.clone()
        super().observe(fwd)  # the dead counters' firing

    def final_info(self):
        return {"topk_threshold": self.topk_threshold.item()}

    def takes_sparse_step(self):
        """The sparse step is exact here: the batch's top k·B are positive pre-activations as they
        are (θ only reads them)."""
        return self.keeps(*FORMULA, since=SAE)

    def sae_lens_export(self, scale):
        """The JumpReLU SAE this one is at inference, θ in every latent (as SAELens saves a
        BatchTopK SAE): exact where the encoder, activation and decoder are this file's."""
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

        export = JumpReLUSAE(JumpReLUSAEConfig(d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, dtype="float32",
                                               device="cpu", metadata=self.sae_lens_metadata()))
        weights = self.scaled_weights(scale)
        weights["threshold"] = torch.full_like(weights["b_enc"], self.topk_threshold.item())
        export.load_state_dict(weights)
        return export, self.keeps("encoder_input", "pre_activation", "activation", "decoder_weight", "decode",
                                   since=SAE)

    def sae_lens_config(self) -> dict:
        """SAELens's BatchTopK settings of this SAE (its default rescale_acts_by_decoder_norm:
        on our unit-norm decoder rows the same SAE)."""
        hp = self.hp
        return dict(d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, k=hp.k, topk_threshold_lr=hp.topk_threshold_lr,
                    aux_loss_coefficient=hp.aux_loss_coefficient, dtype=str(self.dtype).removeprefix("torch."),
                    device=str(self.W_dec.device))

    def sae_lens_training(self):
        """SAELens's BatchTopKTrainingSAE holding these weights and θ; it takes no coefficients."""
        if not self.keeps(*FORMULA, "update_dead_counters", since=SAE):
            return None
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

        ref = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**self.sae_lens_config()))
        ref.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()}, strict=False)
        return ref, {}
