"""Progressive Feature Unlocking: 25% of latents active at first, 10% more every 1000 steps.

Notebook 001, run 9, on top of run 8. A mask in the encoder keeps only the unlocked latents: the
first 25% of the dictionary at the start, 10% more of it (percentage points) after every 1000
notebook steps (scaled to the run's length), up to all of it. The mask stays in place for
evaluation, as in the notebook's "feature masking mechanism in forward pass"; at the notebook's
4882 steps, 65% of the latents end up unlocked.

Readings chosen: latents unlock in index order (their initialisation is random, so this is a
random order fixed by the seed); the notebook's gradient checkpointing saves memory without
changing the result and is left out. The unlocked fraction is logged as `unlocked_fraction`.
"""

from dataclasses import dataclass

import torch

from plugins.adaptive_ortho import run_8_layer_norm_warmup as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    initial_unlocked: float = 0.25
    unlock_fraction: float = 0.10
    unlock_every: int = 1000


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("unlocked", torch.zeros(self.cfg.d_sae, device=self.W_dec.device))
        self.unlock(self.hp.initial_unlocked)

    def unlock(self, fraction: float) -> None:
        self.unlocked[: round(min(fraction, 1.0) * self.cfg.d_sae)] = 1.0

    def activation(self, pre, x):
        return super().activation(pre, x) * self.unlocked

    def aux_losses(self, fwd):
        terms = super().aux_losses(fwd)
        fwd.stats["unlocked_fraction"] = self.unlocked.mean()
        return terms

    def unlock_due(self, step: int) -> None:
        """After each update (Trainer.after_step): the latents unlocked by this step."""
        rounds = (step + 1) // self.run_cfg.scaled_steps(self.hp.unlock_every)
        self.unlock(self.hp.initial_unlocked + rounds * self.hp.unlock_fraction)


class Trainer(parent.Trainer):
    def after_step(self, x, out, step):
        super().after_step(x, out, step)  # the parent's regrouping first, as the notebook's loop has it
        self.sae.unlock_due(step)
