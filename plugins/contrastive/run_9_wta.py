"""Competitive Feature Learning with Winner-Take-All Implementation: local inhibition, annealed WTA, gates.

Notebook 002, run 9, on top of run 8. After the group-masked code f: (1) local inhibition,
f ← relu(f − κ · mean of the 2r ring neighbours' activations) (κ = `inhibition`,
r = `inhibition_radius`); (2) winner-take-all within consecutive windows of `wta_window`
latents, each latent scaled by exp((f_i − max_window f) / T), so the winner keeps its value and
the others shrink with their gap; (3) the temperature T anneals from `temperature_start` to
`temperature_end` on the coordinated cosine; (4) an adaptive threshold for winner selection:
only windows whose maximum exceeds it compete, the threshold being an EMA (β of run 1) of
`winner_fraction` × the batch's mean window maximum; (5) gradient modulation: in competing
windows the losers pass only `loser_grad_scale` of their gradient (values unchanged);
(6) feature-wise gates 2σ(a_i), learnable, 1 at init; (7) a competitive loss,
`competition_weight` × the mean per-token activation mass of the non-maximal latents of each
window.
Readings chosen: "neighbouring features" are neighbours in latent index (a ring), so inhibition
and competition cost B × d_sae × (2r or window), never B × d_sae × d_sae; the window maximum sets
the bar without receiving gradient from the losers. Temperature and winner threshold are
buffers, the temperature set after each step and the threshold moved as each training batch is
observed (the evaluated encoder uses their final values); they are logged per step with the
fraction of competing windows (against the threshold the batch met) and the mean gate.
"""

from dataclasses import dataclass

import torch

from plugins.contrastive import run_8_group_lr as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    inhibition: float = 0.1
    inhibition_radius: int = 2
    wta_window: int = 8
    temperature_start: float = 1.0
    temperature_end: float = 0.05
    winner_fraction: float = 0.5
    loser_grad_scale: float = 0.5
    competition_weight: float = 0.02


class SAE(parent.SAE):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device = self.W_dec.device
        self.gate_logits = torch.nn.Parameter(torch.zeros(self.cfg.d_sae, device=device))
        self.register_buffer("temperature", torch.tensor(self.hp.temperature_start, device=device))
        self.register_buffer("winner_threshold", torch.zeros((), device=device))

    def windows(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d_sae) -> (B, n_windows, wta_window), zero-padded at the end."""
        w = self.hp.wta_window
        return torch.nn.functional.pad(f, (0, -f.shape[1] % w)).view(len(f), -1, w)

    def activation(self, pre, x):
        f = super().activation(pre, x)
        r = self.hp.inhibition_radius
        neighbours = sum(f.roll(k, 1) + f.roll(-k, 1) for k in range(1, r + 1)) / (2 * r)
        win = self.windows(torch.relu(f - self.hp.inhibition * neighbours))
        top = win.amax(-1, keepdim=True).detach()
        competing = top > self.winner_threshold
        out = torch.where(competing, win * torch.exp((win - top) / self.temperature), win)
        loser = competing & (win < top)
        s = self.hp.loser_grad_scale
        out = torch.where(loser, s * out + (1 - s) * out.detach(), out)
        return out.flatten(1)[:, : self.cfg.d_sae] * 2 * torch.sigmoid(self.gate_logits)

    def observe(self, fwd):
        """The batch's competition, against the winner threshold this forward used; then the
        threshold's EMA moves."""
        super().observe(fwd)
        top = self.windows(fwd.f).amax(-1)
        fwd.stats.update(winner_threshold=float(self.winner_threshold),
                         competing_window_fraction=(top > self.winner_threshold).float().mean())
        beta = self.hp.ema_beta
        self.winner_threshold.mul_(beta).add_((1 - beta) * self.hp.winner_fraction * top.mean())

    def aux_losses(self, fwd):
        terms = super().aux_losses(fwd)
        win = self.windows(fwd.f)
        loser_mass = (win.sum(-1) - win.amax(-1)).sum(-1).mean()
        fwd.stats.update(temperature=float(self.temperature),
                         gate_mean=2 * torch.sigmoid(self.gate_logits.detach()).mean())
        return {**terms, "competition_loss": self.hp.competition_weight * loser_mass}

    def anneal_temperature(self, step: int) -> None:
        """After each update (Trainer.after_step): the competition's temperature for the next step."""
        hp = self.hp
        self.temperature.fill_(self.anneal(hp.temperature_start, hp.temperature_end, step + 1))


class Trainer(parent.Trainer):
    def after_step(self, x, out, step):
        self.sae.anneal_temperature(step)
        super().after_step(x, out, step)
