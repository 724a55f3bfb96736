"""Layer Normalization Implementation: LayerNorm on the encoder's pre-activations, before the ReLU.

Notebook 003, run 7, on top of run 6: f = ReLU(LayerNorm((x − b_dec) W_enc + b_enc)), the
LayerNorm running over the d_sae pre-activations of each token with a learnable per-latent gain
and bias (eps `norm_eps`). Reading chosen: "normalize feature activations before ReLU in the
encoder" is taken literally, so it is the pre-activations, not the input, that are normalised.
Resampling (run 4) also resets a resampled latent's LayerNorm gain to 1 and bias to 0, with
their Adam state (a dead latent is often dead through a very negative LayerNorm bias), and sets
its firing rate through the LayerNorm bias, the last term of its pre-activation.
"""

from dataclasses import dataclass

import torch

from plugins.freq_order import run_6_grad_clip as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    norm_eps: float = 1e-5


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pre_norm = torch.nn.LayerNorm(self.cfg.d_sae, eps=self.hp.norm_eps, device=self.W_dec.device)

    def pre_activation(self, x):
        return self.pre_norm(super().pre_activation(x))

    def latent_slices(self):
        return [*super().latent_slices(), (self.pre_norm.weight, 0), (self.pre_norm.bias, 0)]

    def latent_offsets(self):
        return self.pre_norm.bias  # added after the normalisation, which would rescale b_enc's shift

    @torch.no_grad()
    def resample(self, dead, directions):
        super().resample(dead, directions)
        self.pre_norm.weight[dead] = 1.0
        self.pre_norm.bias[dead] = 0.0
