"""Initial Top-k Implementation: orthogonality loss on the batch's most co-active latent pairs.

Notebook 004, run 1. Each batch, the top `topk_percent` (0.1%) of latent pairs i < j by
co-activation Σ_batch f_i·f_j are selected, and their decoder rows are pushed apart with weight
`ortho_weight` (0.1) and a fixed τ (0.1). Decoder rows are unit-norm (the harness renormalises
them after every step), so w_i·w_j is their cosine.

Readings chosen where the notebook is vague: the pair score is the batch sum of f_i·f_j, one
d_sae × d_sae matmul FᵀF (never a per-example product), and the selection is made without
gradient; the number of pairs is topk_percent of the d_sae·(d_sae−1)/2 distinct pairs, and
slots whose pair never co-fires in the batch stay empty. τ is the overlap the loss tolerates.
The loss is a sum over the selected pairs, each priced in the reconstruction loss's own units:
a pair's overlap adds 2·f_i·f_j·(w_i·w_j) to the squared norm of a token's reconstruction, so

    ortho_loss = ortho_weight · Σ_selected 2·c_ij·max(|w_i·w_j| − τ, 0),   c_ij = mean_batch f_i·f_j

is ortho_weight times the reconstruction energy the selected pairs' overlap beyond τ carries
(c_ij is a statistic: the loss moves the decoder, not the latents), so the weight is a share of
a quantity in the loss's own units whatever the activations' scale or d_in. A pair's "correlation"
is its decoder cosine |w_i·w_j|, the quantity the loss acts on. Pair-selection stability ("analyse
pair selection stability") is measured at two horizons: the Jaccard index of this step's selected
pair set with the previous step's (`pair_jaccard`, 0 on the first step), and with the selection
one window earlier (`pair_jaccard_window`: every `stability_every` notebook steps, 500, a tenth
of the run at any budget, the selection is compared with the one kept at the window before, and
the value holds until the next window; 0 before the first), which says whether the same pairs stay
selected over training, not only from one batch to the next. Logged every log step, and their
last values in final_info's `final_metrics`: the loss terms and total, active_features (latents
firing in the batch), selected_pairs, unique_features_in_pairs, max/mean_pair_correlation,
pair_jaccard, pair_jaccard_window, tau.
"""

from dataclasses import dataclass

import torch

from plugins.baseline import run_0_baseline as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    topk_percent: float = 0.001
    ortho_weight: float = 0.1
    tau: float = 0.1
    stability_every: int = 500  # notebook steps between the windowed stability's selections


def jaccard(pairs: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """|A ∩ B| / |A ∪ B| of two selections (flat pair ids, -1 slots empty); 0 where both are empty."""
    valid = pairs >= 0
    shared = (torch.isin(pairs, others) & valid).sum()
    return shared / (valid.sum() + (others >= 0).sum() - shared).clamp_min(1)


class SAE(parent.SAE):
    def __init__(self, d_in, d_sae, hp, cfg, device=torch.device("cpu"), dtype=torch.float32):
        super().__init__(d_in, d_sae, hp, cfg, device, dtype)
        self.n_pairs = max(1, round(hp.topk_percent * d_sae * (d_sae - 1) / 2))
        # Flat ids i·d_sae + j of the last step's selection, -1 for empty slots (fixed size, so
        # it checkpoints with the weights).
        self.register_buffer("pairs", torch.full((self.n_pairs,), -1, dtype=torch.long, device=device))
        self.register_buffer("window_pairs", torch.full((self.n_pairs,), -1, dtype=torch.long, device=device))
        self.register_buffer("window_jaccard", torch.zeros((), device=device))
        self.last_metrics: dict[str, torch.Tensor] = {}

    def tau(self) -> torch.Tensor:
        return torch.tensor(self.hp.tau, device=self.W_dec.device)

    @torch.no_grad()
    def select_pairs(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The n_pairs most co-active pairs i < j as flat ids i·d_sae + j (-1 for an empty slot),
        and each one's co-activation mean_batch f_i·f_j (0 for an empty slot)."""
        scores = (f.T @ f).triu_(1).flatten()  # strict upper triangle: each pair i < j once
        values, ids = scores.topk(self.n_pairs)
        return torch.where(values > 0, ids, -1), values.clamp_min(0) / len(f)

    def pair_cosines(self, pairs: torch.Tensor) -> torch.Tensor:
        ids = pairs.clamp_min(0)
        return (self.W_dec[ids // self.cfg.d_sae] * self.W_dec[ids % self.cfg.d_sae]).sum(-1)

    def aux_losses(self, fwd):
        f = fwd.f.detach()
        pairs, coactivation = self.select_pairs(f)
        # Masks instead of boolean indexing: the loss needs no host sync (empty slots weigh 0).
        valid = (pairs >= 0).float()
        overlap = self.pair_cosines(pairs).abs()
        excess = (overlap - self.tau()).clamp_min(0)
        fwd.stats.update(self.pair_stats(f, pairs, valid, overlap.detach()))  # before self.pairs moves on
        if self.training:
            self.pairs.copy_(pairs)
            if fwd.step % self.run_cfg.scaled_steps(self.hp.stability_every) == 0:
                self.window_jaccard.fill_(jaccard(pairs, self.window_pairs) if fwd.step else 0.0)
                self.window_pairs.copy_(pairs)
            fwd.stats["pair_jaccard_window"] = self.window_jaccard.clone()
        return {"ortho_loss": self.hp.ortho_weight * (2 * coactivation * excess).sum()}

    @torch.no_grad()
    def pair_stats(self, f, pairs, valid, overlap) -> dict[str, torch.Tensor]:
        d_sae = self.cfg.d_sae
        ids = pairs.clamp_min(0)
        in_pairs = torch.zeros(d_sae, device=f.device)
        in_pairs.index_add_(0, ids // d_sae, valid).index_add_(0, ids % d_sae, valid)
        return {"active_features": (f > 0).any(0).sum().float(),
                "selected_pairs": valid.sum(),
                "unique_features_in_pairs": (in_pairs > 0).sum().float(),
                "max_pair_correlation": (overlap * valid).max(),
                "mean_pair_correlation": (overlap * valid).sum() / valid.sum().clamp_min(1),
                "pair_jaccard": jaccard(pairs, self.pairs),
                "tau": self.tau().detach().clone()}

    def final_info(self):
        return {"final_metrics": {k: float(v) for k, v in self.last_metrics.items()}}


class Trainer(parent.Trainer):
    def after_step(self, x, out, step):
        """The step's loss terms and diagnostics, kept for final_info's `final_metrics`."""
        super().after_step(x, out, step)
        terms = {k: v.detach() for k, v in out.terms.items()}
        self.sae.last_metrics = {"total_loss": sum(terms.values()), **terms, **out.stats}
