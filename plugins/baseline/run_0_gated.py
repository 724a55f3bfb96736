"""Gated SAE: a gate decides which latents fire, a weight-shared magnitude path says how much.

Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse Autoencoders"
(arXiv 2404.16014), as SAELens's `GatedTrainingSAE` computes it. With x' = x − b_dec:

    π_gate = x' W_enc + b_gate                    pre_activation(x) (the base formula; b_gate is b_enc)
    π_mag  = x' (W_enc ⊙ exp r_mag) + b_mag       W_mag shares W_enc's directions, one scale per latent
    f      = 1[π_gate > 0] ⊙ ReLU(π_mag)          activation(pre, x)
    x̂      = f W_dec + b_dec
    loss   = ‖x − x̂‖²                                          l2_loss (SAELens: mse_loss)
           + λ Σ_i ReLU(π_gate)_i ‖W_dec,i‖                    sparsity_loss (SAELens: l1_loss)
           + ‖x − (ReLU(π_gate) sg(W_dec) + sg(b_dec))‖²       auxiliary_reconstruction_loss

per token, averaged over the batch; λ is --sparsity-penalty (SAELens's `l1_coefficient`, with its
default `l1_warm_up_steps` 0: no warm-up). The Heaviside gate passes no gradient, so the gate
path (W_enc, b_gate) learns only from the L1 and the auxiliary term; the magnitude path is never
penalised, which is what removes the L1's shrinkage. Initialisation: the base SAE's (random unit
decoder rows, W_enc = W_decᵀ, zero biases) and r_mag = b_mag = 0, as SAELens's, so W_mag = W_enc
and π_mag = π_gate at the start. The run adds no hyperparameters.

Readings chosen:
- b_gate is the base SAE's b_enc (not a new parameter): the base pre-activation, fused path
  included, is then π_gate unchanged, every parameter has a use, and the export only renames
  b_enc to b_gate (sae_lens's GatedSAE has no b_enc).
- The decoder: the paper trains the L1 loss with unit-norm decoder columns (and resamples dead
  latents, which the harness does not do); SAELens instead leaves W_dec free and weights each
  latent's L1 by ‖W_dec,i‖. We keep the base trainer's unit-norm rows (the paper) and SAELens's
  weighting: under the constraint the weight is 1 and its gradient is radial, so the trainer's
  projection removes it: both readings train the same.
- The auxiliary reconstruction goes through a frozen copy of the decoder (sg = stop-gradient), as
  in the paper: it trains the encoder side only (W_enc, b_gate, and b_dec as the input's centre).
  SAELens does not detach W_dec and b_dec there: the values are the same, only that term's
  gradient through the decoder (into W_dec, and into b_dec as the decoder's bias) differs. An
  authors' note on the paper's LessWrong post pairs the frozen decoder with the norm constraint,
  the unfrozen one with a ‖W_dec‖-weighted penalty on a free decoder, and advises against
  freezing it in one place but not the other.
"""

import torch

from experiment import FORMULA
from plugins.baseline import run_0_baseline as parent


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        zeros = torch.zeros_like(self.b_enc)
        self.r_mag = torch.nn.Parameter(zeros.clone())
        self.b_mag = torch.nn.Parameter(zeros.clone())

    def activation(self, pre, x):
        """pre is π_gate: it only decides which latents fire; the magnitude path sets their value."""
        magnitude = torch.relu(self.encoder_input(x) @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        return (pre > 0).to(magnitude.dtype) * magnitude

    def sparsity_loss(self, fwd):
        gate = torch.relu(fwd.pre)
        return self.sparsity_coefficient(fwd) * (gate * self.decoder_weight().norm(dim=1)).sum(-1).mean()

    def aux_losses(self, fwd):
        # The gate's own reconstruction through a frozen decoder: it trains the encoder side only.
        via_gate = torch.relu(fwd.pre) @ self.decoder_weight().detach() + self.b_dec.detach()
        return {"auxiliary_reconstruction_loss": (via_gate - fwd.x).pow(2).sum(-1).mean()}

    def sae_lens_export(self, scale):
        """sae_lens's GatedSAE in the model's scale: π_gate and π_mag of x·scale are those of x with
        W_enc · scale and b_dec / scale, so r_mag, b_mag and b_gate carry over unchanged."""
        from sae_lens import GatedSAE, GatedSAEConfig

        export = GatedSAE(GatedSAEConfig(d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, dtype="float32", device="cpu",
                                         metadata=self.sae_lens_metadata()))
        export.load_state_dict(self.gated_state(self.scaled_weights(scale)))
        return export, self.keeps("encoder_input", "pre_activation", "activation", "decoder_weight", "decode",
                                   since=SAE)

    def sae_lens_training(self):
        """SAELens's GatedTrainingSAE with these weights, and its coefficients."""
        if not self.keeps(*FORMULA, since=SAE):
            return None
        from sae_lens import GatedTrainingSAE, GatedTrainingSAEConfig

        ref = GatedTrainingSAE(GatedTrainingSAEConfig(
            d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.W_dec.device), l1_coefficient=self.run_cfg.sparsity_penalty))
        ref.load_state_dict(self.gated_state({k: v.detach().clone() for k, v in self.state_dict().items()}))
        return ref, {"l1": self.run_cfg.sparsity_penalty}

    @torch.no_grad()
    def gated_state(self, weights):
        """SAELens's parameter names: b_enc is b_gate; r_mag and b_mag are scale-free."""
        weights = dict(weights)
        weights["b_gate"] = weights.pop("b_enc")
        for name in ("r_mag", "b_mag"):
            weights[name] = getattr(self, name).detach().to(weights["W_enc"])
        return weights

