"""Skip Connections and Feature Dropout: a 0.1 · x skip path and 30% latent dropout in training.

Notebook 001, run 6, on top of run 5. The training reconstruction becomes
decode(dropout(f)) + skip_scale · x: a residual path from the encoder's input to the decoder's
output, and latents dropped with probability 0.3 (inverted dropout, torch's seeded global RNG).

Readings chosen: the notebook gives no skip weight, so it is a fixed 0.1 (a learnable one would
let the identity path take over the reconstruction). The skip path is part of the SAE, in
training and in evaluation alike (evals.ScaledSAE decodes the latents sae_bench got from
encode with the input they came from), so the evaluated SAE is the one that was trained; dropout
is training only, as always (inverted, so evaluation needs no rescaling). The SAELens export holds
the linear part only and says so (`sae_lens_export.exact` false). The sparsity penalty and the
latents the harness tracks are those before dropout.
"""

from dataclasses import dataclass

import torch.nn.functional as F

from plugins.adaptive_ortho import run_5_adaptive_lr_accum as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    skip_scale: float = 0.1
    feature_dropout: float = 0.3


class SAE(parent.SAE):
    def reconstruct(self, x, f):
        dropped = F.dropout(f, self.hp.feature_dropout, self.training)
        return super().reconstruct(x, dropped) + self.hp.skip_scale * x
