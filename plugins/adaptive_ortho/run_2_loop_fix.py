"""Attempted Training Loop Fix: grouping from every batch of the period, applied between steps.

Notebook 001, run 2, on top of run 1. This run exists to chase a bug of the old harness: the
notebook's run 1 trained for 0 steps (the old template's num_tokens = 1000 gave 1000 // batch = 0),
and its "training loop modifications" made the loop run at all (48 steps, then NaN). This harness
always trains the steps it is asked for and stops on a non-finite loss, so there is nothing left
to fix, and the run is kept minimal and honest: one small change to the loop that the notebook's
wording allows, where the periodic grouping sits. Run 1 regroups inside the loss, from the single
batch of the update step, so that step's loss already uses groups built from the batch it is
fitting. Here every training step adds its latent profiles to a running sum, and the groups are
recomputed after the optimizer step that closes each `group_every`-step period, from all the
batches of the period, and then the sum is reset. Where the period is one step (the tiny preset's
32 steps), this differs from run 1 only in which batch's groups a step uses.
"""

import torch

from plugins.adaptive_ortho import run_1_basic_ortho as parent


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("profile_sum", torch.zeros_like(self.W_dec))
        self.register_buffer("fired_in_period", torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=self.W_dec.device))

    def observe(self, fwd):
        self.profile_sum += parent.latent_profiles(fwd.x, fwd.f)
        self.fired_in_period |= (fwd.f > 0).any(0)

    def regroup_if_due(self, step: int) -> None:
        """After each update (Trainer.after_step): regroup at the end of every grouping period."""
        if (step + 1) % self.run_cfg.scaled_steps(self.hp.group_every) == 0:
            self.regroup(self.profile_sum, self.fired_in_period)
            self.profile_sum.zero_()
            self.fired_in_period.zero_()


class Trainer(parent.Trainer):
    def after_step(self, x, out, step):
        super().after_step(x, out, step)
        self.sae.regroup_if_due(step)
