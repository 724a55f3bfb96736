"""Gradient Stabilization Attempt: the orthogonality gradient neither fights nor swamps the reconstruction.

Notebook 001, run 3, on top of run 2. The notebook blamed run 2's instability on the interaction
between the orthogonality loss and the reconstruction/sparsity objective, and names no concrete
mechanism. Reading chosen: the two gradients on the decoder are balanced. The orthogonality term
(which depends on W_dec only) and the other terms are differentiated separately; where a row's
orthogonality gradient points against that row's gradient from the other terms, its conflicting
component is projected out (gradient surgery, as in PCGrad); then the orthogonality gradient is
rescaled so that its norm is α times the norm of the other terms' decoder gradient. From this run
on α (0.1, and run 7's curriculum) is therefore the orthogonality's share of the decoder update:
it can neither blow the step up nor fade to nothing as the reconstruction loss falls. Logged:
`ortho_conflict_fraction`, the fraction of rows in conflict, `ortho_grad_scale`, the factor
applied to the orthogonality gradient, and `ortho_loss_grad_share`, the applied orthogonality
gradient's share of the decoder gradient's norm (what the inert-term guard reads: the term's
autograd gradient is not what this run applies).
"""

import torch

from plugins.adaptive_ortho import run_2_loop_fix as parent


def deconflict(g_ortho: torch.Tensor, g_rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove, row by row, the component of g_ortho that opposes g_rest; also the conflict mask."""
    dot = (g_ortho * g_rest).sum(1, keepdim=True)
    conflict = dot < 0
    g_ortho = g_ortho - conflict * dot / g_rest.pow(2).sum(1, keepdim=True).clamp_min(1e-12) * g_rest
    return g_ortho, conflict


class Trainer(parent.Trainer):
    def backward(self, out, step):
        """The orthogonality gradient de-conflicted and rescaled to α times the other terms'
        decoder gradient."""
        w = self.sae.W_dec
        (g_ortho,) = torch.autograd.grad(out.terms["ortho_loss"], w, retain_graph=True)
        sum(v for k, v in out.terms.items() if k != "ortho_loss").backward()
        g_ortho, conflict = deconflict(g_ortho, w.grad)
        scale = self.sae.ortho_weight(step) * w.grad.norm() / g_ortho.norm().clamp_min(1e-12)
        w.grad += scale * g_ortho
        out.stats.update(ortho_conflict_fraction=conflict.float().mean(), ortho_grad_scale=scale,
                         ortho_loss_grad_share=(scale * g_ortho).norm() / w.grad.norm().clamp_min(1e-12))
