"""Adaptive Learning with Gradient Accumulation: per-latent learning rates, 4-batch updates, clipping.

Notebook 001, run 5, on top of run 4. Each latent gets its own learning rate multiplier in
[0.1, 10] × the base rate; gradients of 4 consecutive batches are averaged before each optimizer
update; the global gradient norm is clipped to 1.0 before each update.

Readings chosen: a latent's multiplier is mean firing rate / its firing rate (EMAs over
batches, decay `rate_decay`), clamped to [min_lr_mult, max_lr_mult]: rarely firing latents learn
faster, over-active ones slower. It applies to the latent's own weights (encoder column and
gain, decoder row, encoder bias); shared parameters keep the base rate. Adam is invariant to the
gradient's scale, so the multiplier scales each latent's Adam update (the step itself), not its
gradient. The LR schedule advances every batch, not every update, and the run's last batch
applies whatever has accumulated, so `training_steps` counts batches and there are a quarter as
many optimizer updates. The notebook's "optimizer parameter grouping with explicit constraints"
is the per-latent / shared split above. The multipliers' range is logged as `lr_mult_min` /
`lr_mult_max`.
"""

import warnings
from dataclasses import dataclass

import torch

from plugins.adaptive_ortho import run_4_low_lr_weight_norm as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    min_lr_mult: float = 0.1
    max_lr_mult: float = 10.0
    rate_decay: float = 0.99
    accumulation: int = 4
    grad_clip: float = 1.0


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("fire_rate", torch.zeros(self.cfg.d_sae, device=self.W_dec.device))

    def observe(self, fwd):
        super().observe(fwd)
        decay = self.hp.rate_decay
        self.fire_rate.mul_(decay).add_((1 - decay) * (fwd.f > 0).float().mean(0))


class Trainer(parent.Trainer):
    def __init__(self, sae, cfg):
        super().__init__(sae, cfg)
        self.grad_sum, self.pending = None, 0  # gradients of the batches since the last update

    def update_scales(self):
        """Each latent's own weights (encoder column and gain, decoder row, encoder bias) at its rate."""
        sae, mult = self.sae, self.lr_multipliers()
        return [(sae.W_enc, mult, 1), (sae.W_dec, mult, 0), (sae.b_enc, mult, 0), (sae.enc_gain, mult, 0)]

    def lr_multipliers(self) -> torch.Tensor:
        rate = self.sae.fire_rate
        return ((rate.mean() + 1e-6) / (rate + 1e-6)).clamp(self.sae.hp.min_lr_mult, self.sae.hp.max_lr_mult)

    def apply_update(self, step):
        """Adds this batch's gradients to the sum; every `accumulation` batches, and at the run's
        last batch, updates (clipped) from their mean. The LR schedule follows batches."""
        # Summed on the trainer, not in .grad, so that a checkpoint between updates keeps them.
        params = [p for p in self.sae.parameters() if p.requires_grad]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        self.grad_sum = grads if self.grad_sum is None else [a + g for a, g in zip(self.grad_sum, grads)]
        self.pending += 1
        if self.pending == self.sae.hp.accumulation or step == self.run_cfg.steps - 1:
            for p, g in zip(params, self.grad_sum):
                p.grad = g / self.pending
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.sae.hp.grad_clip)
            super().apply_update(step)
            self.grad_sum, self.pending = None, 0
        else:
            with warnings.catch_warnings():  # "scheduler before optimizer": intended, it follows batches
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()

    def after_step(self, x, out, step):
        super().after_step(x, out, step)
        mult = self.lr_multipliers()
        out.stats.update(lr_mult_min=mult.min(), lr_mult_max=mult.max())
