"""Curriculum Learning for Orthogonality: α rises linearly from 0.01 to 0.1 over 5000 steps.

Notebook 001, run 7, on top of run 6. The orthogonality weight starts at `alpha_start` = 0.01 and
grows linearly to `alpha` = 0.1 over 5000 notebook steps (scaled to the run's length; the
notebook's runs had 4882 steps, so α ends just short of 0.1). `alpha` stays the final value, so
`--set alpha=...` still sets the level the curriculum heads to. The current α is logged as
`alpha`. The notebook's "epsilon terms" are already in the cosine-free penalty and the norms.
"""

from dataclasses import dataclass

from plugins.adaptive_ortho import run_6_skip_dropout as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    alpha_start: float = 0.01
    curriculum_steps: int = 5000


class SAE(parent.SAE):
    def ortho_weight(self, step):
        progress = min(1.0, step / self.run_cfg.scaled_steps(self.hp.curriculum_steps))
        return self.hp.alpha_start + (self.hp.alpha - self.hp.alpha_start) * progress
