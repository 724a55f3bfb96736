"""JumpReLU SAE: a threshold per latent and an L0 penalty, trained through straight-through estimators.

Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse
Autoencoders", as SAELens's `JumpReLUTrainingSAE` (sae_lens 6.54) trains it with its defaults:

    pre  = (x − b_dec) W_enc + b_enc
    f    = pre · H(pre − θ)                            JumpReLU; θ ≥ 0, one per latent
    x̂    = f W_dec + b_dec
    loss = ‖x − x̂‖² + λ Σ_i H(pre_i − θ_i)             per token, averaged over the batch

H, the Heaviside step, gets a straight-through estimator with the rectangle kernel
K(u) = 1[|u| < ½] of bandwidth ε: ∂f/∂θ = −(θ/ε)·K((pre − θ)/ε), ∂H/∂θ = −(1/ε)·K((pre − θ)/ε),
∂f/∂pre = H(pre − θ), and the step passes nothing to pre (SAELens's `jumprelu_ste_to_input =
False`, DeepMind's recipe): the L0 penalty moves only θ; the encoder learns from the reconstruction.
The L0 penalty is `sparsity_loss` (SAELens's `l0_loss`): SAELens's default sparsity loss mode is
"step", this one. With `target_l0` set it is instead λ·(L̄0/target − 1)², L̄0 the batch's mean L0:
dictionary_learning's JumpReluTrainer's objective (SAEBench's JumpReLU baselines), a pull to a
target that stops there. SAELens's "tanh" (Anthropic's) and "quadratic" (Gemma Scope 2's, per token)
modes are not here, nor Anthropic's pre-activation loss on dead latents, which SAELens leaves off by
default (`pre_act_loss_coefficient = None`). λ may warm up linearly, λ·min(1, step/W) over
`l0_warm_up_steps` = W, as SAELens's CoefficientScheduler does (off by default).

θ is the raw threshold, as in the installed SAELens, which trained log θ (as DeepMind's JumpReLU
does, for positivity) until it switched (its issue #494: Adam moves a parameter by about lr per step,
so log θ moved a small θ only multiplicatively; old `log_threshold` checkpoints are converted on
load). θ ≥ 0 is kept by projection, a clamp in place outside the graph (so a latent whose θ
reaches 0 keeps its gradient): SAELens clamps before each training pass, we after each update,
the same numbers, and the evaluated SAE has θ ≥ 0 too. bf16: Adam's ~lr steps on θ round away in
bfloat16, so θ is created float32 whatever the SAE's dtype, stays float32 through `.to(dtype)`
(`_apply`, as SAELens's; sae_bench's core eval casts the SAE to the model's dtype, bf16 on CUDA),
and is cast to the pre-activations' dtype only where compared with them. At inference
f = ReLU(pre)·H(pre − θ), SAELens's `JumpReLUSAE.encode` (training's formula while θ ≥ 0), the
class the run exports as.

Defaults: bandwidth ε = 0.05 and initial θ = 0.01, SAELens's; λ = `l0_coefficient` = 1.0 (SAELens's
default too; `--sparsity-penalty`, an L1 coefficient, is not read). Adam moves θ by about lr per
step whatever λ is once the L0 gradient dominates θ's, so where lr · steps is small against the
pre-activations' scale θ cannot reach the level λ sets, and λ hardly moves L0. θ therefore takes
its own rate (`threshold_lr_scale` times the run's, through Trainer.update_scales), by default
enough for θ to travel THRESHOLD_TRAVEL in the run: max(1, THRESHOLD_TRAVEL / (lr · steps)), which
is 1 once lr · steps reaches it (the measurement that set it is in notes.md).

Readings chosen: the decoder. SAELens leaves JumpReLU's decoder unconstrained (its L0 penalty does
not see ‖W_dec‖); dictionary_learning's JumpReluTrainer keeps decoder rows at unit norm and
removes the gradient parallel to them, as the harness's Trainer does, which is kept here.
Every loss term at given weights is SAELens's either way; the constraint fixes the gauge of
f·‖W_dec‖ (and θ with it). Initialisation is the harness's (unit decoder rows, W_enc = W_decᵀ,
b_enc = 0), not SAELens's decoder rows of norm 0.1, so initial pre-activations are ~10× larger
relative to θ = 0.01 than in SAELens. Both trainers clip the gradient norm at 1.
"""

from dataclasses import dataclass

import torch

from plugins.baseline import run_0_baseline as parent


THRESHOLD_TRAVEL = 4.0  # how far θ can move in a run at its default rate, in the pre-activations' units


@dataclass
class Hyperparams(parent.Hyperparams):
    bandwidth: float = 0.05  # ε, the rectangle kernel's width (SAELens's jumprelu_bandwidth)
    init_threshold: float = 0.01  # θ at initialisation (SAELens's jumprelu_init_threshold)
    l0_coefficient: float = 1.0  # λ (SAELens's l0_coefficient)
    l0_warm_up_steps: int = 0  # λ rises linearly from 0 over these steps (SAELens's l0_warm_up_steps)
    threshold_lr_scale: float = 0.0  # θ's rate over the run's lr; 0: enough for θ to travel THRESHOLD_TRAVEL
    target_l0: float = 0.0  # > 0: λ·(mean L0/target − 1)², dictionary_learning's objective, in place of λ·L0


