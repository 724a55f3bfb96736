"""Improved Initialization and Training Stability: calibrated thresholds and clipped gradients.

Notebook 000, run 2, on top of run 1. Run 1 fired no latent at all (L0 = 0): the z-score
threshold was applied before its statistics meant anything. Here (1) the running statistics are
initialised from the first training batch (its pre-activations' mean and variance, its latents'
covariance) instead of from zero, which the EMA then took about 1/(1 − ema_decay) steps to forget;
(2) the threshold's z ramps from 0 to its full value over `threshold_warmup` notebook steps
(scaled to the run's length) while those statistics settle; (3) gradients are clipped to norm
`grad_clip`. Reading chosen: the notebook names no mechanism beyond "initialisation and
stability". The old template's zero weights, the likely cause of its run 1, never exist here (every
run, run 1 included, starts from random unit decoder rows and a tied encoder), so the
initialisation this run can improve is that of the threshold's statistics.
"""

from dataclasses import dataclass

import torch

from plugins.zscore_ortho import run_1_initial as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    threshold_warmup: int = 100  # notebook steps
    grad_clip: float = 1.0


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def threshold(self):
        ramp = min(1.0, self.steps_seen.item() / self.run_cfg.scaled_steps(self.hp.threshold_warmup))
        return self.pre_mean + ramp * self.hp.z * self.pre_var.sqrt()

    def ema_keep(self):
        return 0.0 if self.steps_seen == 0 else super().ema_keep()  # the first batch initialises the statistics


class Trainer(parent.Trainer):
    def after_step(self, x, out, step):
        self.sae.steps_seen += 1
        super().after_step(x, out, step)

    def apply_update(self, step):
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.sae.hp.grad_clip)
        super().apply_update(step)
