"""Skip Connection Implementation: a scaled linear skip path into the encoder.

Notebook 003, run 8, on top of run 7: a skip projection (a linear layer d_in → d_sae with bias)
of the centred input x − b_dec is added, scaled by `skip_scale` = 0.1, to the layer-normalised
pre-activations: f = ReLU(LayerNorm(pre) + 0.1 · skip_proj(x − b_dec)).
Readings chosen where the notebook is vague: "skip connection in the encoder" is a path around
run 7's LayerNorm, joined before the ReLU so codes stay sparse and non-negative, and the SAE that
sae_bench evaluates (encode, then decode) is the one trained; a skip added after the ReLU, or
into the reconstruction, would not be an SAE code. Resampling (run 4) zeroes a resampled
latent's skip row and bias, with their Adam state.
"""

from dataclasses import dataclass

import torch

from plugins.freq_order import run_7_preact_layer_norm as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    skip_scale: float = 0.1


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_proj = torch.nn.Linear(self.cfg.d_in, self.cfg.d_sae, device=self.W_dec.device)

    def pre_activation(self, x):
        return super().pre_activation(x) + self.hp.skip_scale * self.skip_proj(self.encoder_input(x))

    def latent_slices(self):
        return [*super().latent_slices(), (self.skip_proj.weight, 0), (self.skip_proj.bias, 0)]

    @torch.no_grad()
    def resample(self, dead, directions):
        super().resample(dead, directions)
        self.skip_proj.weight[dead] = 0.0
        self.skip_proj.bias[dead] = 0.0
