"""Reduced Orthogonality Penalty and Adaptive Learning Rate.

Notebook 000, run 3, on top of run 2: the orthogonality weight drops from 0.1 to 0.01, and after
the linear warm-up the learning rate follows a cosine decay to `min_lr_fraction` of its peak.
Reading chosen: "adaptive learning rate schedule" is taken as warm-up then cosine decay.
"""

import math
from dataclasses import dataclass

import torch

from plugins.zscore_ortho import run_2_stable_init as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    ortho_weight: float = 0.01
    min_lr_fraction: float = 0.1


class Trainer(parent.Trainer):
    def make_scheduler(self):
        warmup, total = max(self.run_cfg.warmup_steps, 1), max(self.run_cfg.steps, 1)
        floor = self.sae.hp.min_lr_fraction

        def factor(s):
            if s < warmup:
                return (s + 1) / warmup
            progress = (s - warmup) / max(total - warmup, 1)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
