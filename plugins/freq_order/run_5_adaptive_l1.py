"""Adaptive L1 Penalty Implementation: the L1 coefficient scales inversely with reconstruction quality.

Notebook 003, run 5, on top of run 4: the sparsity coefficient is base / cos, where cos is the
batch's mean cosine similarity between inputs and reconstructions, so the penalty eases as
reconstruction improves. Readings chosen: the notebook's "base L1 penalty 0.04" is its run
config's sparsity penalty, so the base is the run's `sparsity_penalty` (0.04 in the notebook's
preset), which keeps this run comparable with run 4 on every preset; cos is a statistic (no
gradient flows through the coefficient) and is clamped below at `min_cosine` so an early, poor
or negative cosine cannot blow the coefficient up or flip its sign. `recon_cosine` and
`l1_coefficient` are logged.
"""

from dataclasses import dataclass

from plugins.freq_order import run_4_freq_resampling as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    min_cosine: float = 0.1


class SAE(parent.SAE):
    def sparsity_coefficient(self, fwd):
        return self.run_cfg.sparsity_penalty / self.recon_cosine(fwd).clamp_min(self.hp.min_cosine)
