"""TopK SAE (Gao et al. 2024): exactly k latents per token, and the AuxK loss on dead latents.

    pre = (x − b_dec) W_enc + b_enc
    f   = ReLU(TopK_k(pre))                 the k largest pre-activations of each token, ReLU'd; 0 elsewhere
    x̂   = f W_dec + b_dec
    loss = ‖x − x̂‖² + aux_loss_coefficient · min(n_dead / k_aux, 1) · ‖e − z W_dec‖²

with e = (x − x̂) detached, k_aux = ⌊d_in / 2⌋, and z the top min(k_aux, n_dead) pre-activations
among the dead latents (raw, not ReLU'd), 0 elsewhere; each term per token, averaged over the
batch. A latent is dead when it has not fired in the last `dead_steps` training steps.

Gao et al., "Scaling and evaluating sparse autoencoders" (2024): the TopK activation replaces the
L1 penalty (k sets the sparsity directly); AuxK (their Appendix A.2, α = 1/32; k_aux = d_model/2
by the heuristic SAELens cites from Appendix B.1) has the top dead latents reconstruct the main
reconstruction's error, so that dead latents get a gradient again. Decoder rows are unit norm
after every step (their Appendix A.1), the gradient's component along each row projected out
first (their code's unit_norm_decoder_grad_adjustment_): the harness's base Trainer, unchanged.

SAELens's `TopKTrainingSAE` is the reference, number for number: its `TopK` module (top-k of the
pre-activations, unsorted, ReLU'd, scattered into zeros), its `calculate_topk_aux_loss` (the
formula above; `calculate_topk_aux_acts` takes the raw pre-activations), and its trainer's dead
mask (`n_forward_passes_since_fired > dead_feature_window`, the counters as they were before the
step, updated from the step's latents afterwards). SAELens's losses are `mse_loss` (our l2_loss)
and `auxiliary_reconstruction_loss` (logged here under that name). TopK has no sparsity penalty,
so `sparsity_loss` is zero: the run's --sparsity-penalty does nothing here. SAELens trains with
`rescale_acts_by_decoder_norm` where we keep the rows at unit norm: on unit rows the two give the
same latents, losses and, along the sphere, gradients, but SAELens leaves its rows free, so each
row's norm becomes a gain on its latent's pre-activation that Adam learns through the decoder: the
same SAEs, trained differently (docs/synthetic.md, the peer check). Kept at unit norm, SAELens's
trainer moves every parameter as ours does (tests/test_synthetic.py, step for step).

Defaults: k = 64; aux_loss_coefficient = 1/32 (the paper's; SAELens's config defaults to 1.0);
dead_steps = 0, read as the harness's dead-latent window (`runs.dead_window_steps`: a tenth
of the run's tokens, at most 1M tokens; SAELens's `dead_feature_window` is a fixed 1,000 steps,
which a short run never reaches, so its AuxK would never act). The export is SAELens's `TopKSAE`
(architecture "topk"), exact.

Readings chosen: before step dead_steps + 1 no latent can have gone dead_steps steps without
firing, so the AuxK term is identically zero there: it is neither computed nor logged until then
(no wasted top-k and matmul, and no host sync to find out). From then on it is logged every step,
zero when nothing is dead, as in SAELens. The dead mask needs no host sync either: SAELens reads
n_dead to size its top-k; here the top-k takes k_aux and drops the picks that are not dead latents,
the same sum. `auxk_dead` (logged) is the number of dead latents AuxK sees; a latent fired in a
step if it fired on any rank's share of the batch. The gradient norm is clipped to 1 before each
step by the harness's trainer, for every architecture, as by SAELens's trainer and by
dictionary_learning's TopK trainer.
"""

from dataclasses import dataclass

import torch

import kernels
from experiment import FORMULA
from runs import dead_window_steps
from plugins.baseline import run_0_baseline as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    k: int = 64
    aux_loss_coefficient: float = 1 / 32
    dead_steps: int = 0  # steps without firing before a latent is dead; 0: the run's dead-latent window


