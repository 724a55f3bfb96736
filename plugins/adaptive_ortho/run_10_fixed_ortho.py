"""Fixed Orthogonality: every pair of decoder rows penalised alike, no controlled sharing.

Notebook 001, description item 4 ("compare unlearning performance against baseline and fixed
orthogonal SAE"): the notebook names this SAE but never ran it, so it has no run of its own
there. It is numbered 10, after the notebook's last run (9), so the notebook's run numbers keep
their meaning; analyses.py's `unlearning` compares it with run 1 and the baseline.

Reading chosen: run 1's orthogonality loss with its adaptivity taken out. Run 1 is not the fixed
SAE even though its α is constant: what makes it adaptive is that its penalty follows the learned
feature groups and spares pairs inside a group (the controlled sharing). The fixed SAE puts the
same weight on every pair, α · (1/d_sae) Σ_i Σ_{j≠i} cos²(d_i, d_j) with α = 0.1 as in run 1,
so its weight means what run 1's means (here ‖WᵀW‖²_F − Σ_i ‖d_i‖⁴ over d_sae, d_in × d_in
only). Exact orthogonality is impossible with more latents than dimensions, hence a penalty.
The batch-wise groups are still computed and saved, though the loss ignores them, so the
condition numbers of its group subspaces read on the same footing as run 1's.
"""

from plugins.adaptive_ortho import run_1_basic_ortho as parent


class SAE(parent.SAE):
    def ortho_penalty(self):
        """Σ cos² over every pair i ≠ j of (unit) decoder rows, per latent."""
        w = self.decoder_weight()
        return ((w.T @ w).pow(2).sum() - w.pow(2).sum(1).pow(2).sum()) / self.cfg.d_sae
