"""Layer Normalization Implementation: normalise the encoder's input.

Notebook 000, run 6, on top of run 5: the encoder sees LayerNorm(x − b_dec) (learnable gain and
bias, eps `norm_eps`) instead of x − b_dec; the decoder still reconstructs x itself.
"""

from dataclasses import dataclass

import torch

from plugins.zscore_ortho import run_5_importance_l1 as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    norm_eps: float = 1e-5


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = torch.nn.LayerNorm(self.cfg.d_in, eps=self.hp.norm_eps, device=self.W_dec.device)

    def encoder_input(self, x):
        return self.norm(x - self.b_dec)