class SAE(parent.SAE):
    sparsity_knob = "k"  # what a sweep of this baseline varies

    def __init__(self, d_in, d_sae, hp, cfg, device=torch.device("cpu"), dtype=torch.float32):
        super().__init__(d_in, d_sae, hp, cfg, device, dtype)
        # Training steps since each latent last fired (SAELens's n_forward_passes_since_fired);
        # a buffer, so it is checkpointed with the weights.
        self.register_buffer("steps_since_fired", torch.zeros(d_sae, dtype=torch.long, device=device))
        self.fired: torch.Tensor | None = None  # this step's firing, from observe to update_dead_counters
        self.dead_steps = hp.dead_steps or dead_window_steps(cfg)

    def activation(self, pre, x):
        values, indices = pre.topk(self.hp.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def sparsity_loss(self, fwd):
        """TopK has no sparsity penalty (k is the constraint): no such term is logged."""
        return None

    def observe(self, fwd):
        self.fired = (fwd.f > 0).any(dim=0)

    def update_dead_counters(self) -> None:
        """After each update (Trainer.after_step), so that a step's AuxK sees the mask from before it."""
        if self.fired is None:
            return
        fired = self.fired
        if torch.distributed.is_initialized():  # fired anywhere in the whole batch, as in one process
            fired = fired.to(torch.int32)
            torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX)
        self.steps_since_fired.add_(1).masked_fill_(fired.bool(), 0)
        self.fired = None

    def dead_latents(self) -> torch.Tensor:
        """(d_sae,) bool: not fired in the last dead_steps training steps."""
        return self.steps_since_fired > self.dead_steps

    def aux_losses(self, fwd):
        if fwd.step <= self.dead_steps:  # nothing can be dead yet: the term is identically zero
            return {}
        dead = self.dead_latents()
        fwd.stats["auxk_dead"] = dead.sum().float()
        return {"auxiliary_reconstruction_loss": self.auxk_loss(fwd, dead)}

    def auxk_loss(self, fwd, dead: torch.Tensor) -> torch.Tensor:
        """SAELens's calculate_topk_aux_loss: the top dead latents reconstruct the detached error."""
        k_aux = fwd.x.shape[-1] // 2
        residual = (fwd.x - fwd.x_hat).detach()
        # Top k_aux among the dead; where fewer are dead, the remaining picks are -inf, not latents.
        candidates = torch.where(dead, fwd.pre, -torch.inf)
        values, indices = candidates.topk(min(k_aux, dead.numel()), dim=-1, sorted=False)
        z = torch.zeros_like(fwd.pre).scatter(-1, indices, torch.where(values.isfinite(), values, 0.0))
        scale = (dead.sum() / k_aux).clamp(max=1.0)  # a few dead latents get a smaller loss
        e_hat = kernels.decode(z, self.decoder_weight(), self.sparse_backward)  # without b_dec, as SAELens
        error = (e_hat - residual).pow(2).sum(-1).mean()
        return self.hp.aux_loss_coefficient * scale * error

    def takes_sparse_step(self):
        """The sparse step is exact here: the top k are positive pre-activations as they are, and
        AuxK's gradient reaches pre at k_aux sites per token (its decode is sparse too)."""
        return self.keeps(*FORMULA, since=SAE)

    def sae_lens_export(self, scale):
        from sae_lens import TopKSAE, TopKSAEConfig

        # Not rescaled by decoder norms: the scaled decoder rows are 1/scale long, and the latents
        # must be the ones training selected.
        export = TopKSAE(TopKSAEConfig(d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, k=self.hp.k, dtype="float32",
                                       device="cpu", rescale_acts_by_decoder_norm=False,
                                       metadata=self.sae_lens_metadata()))
        export.load_state_dict(self.scaled_weights(scale), strict=False)
        return export, self.keeps("encoder_input", "pre_activation", "activation", "decoder_weight", "decode",
                                   since=SAE)

    def sae_lens_training(self):
        """SAELens's TopKTrainingSAE with these weights (its default rescale_acts_by_decoder_norm,
        the same SAE on our unit-norm rows), and its coefficients: none."""
        if not self.keeps(*FORMULA, "update_dead_counters", since=SAE):
            return None
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        ref = TopKTrainingSAE(TopKTrainingSAEConfig(
            d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, k=self.hp.k,
            aux_loss_coefficient=self.hp.aux_loss_coefficient, dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.W_dec.device)))
        ref.load_state_dict({k: v.detach().clone() for k, v in self.named_parameters()}, strict=False)
        return ref, {}


class Trainer(parent.Trainer):
    def after_step(self, x, out, step):
        self.sae.update_dead_counters()
        super().after_step(x, out, step)
