"""`python experiment.py new STUDY/run_N_slug --parent PLUGIN`: a new plugin file to fill in.

The file trains as written (every hook is a commented stub, so the run is its parent's until a
stub is filled in); its docstring is the run's title and description in notes.md.
"""

from __future__ import annotations

from common import HarnessError  # first: its import guards

import re
from pathlib import Path

TEMPLATE = '''"""{title}

What this run changes, and why, as the study's notebook describes it. The first line is the
run's title in notes.md; this whole docstring is its entry's Description.
"""

from dataclasses import dataclass

import torch

from plugins.{parent_study} import {parent_stem} as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    """This run's own settings, set with `--set name=value`, beside its parent's."""

    # my_weight: float = 0.1


class SAE(parent.SAE):
    """Override only what this run changes; the rest is the parent's. x is (B, d_in), pre and f
    are (B, d_sae); self.hp holds the Hyperparams, self.run_cfg the run's config."""

    # def activation(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    #     """(B, d_sae) pre-activations (and the (B, d_in) input) -> (B, d_sae) latents"""
    #     return super().activation(pre, x)

    # def observe(self, fwd) -> None:
    #     """Training only, no gradients: update running statistics from fwd.f (B, d_sae)."""

    # def aux_losses(self, fwd) -> dict[str, torch.Tensor]:
    #     """Extra named scalar loss terms, each logged and added to the total; fwd has x, pre,
    #     f, x_hat and step."""
    #     return {{**super().aux_losses(fwd), "my_loss": self.hp.my_weight * fwd.f.pow(2).sum(-1).mean()}}


class Trainer(parent.Trainer):
    """The optimizer and what happens around each step; self.run_cfg is the run's config."""

    # def after_step(self, x: torch.Tensor, out, step: int) -> None:
    #     """After the update: resampling, revival. out.latents is (B, d_sae);
    #     self.reset_optimizer_state(self.sae.W_dec, rows) clears Adam's moments of those rows."""
    #     super().after_step(x, out, step)
'''


def write_plugin(plugins_dir: Path, name: str, parent) -> Path:
    """Write plugins/<study>/run_<n>_<slug>.py building on `parent` (an experiment.Plugin);
    refuses a malformed name, a file that exists, or a run number the study already has."""
    match = re.fullmatch(r"([a-z_][a-z0-9_]*)/(run_(\d+)_[a-z0-9_]+)", name)
    if not match:
        raise HarnessError(f"new {name}: name it STUDY/run_N_slug in lowercase letters, digits and _, "
                           "e.g. my_idea/run_1_first_try")
    study, stem, number = match.groups()
    path = plugins_dir / study / f"{stem}.py"
    if path.exists():
        raise HarnessError(f"{path} exists; pick another run number or slug (nothing was overwritten)")
    taken = [p.name for p in (plugins_dir / study).glob(f"run_{number}_*.py")]
    if taken:
        raise HarnessError(f"study {study} already has run {number} ({', '.join(taken)}); pick another number")
    title = stem.split("_", 2)[2].replace("_", " ").capitalize()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TEMPLATE.format(title=title, parent_study=parent.study, parent_stem=parent.name))
    return path
