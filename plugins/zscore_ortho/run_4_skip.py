"""Skip Connections Implementation: a scaled identity path from input to reconstruction.

Notebook 000, run 4, on top of run 3: the reconstruction is decode(f) + skip_scale·x with
skip_scale = 0.1. Reading chosen: the skip path is part of the SAE, in training and in
evaluation alike (evals.ScaledSAE decodes the latents sae_bench got from encode with the
input they came from), so the evaluated SAE is the one that was trained, not a decoder trained to
output about 0.9·x scored on the latent path alone (issue 17). Its SAELens export holds the
linear part only and says so (`sae_lens_export.exact` false): SAELens has no skip path.
"""

from dataclasses import dataclass

from plugins.zscore_ortho import run_3_reduced_ortho_lr as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    skip_scale: float = 0.1


class SAE(parent.SAE):
    def reconstruct(self, x, f):
        return self.decode(f) + self.hp.skip_scale * x
