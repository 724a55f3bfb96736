"""Frequency-Ordered SAE Implementation: activation-frequency tracking and an ordering loss.

Notebook 003, run 2 (the notebook has no run 1; its run 0 is the baseline). Each latent's
activation frequency is tracked, and an ordering loss with weight λ₂ = 0.3 asks higher-indexed
latents to fire less often than lower-indexed ones, so that index order becomes frequency order.

Readings chosen where the notebook is vague: the constraint is batch-wise, on the batch's firing
rates p_i = mean over tokens of 1[pre_i > 0]. Each latent is pulled toward the rate its index
should have, the batch's rates sorted from most to least frequent (p↓, a detached target):
ordering_loss = λ₂ · Σ_i |p_i − p↓_i|, zero exactly when frequency never rises with index. (A
hinge on adjacent pairs, Σ max(p_{i+1} − p_i, 0), has the same zeros but only smooths neighbours.)
It is a sum over latents, not a mean, so each latent's pull does not shrink as d_sae grows. Firing
is not differentiable, so p is a straight-through estimate, p = hard + (soft − soft.detach()): its
value is exactly the hard firing rate, a count over B that rounds alike on every machine (so the
penalty's value moves only when a latent's firing does), its gradient that of soft = mean
sigmoid(pre / `surrogate_temperature`), which also reaches latents that did not fire. Tracked
frequencies are a bias-corrected EMA (decay `freq_decay`) of the batch rates, saved as artifacts for
the frequency figures: `feature_frequencies`, and `frequency_order`, the latent indices from most to
least frequent. Logged every log step and put in final_info: `frequency_index_spearman`, the rank
correlation (ties averaged) of tracked frequency with index, −1 for a perfect ordering, and
`ordering_error`, Σ|f − f↓| / Σ|f↑ − f↓| on tracked frequencies f, 0 when ordered and 1 when fully
reversed; the batch's reconstruction cosine `recon_cosine`, the L1 coefficient and the ordering
weight are logged too.

The notebook's trainer did not clip gradients (its run 6 adds that), so this study's Trainer starts
without the harness's clipping (`max_grad_norm = None`).
"""

from dataclasses import dataclass

import torch

from plugins.baseline import run_0_baseline as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    ordering_weight: float = 0.3
    surrogate_temperature: float = 1.0
    freq_decay: float = 0.99


def average_ranks(values: torch.Tensor, ascending: torch.Tensor) -> torch.Tensor:
    """1-based ranks of values (given them sorted), ties sharing their average rank: dead latents
    all tie at 0."""
    below = torch.searchsorted(ascending, values)
    up_to = torch.searchsorted(ascending, values, right=True)
    return (below + up_to + 1).float() / 2


class SAE(parent.SAE):
    def __init__(self, d_in, d_sae, hp, cfg, device=torch.device("cpu"), dtype=torch.float32):
        super().__init__(d_in, d_sae, hp, cfg, device, dtype)
        self.register_buffer("freq_ema", torch.zeros(d_sae, device=device))
        self.register_buffer("freq_updates", torch.zeros((), dtype=torch.long, device=device))

    def observe(self, fwd):
        # The straight-through rates: their value is exactly the hard firing rate.
        rates = self.firing_rates(fwd.pre)
        d = self.hp.freq_decay
        self.freq_ema.mul_(d).add_((1 - d) * rates)
        self.freq_updates += 1

    def aux_losses(self, fwd):
        weight = self.ordering_weight(fwd.step)
        fwd.stats.update(recon_cosine=self.recon_cosine(fwd),
                         l1_coefficient=torch.as_tensor(self.sparsity_coefficient(fwd)),
                         ordering_weight=torch.as_tensor(weight), **self.ordering_stats())
        return {"ordering_loss": weight * self.ordering_penalty(self.firing_rates(fwd.pre))}

    def recon_cosine(self, fwd) -> torch.Tensor:
        """The batch's mean input-reconstruction cosine, a statistic (run 5's L1 coefficient reads
        it); computed once per batch and logged."""
        if "recon_cosine" not in fwd.stats:
            fwd.stats["recon_cosine"] = torch.nn.functional.cosine_similarity(
                fwd.x, fwd.x_hat.detach(), dim=-1).mean()
        return fwd.stats["recon_cosine"]

    def ordering_weight(self, step: int) -> float:
        return self.hp.ordering_weight

    def ordering_penalty(self, rates: torch.Tensor) -> torch.Tensor:
        """Each latent is pulled toward the rate its index should have: the batch's rates sorted
        from most to least frequent (a detached target)."""
        target = rates.detach().sort(descending=True).values
        return (rates - target).abs().sum()

    def firing_rates(self, pre: torch.Tensor) -> torch.Tensor:
        """Batch firing rate per latent: hard value, sigmoid-surrogate gradient. (soft − soft.detach())
        is exactly 0, so the value is the hard rate bit for bit; (hard + soft) − soft would round,
        and the sorted-rate penalty would carry that rounding into the loss."""
        soft = torch.sigmoid(pre / self.hp.surrogate_temperature).mean(0)
        return (pre > 0).float().mean(0) + (soft - soft.detach())

    @torch.no_grad()
    def frequencies(self) -> torch.Tensor:
        """Tracked activation frequency per latent (EMA with Adam-style bias correction)."""
        correction = 1 - self.hp.freq_decay ** self.freq_updates.clamp_min(1).float()
        return self.freq_ema / correction

    @torch.no_grad()
    def ordering_stats(self) -> dict[str, torch.Tensor]:
        freq = self.frequencies()
        ascending = freq.sort().values
        descending = ascending.flip(0)
        ranks = average_ranks(freq, ascending)
        ranks -= ranks.mean()
        index = torch.arange(len(freq), device=freq.device, dtype=freq.dtype)
        index -= index.mean()
        spearman = (ranks * index).sum() / (ranks.norm() * index.norm()).clamp_min(1e-12)
        error = (freq - descending).abs().sum() / (ascending - descending).abs().sum().clamp_min(1e-12)
        return {"ordering_error": error, "frequency_index_spearman": spearman}

    def final_info(self):
        return {k: float(v) for k, v in self.ordering_stats().items()}

    def artifacts(self):
        freq = self.frequencies()
        return {"feature_frequencies": freq, "frequency_order": freq.argsort(descending=True, stable=True)}


class Trainer(parent.Trainer):
    max_grad_norm = None  # the notebook's trainer: run 6 adds clipping