def threshold_rate(hp: Hyperparams, cfg) -> float:
    """θ's learning rate over the run's: `threshold_lr_scale`, or enough for θ to travel THRESHOLD_TRAVEL."""
    return hp.threshold_lr_scale or max(1.0, THRESHOLD_TRAVEL / (cfg.lr * cfg.steps))


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ); the gradient to θ is the rectangle-kernel STE, summed over the batch."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        ste = (threshold / ctx.bandwidth) * rectangle((pre - threshold) / ctx.bandwidth) * grad
        return (pre > threshold) * grad, torch.sum(-ste, dim=0), None


class Step(torch.autograd.Function):
    """H(pre − θ); gradient to θ only (the estimator's gradient to pre is not passed on)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        ste = (1.0 / ctx.bandwidth) * rectangle((pre - threshold) / ctx.bandwidth) * grad
        return None, torch.sum(-ste, dim=0), None


class SAE(parent.SAE):
    sparsity_knob = "l0_coefficient"  # what a sweep of this baseline varies

    def __init__(self, d_in, d_sae, hp, cfg, device=torch.device("cpu"), dtype=torch.float32):
        super().__init__(d_in, d_sae, hp, cfg, device, dtype)
        self.threshold = torch.nn.Parameter(torch.full((d_sae,), hp.init_threshold, dtype=torch.float32, device=device))

    def _apply(self, *args, **kwargs):
        out = super()._apply(*args, **kwargs)
        # .to(dtype) casts every float parameter; θ stays float32 (its small Adam steps).
        threshold = self._parameters.get("threshold")
        if threshold is not None and threshold.dtype != torch.float32:
            threshold.data = threshold.data.float()
        return out

    def activation(self, pre, x):
        threshold = self.threshold.to(pre.dtype)
        if self.training:
            return JumpReLU.apply(pre, threshold, self.hp.bandwidth)
        return torch.relu(pre) * (pre > threshold).to(pre.dtype)  # JumpReLUSAE.encode's formula

    def sparsity_coefficient(self, fwd):
        warm_up = self.hp.l0_warm_up_steps
        return self.hp.l0_coefficient * (min(1.0, fwd.step / warm_up) if warm_up > 0 else 1.0)

    def sparsity_loss(self, fwd):
        """λ·L0 through the step's estimator: SAELens's "step" sparsity loss (or, with a target,
        dictionary_learning's λ·(mean L0/target − 1)²: the module docstring)."""
        l0 = Step.apply(fwd.pre, self.threshold.to(fwd.pre.dtype), self.hp.bandwidth).sum(dim=-1)
        if self.hp.target_l0 > 0:
            return self.sparsity_coefficient(fwd) * (l0.mean() / self.hp.target_l0 - 1) ** 2
        return (self.sparsity_coefficient(fwd) * l0).mean()

    def observe(self, fwd):
        fwd.stats["mean_threshold"] = self.threshold.mean()  # θ is the L0 penalty's only lever: logged

    @torch.no_grad()
    def project_threshold(self) -> None:
        """After each update (Trainer.after_step): SAELens's projection onto θ ≥ 0 (see the docstring)."""
        self.threshold.clamp_(min=0.0)

    def sae_lens_export(self, scale):
        """SAELens's JumpReLUSAE in the model's scale: θ compares pre-activations, which the
        scaled weights leave unchanged, so it is exported as it is."""
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

        export = JumpReLUSAE(JumpReLUSAEConfig(d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, dtype="float32",
                                               device="cpu", metadata=self.sae_lens_metadata()))
        export.load_state_dict({**self.scaled_weights(scale), "threshold": self.threshold.detach().float().cpu()})
        exact = (self.keeps("encoder_input", "pre_activation", "decoder_weight", "decode")
                 and type(self).activation is SAE.activation)
        return export, exact

    def sae_lens_training(self):
        """SAELens's JumpReLUTrainingSAE with these weights and hyperparameters, and its `l0`
        coefficient after any warm-up (bench.py times its step against ours); None with a target
        (SAELens has no batch-mean target objective)."""
        hp = self.hp
        if hp.target_l0 > 0:
            return None
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        ref = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.W_dec.device), jumprelu_init_threshold=hp.init_threshold,
            jumprelu_bandwidth=hp.bandwidth, l0_coefficient=hp.l0_coefficient, l0_warm_up_steps=hp.l0_warm_up_steps))
        ref.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()}, strict=False)
        return ref, {"l0": hp.l0_coefficient}


class Trainer(parent.Trainer):
    def update_scales(self):
        """θ's own rate, so that it can follow λ within the run (the docstring)."""
        scale = threshold_rate(self.sae.hp, self.run_cfg)
        return [*super().update_scales(), (self.sae.threshold, torch.full_like(self.sae.threshold, scale), 0)]

    def after_step(self, x, out, step):
        self.sae.project_threshold()
        super().after_step(x, out, step)
