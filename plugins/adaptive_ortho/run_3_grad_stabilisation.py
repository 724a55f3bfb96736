"""Gradient Stabilization Attempt: the orthogonality gradient no longer fights the reconstruction.

Notebook 001, run 3, on top of run 2. The notebook blamed run 2's instability on the interaction
between the orthogonality loss and the reconstruction/sparsity objective, and names no concrete
mechanism. Reading chosen: gradient surgery (as in PCGrad) per decoder row. The orthogonality
term (which depends on W_dec only) and the other terms are differentiated separately; where a
row's orthogonality gradient points against that row's gradient from the other terms, its
conflicting component is projected out before the two are summed. The fraction of rows in
conflict is logged as `ortho_conflict_fraction`.
"""

import torch

from plugins.adaptive_ortho import run_2_loop_fix as parent

Hyperparams = parent.Hyperparams


class SAE(parent.SAE):
    """Unchanged; a subclass so that the harness traces run 4's parent to this run."""


def deconflict(g_ortho: torch.Tensor, g_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove, row by row, the component of g_ortho that opposes g_rest; also the conflict mask."""
    dot = (g_ortho * g_rest).sum(1, keepdim=True)
    conflict = dot < 0
    g_ortho = g_ortho - conflict * dot / g_rest.pow(2).sum(1, keepdim=True).clamp_min(1e-12) * g_rest
    return g_ortho, conflict


class Trainer(parent.Trainer):
    def step(self, x, step):
        out = self.loss_fn(x, step)
        self.optimizer.zero_grad(set_to_none=True)
        conflict = self.backward(out)
        self.apply_update()
        self.sae.on_step_end(step)
        return sum(out.terms.values()).detach(), out._replace(stats={**out.stats, "ortho_conflict_fraction": conflict})

    def backward(self, out) -> torch.Tensor:
        """Backpropagate into zeroed .grad with the orthogonality gradient de-conflicted; returns
        the fraction of decoder rows in conflict."""
        w = self.sae.W_dec
        (g_ortho,) = torch.autograd.grad(out.terms["ortho_loss"], w, retain_graph=True)
        sum(v for k, v in out.terms.items() if k != "ortho_loss").backward()
        g_ortho, conflict = deconflict(g_ortho, w.grad)
        w.grad += g_ortho
        return conflict.float().mean()
