"""Skip Connections Implementation: a scaled identity path from input to reconstruction.

Notebook 000, run 4, on top of run 3: the training reconstruction is decode(f) + skip_scale·x
with skip_scale = 0.1. Reading chosen: the skip path belongs to the training objective only;
sae_bench evaluates decode(encode(x)), which has no access to x, so the evaluated SAE is the
latent path. This is why the notebook saw no change in its core metrics from this run.
"""

from dataclasses import dataclass

from plugins.zscore_ortho import run_3_reduced_ortho_lr as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    skip_scale: float = 0.1


class SAE(parent.SAE):
    def reconstruct(self, x, f):
        return self.decode(f) + self.hp.skip_scale * x
