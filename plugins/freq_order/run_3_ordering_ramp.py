"""Adaptive Ordering Penalty Implementation: the ordering weight ramps up from 0 to 0.5.

Notebook 003, run 3, on top of run 2: the ordering penalty's weight grows linearly from 0 to 0.5
over the first 1000 batches and stays at 0.5 afterwards, so the latents first learn to
reconstruct and only then are ordered by frequency. Reading chosen: "1000 batches" is a schedule
of the notebook's 4882-step run, so the ramp covers the same fraction (about 20%) of training at
any budget (`ordering_ramp_steps` is in notebook steps).
"""

from dataclasses import dataclass

from plugins.freq_order import run_2_freq_ordering as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    ordering_weight: float = 0.5
    ordering_ramp_steps: int = 1000


class SAE(parent.SAE):
    def ordering_weight(self, step):
        return self.hp.ordering_weight * min(1.0, step / self.run_cfg.scaled_steps(self.hp.ordering_ramp_steps))
