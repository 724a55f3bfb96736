"""Coordinated Cosine Annealing for Contrast Threshold: τ anneals from 0.4 towards 0.05.

Notebook 002, run 2, on top of run 1: the contrast threshold follows a half cosine from
`contrast_threshold` (0.4) at the first step to `threshold_end` (0.05) at the last, synchronised
with training progress; JL projection and EMA tracking are kept. Reading chosen: "synchronised
with training progress" means the schedule spans the whole run at any budget; the same cosine
(`cosine(step)`, 1 → 0) is the one every later annealed quantity follows ("coordinated").
The notebook's end, 0.05, is below the noise of the 128-d sketch it measures cosines in: unrelated
directions in k dimensions have cosines of spread 1/√k (0.088 at k = 128), and the sketch errs
on a pair's cosine by as much, so late in the run the penalty also pushes on pairs that are alike
only in the sketch. The schedule is the notebook's (it reaches 0.05); `noise_z` = z > 0 sets a
floor τ = max(annealed τ, z/√k) (k the JL dimension, d_in where that is smaller), e.g. z = 3:
0.265, for a run that asks what the penalty does above the sketch's noise (`analyse contrastive
jl_error` reads the share of pairs whose sketched cosine errs beyond the final threshold).
The threshold is logged per step as `contrast_threshold`.
"""

import math
from dataclasses import dataclass

from plugins.contrastive import run_1_jl_ema as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    threshold_end: float = 0.05
    noise_z: float = 0.0  # the notebook's schedule: no floor


class SAE(parent.SAE):
    def progress(self, step: int) -> float:
        """0 at the first step, 1 at the last."""
        return min(1.0, step / max(self.run_cfg.steps - 1, 1))

    def cosine(self, step: int) -> float:
        """1 → 0 over training on a half cosine: the coordinated schedule."""
        return 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def anneal(self, start: float, end: float, step: int) -> float:
        return end + (start - end) * self.cosine(step)

    def noise_floor(self) -> float:
        """z/√k: `noise_z` times the cosine that unrelated directions show in the k-dimensional
        space the penalty measures (k = the JL dimension, or d_in where that is smaller); 0 at z = 0."""
        return self.hp.noise_z / self.jl.shape[1] ** 0.5

    def contrast_threshold(self, step):
        return max(self.anneal(self.hp.contrast_threshold, self.hp.threshold_end, step), self.noise_floor())

