"""Improved Initialization and Training Stability: calibrated thresholds and clipped gradients.

Notebook 000, run 2, on top of run 1. Run 1 fired no latent at all (L0 = 0): the z-score
threshold was applied before its statistics meant anything. Here the threshold's z ramps from 0
to its full value over `threshold_warmup` steps while the EMA statistics calibrate, and gradients
are clipped to norm `grad_clip`. Reading chosen: the notebook names no mechanism beyond
"initialisation and stability", so these two are the changes; everything else is run 1.
"""

from dataclasses import dataclass

import torch

from plugins.zscore_ortho import run_1_initial as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    threshold_warmup: int = 100
    grad_clip: float = 1.0


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def threshold(self):
        ramp = min(1.0, self.steps_seen.item() / max(self.hp.threshold_warmup, 1))
        return self.pre_mean + ramp * self.hp.z * self.pre_var.sqrt()

    def on_step_end(self, step):
        self.steps_seen += 1


class Trainer(parent.Trainer):
    def apply_update(self, step):
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.sae.hp.grad_clip)
        super().apply_update(step)
