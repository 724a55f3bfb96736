"""Layer Normalization and Loss Warm-up: LayerNorm on the pre-activations, constraints ramped in.

Notebook 001, run 8, on top of run 7. A LayerNorm (learnable gain and bias) normalises the
encoder's pre-activations across latents before the ReLU, to control activation magnitudes; the
constraint losses (L1 sparsity and orthogonality) are multiplied by a factor that rises linearly
to 1 over 2000 notebook steps, so reconstruction is learned first (the orthogonality's through
its weight α, which run 3 makes its share of the decoder update).

The base learning rate drops tenfold from run 4's (the notebook's "reduced initial learning rate
by 10x": 1e-4 to 1e-5, a thirtieth of its 3e-4), a thirtieth of the run's --lr here
(`lr_ratio`); run 5's per-latent multipliers still apply on top of it.

Readings chosen: the LayerNorm sits "between encoder and decoder" (the notebook's wording in the
runs before), i.e. over the d_sae pre-activations. "Initial" learning rate is read as the base
rate the schedule and the per-latent multipliers start from: this plugin's own `lr_ratio`
hyperparameter (run 4's reading), reported as `optimizer_lr` (the notebook's results still report
learning_rate 1e-4, its config's field, as the harness's `learning_rate` reports --lr). The
"adaptive per-feature learning rates" of the same item restate run 5's. The constraint factor is
logged as `constraint_warmup`.
"""

from dataclasses import dataclass

import torch

from plugins.adaptive_ortho import run_7_alpha_curriculum as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    constraint_warmup: int = 2000
    norm_eps: float = 1e-5
    lr_ratio: float = 1 / 30  # of --lr: run 4's third, cut tenfold


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pre_norm = torch.nn.LayerNorm(self.cfg.d_sae, eps=self.hp.norm_eps, device=self.W_dec.device)

    def pre_activation(self, x):
        return self.pre_norm(super().pre_activation(x))

    def constraint_ramp(self, step: int) -> float:
        """The factor on the constraint losses: rises linearly to 1 over the warm-up."""
        return min(1.0, (step + 1) / self.run_cfg.scaled_steps(self.hp.constraint_warmup))

    def sparsity_loss(self, fwd):
        return self.constraint_ramp(fwd.step) * super().sparsity_loss(fwd)

    def ortho_weight(self, step):
        """Run 7's α times the ramp: run 3 rescales the orthogonality gradient to this weight of the
        other terms' decoder gradient, so a ramp on the loss alone would be divided back out."""
        return self.constraint_ramp(step) * super().ortho_weight(step)

    def aux_losses(self, fwd):
        fwd.stats["constraint_warmup"] = torch.tensor(self.constraint_ramp(fwd.step))
        return super().aux_losses(fwd)  # the orthogonality term is ramped through ortho_weight
