"""Adaptive Layer Normalization Implementation: a learnable, sigmoid-gated normalisation strength.

Notebook 000, run 7, on top of run 6: the encoder input is x' + σ(a)·(LayerNorm(x') − x') with
x' = x − b_dec and a learnable scalar a (initial value `strength_init`, so σ(a) = 0.5 at 0):
the SAE learns how much normalisation it wants.
"""

from dataclasses import dataclass

import torch

from plugins.zscore_ortho import run_6_layer_norm as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    strength_init: float = 0.0


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_strength = torch.nn.Parameter(torch.tensor(self.hp.strength_init, device=self.W_dec.device))

    def encoder_input(self, x):
        centred = x - self.b_dec
        return centred + torch.sigmoid(self.norm_strength) * (self.norm(centred) - centred)
