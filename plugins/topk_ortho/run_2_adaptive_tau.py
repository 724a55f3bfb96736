"""Adaptive τ: the tolerated decoder overlap tracks the selected pairs' own overlap.

Notebook 004, item 4 ("compare fixed vs adaptive τ"), on top of run 1. The notebook names no
rule; the one chosen: after every optimizer step, τ ← d·τ + (1 − d)·q, where q is the
`tau_quantile` (median) of |w_i·w_j| over the pairs selected that step, measured on the updated
decoder, and d = `tau_decay` (0.99); τ starts at run 1's 0.1. The hinge then always presses on
roughly the more overlapping half of the selected pairs, and the margin tightens as training
decorrelates them instead of going slack once they fall under a fixed 0.1.
"""

from dataclasses import dataclass

import torch

from plugins.topk_ortho import run_1_topk_pairs as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    tau_quantile: float = 0.5
    tau_decay: float = 0.99


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("tau_ema", torch.tensor(self.hp.tau, device=self.W_dec.device))

    def tau(self):
        return self.tau_ema

    @torch.no_grad()
    def update_tau(self) -> None:
        """After each update (Trainer.after_step): τ's EMA towards this step's pair-cosine quantile."""
        selected = self.pairs[self.pairs >= 0]
        if len(selected):
            target = self.pair_cosines(selected).abs().quantile(self.hp.tau_quantile)
            self.tau_ema.lerp_(target, 1 - self.hp.tau_decay)


class Trainer(parent.Trainer):
    def after_step(self, x, out, step):
        self.sae.update_tau()
        super().after_step(x, out, step)
