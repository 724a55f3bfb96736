"""SAE research harness: train a plugin's sparse autoencoder on LLM activations, score it with
sae_bench, and write a run folder plus a lab-notebook entry.

    python experiment.py run --plugin run_7_adaptive_ln      # train, evaluate, log
    python experiment.py list                                # every plugin of every study

Read top to bottom:
    config        presets and RunConfig: everything that determines a run
    the SAE       its formula, and the extension points a plugin overrides
    training      the Trainer's step and hooks; the loop, its log and checkpoints
    activations   the harvest from the LLM and its on-disk cache
    plugins       plugins/<study>/run_<n>_<slug>.py, found and checked
    a run         execute: check, train, save, evaluate, judge, note; load_run reads one back
    the CLI       run, study, sweep, eval, compare, notes, analyse, dashboard, bench, list, new
Beside it, each in its own module: sources.py (models, text), runs.py (run folders), evals.py
(sae_bench), frontier.py (verdicts, guards), notebook.py (notes.md), studies.py (many runs),
kernels.py, plot.py, bench.py, dashboard.py, cluster.py, analyses.py.
"""

from __future__ import annotations

from common import (ROOT, HarnessError, Interrupted, OneLineUsage, activations_dir, cache_dir,  # first: its import guards
                    RemainingOrDone, console, one_line_errors)

import ast
import collections
import copy
import dataclasses
import difflib
import functools
import hashlib
import importlib
import json
import os
import re
import signal
import sys
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, NamedTuple

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sae_bench.custom_saes.base_sae import BaseSAE

import evals
import frontier
import kernels
from notebook import append_notes, changed_setting, check_notes, notes_entry, study_header
from runs import (CHECKPOINT, REPORT_LAG, NonFiniteLoss, StepLog, atomic_write, check_resumable, check_runs_root,
                  check_weights, check_writable, claimed, convergence, load_checkpoint, newest, parent_module,
                  plugin_source_sha256, provenance, read_json, read_json_lines, record_gradient_shares, run_index,
                  runs_root, save_checkpoint, save_trained, term_gradients)
from sources import cached_activations, eval_contexts_needed, harvest, larger_cache_prefix, load_model, load_tokens

# Run as a script, this file is `__main__`; plugins import `experiment`: make that the same module.
sys.modules.setdefault("experiment", sys.modules[__name__])
PLUGINS_DIR = ROOT / "plugins"
ANALYSES_FOLDER = "analyses"  # RUNS/<study>/analyses/<name>.md: the latest paragraph of each `analyse`

# ----------------------------------------------------------------------------------------------
# Config. A preset is a set of plain values; every CLI flag overrides one. The synthetic ones join below.

PRESETS: dict[str, dict[str, Any]] = {
    # Gemma 3 270M shipped on PyPI, text shipped with sae_probes: works with no hub at all.
    # Layer 6 of 18 sits in the middle third, where SAE features are usually studied, and a
    # 250k-token harvest plus training and core eval fits a 2-core CPU in a few minutes.
    "embedded": dict(
        model="gemma-3-270m", layer=6, dict_size=2048, tokens=250_000, context_size=128,
        batch_size=1024, lr=1e-3, sparsity_penalty=0.2, warmup_steps=25, dataset="embedded",
        llm_batch_size=8, eval_batch_prompts=4, eval_reconstruction_batches=8,
        eval_sparsity_batches=8, cache_dtype="float32",
    ),
    # A randomly initialised 2-layer TransformerLens model on synthetic tokens: seconds.
    "tiny": dict(
        model="tiny", layer=1, dict_size=256, tokens=8192, context_size=32, batch_size=256,
        lr=1e-3, sparsity_penalty=0.04, warmup_steps=4, dataset="synthetic", llm_batch_size=32,
        eval_batch_prompts=8, eval_reconstruction_batches=2, eval_sparsity_batches=2,
        cache_dtype="float32",
    ),
    "pythia-70m": dict(
        model="EleutherAI/pythia-70m-deduped", layer=3, dict_size=4096, tokens=10_000_000,
        context_size=128, batch_size=2048, lr=3e-4, sparsity_penalty=0.04, warmup_steps=1000,
        dataset="monology/pile-uncopyrighted", eval_dataset="Skylion007/openwebtext",
        llm_batch_size=32, eval_batch_prompts=16, eval_reconstruction_batches=200,
        eval_sparsity_batches=2000, cache_dtype="float16",
    ),
    # The seed notebooks' setting.
    "gemma-2-2b": dict(
        model="google/gemma-2-2b", layer=19, dict_size=2304, tokens=10_000_000, context_size=128,
        batch_size=2048, lr=3e-4, sparsity_penalty=0.04, warmup_steps=1000,
        dataset="monology/pile-uncopyrighted", eval_dataset="Skylion007/openwebtext",
        llm_batch_size=32, eval_batch_prompts=16, eval_reconstruction_batches=200,
        eval_sparsity_batches=2000, cache_dtype="float16",
    ),
}


NOTEBOOK_STEPS = 4882  # 10M tokens / batch 2048: the length of every seed-notebook run


@dataclass
class RunConfig:
    """Everything that determines a run. Saved as config.json; `run` rebuilds it from there."""

    plugin: str
    preset: str
    model: str
    layer: int
    dict_size: int
    tokens: int  # training activations (BOS positions excluded)
    context_size: int
    batch_size: int
    lr: float
    sparsity_penalty: float
    warmup_steps: int
    dataset: str
    llm_batch_size: int
    eval_batch_prompts: int
    eval_reconstruction_batches: int
    eval_sparsity_batches: int
    cache_dtype: str
    eval_dataset: str | None = None  # None: held-out text of `dataset`
    seed: int = 42
    evals: tuple[str, ...] = ("core",)
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    deterministic: bool = False  # CUDA: deterministic kernels (slower); CPU runs always use them
    compile: bool = False  # torch.compile the loss (the SAE's forward and loss terms)
    dtype: str = "fp32"  # the SAE step's forward: fp32, or bf16 under autocast (step_autocast)
    hyperparams: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    def scaled_steps(self, notebook_steps: int) -> int:
        """A schedule length given in the notebooks' steps (their runs had NOTEBOOK_STEPS),
        scaled so that it covers the same fraction of this run."""
        return max(1, round(notebook_steps * self.steps / NOTEBOOK_STEPS))


def build_config(preset: str, plugin: str, **overrides: Any) -> RunConfig:
    if preset not in PRESETS:
        raise HarnessError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = RunConfig(plugin=plugin, preset=preset, **values)
    for name in ("lr", "dict_size", "tokens", "batch_size", "context_size", "llm_batch_size", "checkpoint_every"):
        if getattr(cfg, name) <= 0:
            raise HarnessError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.sparsity_penalty < 0 or cfg.warmup_steps < 0 or cfg.layer < 0:
        raise HarnessError("--sparsity-penalty, warm-up steps and --layer must be non-negative")
    if cfg.steps == 0:
        raise HarnessError(f"--tokens {cfg.tokens} with --batch-size {cfg.batch_size} gives zero training steps; "
                           "raise --tokens or lower --batch-size")
    cfg.evals = evals.parse_evals(",".join(cfg.evals))
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise HarnessError(f"unknown device '{cfg.device}'; use auto, cpu or cuda")
    for text in (cfg.dataset, cfg.eval_dataset):
        if text and Path(text).suffix in (".txt", ".jsonl", ".parquet") and not Path(text).is_file():
            raise HarnessError(f"--dataset {text}: no such file; give an existing .txt/.jsonl/.parquet file")
    return cfg


# ----------------------------------------------------------------------------------------------
# The SAE: its formula, and the extension points plugins override.

@dataclass
class Hyperparams:
    """Every plugin's hyperparameters extend these (`--set name=value`); lr and λ are the run's."""

    b_dec_init: str = "geometric_median"  # b_dec from the first batch (SAE.init_from_data); "zeros": the notebooks'


@dataclass
class Forward:
    """One training batch through the SAE: what the loss hooks see."""

    x: torch.Tensor  # (B, d_in) input, in the training scale
    pre: torch.Tensor | None  # (B, d_sae) pre-activations; None only on the sparse path, where no hook reads them
    f: torch.Tensor  # (B, d_sae) latents
    x_hat: torch.Tensor  # (B, d_in) reconstruction
    step: int
    stats: dict[str, Any] = field(default_factory=dict)  # diagnostics a hook wants logged, not optimised


class LossOutput(NamedTuple):
    terms: dict[str, torch.Tensor]  # each is logged; their sum is optimised
    latents: torch.Tensor  # feature activations f, for L0 and dead-latent tracking
    stats: dict[str, torch.Tensor] = {}  # extra per-step diagnostics, logged but not optimised


# The formula's pieces; where a plugin keeps them all, training may take kernels.py's sparse step.
FORMULA = ("encoder_input", "pre_activation", "activation", "decoder_weight", "decode", "reconstruct", "encode",
           "training_batch", "observe", "sparsity_coefficient", "sparsity_loss", "aux_losses", "loss")


class SAE(BaseSAE):
    """Standard ReLU SAE with an L1 penalty and unit-norm decoder rows (one per latent):

        pre = (x − b_dec) W_enc + b_enc          encoder_input(x) = x − b_dec; pre_activation(x)
        f   = ReLU(pre)                          activation(pre, x)
        x̂   = f W_dec + b_dec                    decode(f), with decoder_weight() = W_dec
        loss = ‖x − x̂‖² + λ ‖f‖₁ + Σ aux_losses  per token, averaged over the batch; λ = sparsity_coefficient

    A plugin overrides the pieces it changes; `loss` computes the reconstruction once and asks the
    plugin only for its extra named terms (`aux_losses`)."""

    def __init__(self, d_in: int, d_sae: int, hp: Hyperparams, cfg: RunConfig,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
        super().__init__(d_in, d_sae, cfg.model, cfg.layer, device, dtype)
        self.hp, self.run_cfg = hp, cfg
        # Non-zero init: random unit decoder rows, encoder tied to the decoder's transpose.
        w_dec = torch.randn(d_sae, d_in, device=device, dtype=dtype)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec.data.copy_(w_dec)
        self.W_enc.data.copy_(w_dec.T)

    sparse_backward = False  # set by the Trainer before each step from the measured latent density
    sparsity_knob = "sparsity_penalty"  # the setting a baseline's sweep varies to move L0 (frontier.py)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Before the first step, from the first batch x (B, d_in): b_dec at its geometric median, as
        Gao et al.'s, dictionary_learning's and Anthropic's trainers start (no latent rebuilds the mean)."""
        if self.hp.b_dec_init == "geometric_median":
            self.b_dec.copy_(geometric_median(x.float()).to(self.b_dec.dtype))

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d_in) -> (B, d_in): what the encoder matrix sees."""
        return x - self.b_dec

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d_in) -> (B, d_sae)"""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, d_sae) pre-activations (and the input) -> (B, d_sae) latents"""
        return torch.relu(pre)

    def decoder_weight(self) -> torch.Tensor:
        """(d_sae, d_in): the dictionary the decoder uses."""
        return self.W_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d_in) -> (B, d_sae)"""
        return self.activation(self.pre_activation(x), x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """(B, d_sae) -> (B, d_in)"""
        return f @ self.decoder_weight() + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def reconstruct(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The reconstruction the training loss sees: decode(f)."""
        return self.decode(f)

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        x, batch_stats = self.training_batch(x, step) if self.training else (x, {})
        fwd = self.training_pass(x, step)
        if self.training:
            with torch.no_grad():
                self.observe(fwd)
        terms = {"l2_loss": (x - fwd.x_hat).pow(2).sum(-1).mean(), "sparsity_loss": self.sparsity_loss(fwd)}
        if terms["sparsity_loss"] is None:  # an architecture without a sparsity penalty (TopK) logs no such term
            del terms["sparsity_loss"]
        return LossOutput({**terms, **self.aux_losses(fwd)}, fwd.f, {**fwd.stats, **batch_stats})

    def training_batch(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Training only: the batch the loss trains on, input and target (importance sampling),
        and diagnostics to log."""
        return x, {}

    def sparsity_coefficient(self, fwd: Forward) -> float | torch.Tensor:
        """λ, the L1 coefficient at this step."""
        return self.run_cfg.sparsity_penalty

    def sparsity_loss(self, fwd: Forward) -> torch.Tensor | None:
        """λ‖f‖₁ per token; None where the architecture has no sparsity penalty."""
        return self.sparsity_coefficient(fwd) * fwd.f.abs().sum(-1).mean()

    def observe(self, fwd: Forward) -> None:
        """Training only, before the loss terms, without gradients: update running statistics."""

    def aux_losses(self, fwd: Forward) -> dict[str, torch.Tensor]:
        """Extra named loss terms, each logged and added to the total."""
        return {}

    def latent_slices(self) -> list[tuple[torch.nn.Parameter, int]]:
        """Parameters holding one slice per latent, with the dimension that indexes latents: what
        a revived latent re-initialises and Trainer.reset_optimizer_state clears."""
        return [(self.W_enc, 1), (self.W_dec, 0), (self.b_enc, 0)]

    def final_info(self) -> dict[str, Any]:
        """Extra results a plugin measures (small: scalars, short lists), merged into
        final_info.json and the notebook entry."""
        return {}

    def artifacts(self) -> dict[str, torch.Tensor]:
        """Per-latent arrays for figures (frequencies...), saved to artifacts.safetensors."""
        return {}

    @torch.no_grad()
    def scaled_weights(self, scale: float) -> dict[str, torch.Tensor]:
        """W_enc, b_enc, W_dec, b_dec for inputs in the model's scale (training saw x · scale); W_dec
        is decoder_weight(), the dictionary decode uses, which every weight reader gets from here."""
        return dict(W_enc=self.W_enc.float().cpu() * scale, b_enc=self.b_enc.float().cpu(),
                    W_dec=self.decoder_weight().float().cpu() / scale, b_dec=self.b_dec.float().cpu() / scale)

    def training_pass(self, x: torch.Tensor, step: int) -> Forward:
        """The formula's numbers for the loss, computed by kernels.py wherever the plugin kept the
        formula's pieces: the one place the fast path is chosen. On the sparse step the encoder's
        backward and the decoder read the active latents only; hooks still get pre and f, with
        their exact gradients."""
        if self.sparse_backward and self.training and self.takes_sparse_step():
            pre = kernels.SparseBackwardPre.apply(x, self.W_enc, self.b_enc, self.b_dec)
            f = self.activation(pre, x)
            return Forward(x, pre, f, kernels.decode(f, self.W_dec, sparse=True) + self.b_dec, step)
        if self.keeps("encoder_input", "pre_activation"):
            pre = kernels.pre_activation(x, self.W_enc, self.b_enc, self.b_dec)
        else:
            pre = self.pre_activation(x)
        f = self.activation(pre, x)
        return Forward(x, pre, f, self.reconstruct(x, f), step)

    def takes_sparse_step(self) -> bool:
        """Whether kernels.py's sparse step computes this SAE's training pass exactly and fast: its
        encoder and decoder are the formula's, its activation keeps some positive pre-activations
        as they are and zeroes the rest (ReLU, TopK), and its hooks' gradients reach pre at the
        active latents and few others. The plain formula here; an architecture that is such an
        SAE says so for its own pieces."""
        return self.keeps(*FORMULA)

    def keeps(self, *names: str, since: type | None = None) -> bool:
        """Whether this SAE uses the methods of these names of `since` (default: this base class):
        a run building on an architecture that changes one of them is no longer that architecture."""
        return keeps_methods(type(self), names, since or SAE)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.data.div_(torch.linalg.vector_norm(self.W_dec.data, dim=1, keepdim=True).clamp_min_(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each unit decoder row, so the step moves
        along the sphere (as dictionary_learning's ConstrainedAdam does, per row, dim 1): two passes."""
        if self.W_dec.grad is not None:
            parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec.data, dim=1)
            self.W_dec.grad.addcmul_(parallel.unsqueeze(1), self.W_dec.data, value=-1)


# ----------------------------------------------------------------------------------------------
# Training: the Trainer's step and hooks; the loop over the cached activations, its log and checkpoints.


class Trainer:
    """Adam with linear LR warm-up; keeps decoder rows at unit norm. One step is

        out = sae.loss(x, step);  backward(out, step);  apply_update(step);  after_step(x, out, step)

    and plugins override the hooks, not the step: make_optimizer / make_scheduler, backward
    (gradient surgery), apply_update (clipping, projections, accumulation), after_step (the SAE's
    running state, resampling, revival). A hook may add diagnostics to out.stats."""

    OWN = ("sae", "run_cfg", "optimizer", "scheduler", "loss_fn")  # the rest of a Trainer is plugin state, checkpointed
    max_grad_norm: float | None = 1.0  # the gradient's norm is clipped to this, as SAELens's trainer does

    def __init__(self, sae: SAE, cfg: RunConfig):
        self.sae, self.run_cfg = sae, cfg
        self.sparse = False  # take kernels.py's sparse step (few latents fire); checkpointed
        self.loss_fn = sae.loss
        if torch.distributed.is_initialized():
            self.loss_fn = torch.nn.parallel.DistributedDataParallel(_LossModule(sae), find_unused_parameters=True)
        if cfg.compile:
            self.loss_fn = torch.compile(self.loss_fn)
        self.optimizer = self.make_optimizer()
        self.scheduler = self.make_scheduler()

    def make_optimizer(self) -> torch.optim.Optimizer:  # fused: one pass per parameter, not one per term (CPU too)
        return torch.optim.Adam(self.sae.parameters(), lr=self.run_cfg.lr, fused=True)

    def make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = max(self.run_cfg.warmup_steps, 1)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))

    def step(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, LossOutput]:
        self.sae.sparse_backward = self.sparse and x.device.type in kernels.SPARSE_DEVICES
        with kernels.step_autocast(self.run_cfg.dtype, x.device):
            out = self.loss_fn(x, step)
        if self.sae.takes_sparse_step():  # the switch point is measured once per machine and shape
            self.sparse = kernels.use_sparse_step(out.latents, self.sae.cfg.d_in, step, self.sparse, cache_dir())
        self.optimizer.zero_grad(set_to_none=True)
        own = term_gradients(out, self.sae, step, self.run_cfg)  # the inert-term guard's measure
        self.backward(out, step)
        record_gradient_shares(own, out.stats)
        self.apply_update(step)
        self.after_step(x, out, step)
        return sum(out.terms.values()).detach(), out

    def backward(self, out: LossOutput, step: int) -> None:
        """Gradients of the total loss into each parameter's .grad (zeroed before)."""
        sum(out.terms.values()).backward()

    def apply_update(self, step: int) -> None:
        """Gradients to parameters: along each decoder row's sphere, clipped, update_scales' steps scaled."""
        self.sae.remove_parallel_decoder_grad()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.max_grad_norm)
        scaled = self.update_scales()
        before = [p.detach().clone() for p, _, _ in scaled]
        self.optimizer.step()
        with torch.no_grad():
            for (p, scale, dim), old in zip(scaled, before):
                p.copy_(old + scale.view([-1 if d == dim else 1 for d in range(p.dim())]) * (p - old))
        self.scheduler.step()
        self.sae.normalize_decoder()

    def update_scales(self) -> list[tuple[torch.nn.Parameter, torch.Tensor, int]]:
        """[(parameter, multipliers, dim)]: learning rates of its own for each slice along dim, e.g.
        per latent (Adam ignores a gradient's scale, so the rate scales the step itself)."""
        return []

    def after_step(self, x: torch.Tensor, out: LossOutput, step: int) -> None:
        """After the update, the one post-step hook: the SAE's running state (dead counters,
        schedules), resampling, revival."""

    @torch.no_grad()
    def reset_optimizer_state(self, latents: torch.Tensor) -> None:
        """Zero the optimizer's per-element state (Adam's moments) of these latents' slices
        (sae.latent_slices), so that re-initialised latents do not start from stale moments."""
        for param, dim in self.sae.latent_slices():
            for buffer in self.optimizer.state.get(param, {}).values():
                if torch.is_tensor(buffer) and buffer.shape == param.shape:
                    buffer.index_fill_(dim, latents, 0.0)


class _LossModule(torch.nn.Module):
    """DistributedDataParallel wraps a module's forward; this one's forward is the SAE's loss."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, step: int) -> LossOutput:
        return self.sae.loss(x, step)


def train(sae: SAE, trainer: Trainer, data: ActivationData, cfg: RunConfig, run_dir: Path, progress,
          device: torch.device, *, source_sha256: str, started: float | None = None, resume: bool = False,
          rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Run cfg.steps optimizer steps over a seeded permutation of the cached activations,
    logging every cfg.log_every steps to train_log.jsonl and checkpointing every
    cfg.checkpoint_every steps, at the last step (an interrupted evaluation resumes there) and on
    Ctrl-C, each with the plugin's code hash and the wall time since `started` (a perf_counter).
    Under torchrun each rank takes its shard of every batch and only rank 0 writes. Returns the
    final loss terms."""
    leader, shard = rank == 0, cfg.batch_size // world
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed))
    fired_at = torch.full((cfg.dict_size,), -1, dtype=torch.long, device=device)
    start, final = 0, {}
    if resume:
        start, fired_at, final = load_checkpoint(run_dir, sae, trainer)
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        with StepLog(run_dir / "train_log.jsonl", cfg, progress, start, final, leader) as log:
            for step, x in prefetched_batches(data, order, cfg, range(start, cfg.steps), rank, shard, device, sae.dtype):
                if step == 0:  # from the whole first batch, on every rank alike
                    sae.init_from_data(kernels.all_rows(x) if world > 1 else x)
                total, out = trainer.step(x, step)
                fired_at.masked_fill_((out.latents.detach() > 0).any(dim=0), step)
                log.queue(step, total, out, fired_at, trainer.scheduler.get_last_lr()[0])
                log.read_back(step + 1 - REPORT_LAG.get(device.type, 0))
                progress.update(log.task, advance=1)
                if interrupted or (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                    log.read_back(step + 1)  # every rank: never checkpoint a step not known to be finite
                    if leader:
                        spent = None if started is None else time.perf_counter() - started
                        save_checkpoint(run_dir, step, sae, trainer, fired_at, log.final, source_sha256, spent)
                if interrupted:
                    raise Interrupted(f"interrupted after step {step}, checkpoint saved")
            log.read_back(cfg.steps)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    return log.final


@functools.cache  # asked every training step; a class's methods do not change
def keeps_methods(cls: type, names: tuple[str, ...], since: type) -> bool:
    return all(getattr(cls, name) is getattr(since, name) for name in names)


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """(N, d) -> (d,): the point of least summed distance to the points, by Weiszfeld's iterations
    from the mean (dictionary_learning's `geometric_median`)."""
    guess = points.mean(dim=0)
    for _ in range(max_iter):
        weights = 1 / (points - guess).norm(dim=1).clamp_min(1e-12)
        previous, guess = guess, (weights[:, None] * points).sum(0) / weights.sum()
        if (guess - previous).norm() < tol:
            break
    return guess


def prefetched_batches(data: ActivationData, order: torch.Tensor, cfg: RunConfig, steps: range, rank: int,
                       shard: int, device: torch.device, dtype: torch.dtype):
    """(step, x) for each step: this rank's shard of the step's rows of the permutation, read from
    the cache and scaled by a background thread two steps ahead, so the step never waits for data."""
    from concurrent.futures import ThreadPoolExecutor

    def read(step: int) -> torch.Tensor:
        first = step * cfg.batch_size + rank * shard
        rows = np.sort(order[first:first + shard].numpy())
        x = torch.from_numpy(np.asarray(data.train[rows], dtype=np.float32)).mul_(data.scale)
        return x.pin_memory() if device.type == "cuda" else x

    with ThreadPoolExecutor(1) as reader:
        ahead = collections.deque(reader.submit(read, step) for step in steps[:2])
        for step in steps:
            x = ahead.popleft().result()
            if step + 2 < steps.stop:
                ahead.append(reader.submit(read, step + 2))
            yield step, x.to(device, dtype, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Activations: residual-stream activations at the hooked layer, BOS positions dropped,
# stored as a .npy file with a manifest (shape, dtype, size, sha256) and keyed by everything
# that determines them, so a second run on the same data never runs the LLM again.
import synthetic  # noqa: E402 (here: the SAE and Trainer come first) SAELens's synthetic models, no LLM
PRESETS.update(synthetic.PRESETS)  # synth, synth-16k, synth-tiny: their activations are cached alike
# The verdict budget of `study`, `sweep` and `analyse`: where the baselines' order settles (notes.md).
PRESETS["embedded-4m"] = {**PRESETS["embedded"], "tokens": 4_000_000}


@dataclass
class ActivationData:
    train: np.ndarray  # (tokens, d_model), memory-mapped
    eval_tokens: torch.Tensor  # (n_eval, context_size) held-out contexts for sae_bench
    scale: float  # multiply activations by this so that E||x|| = sqrt(d_model)
    from_cache: bool
    prefix_of: Path | None = None  # the larger cache whose first rows these are (sources.larger_cache_prefix)


def cache_key(cfg: RunConfig) -> str:
    determining = dict(model=cfg.model, layer=cfg.layer, context_size=cfg.context_size,
                       dataset=cfg.dataset, eval_dataset=cfg.eval_dataset, tokens=cfg.tokens,
                       n_eval=eval_contexts_needed(cfg), dtype=cfg.cache_dtype, version=2, **synthetic.cache_fields(cfg))
    return hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()[:16]


def cache_key_at(cfg: RunConfig) -> Callable[[int], str]:
    """The cache key of cfg's activations at another number of tokens."""
    return lambda tokens: cache_key(dataclasses.replace(cfg, tokens=tokens))


def activation_data(cfg: RunConfig, model, progress, dataset_loader=None) -> ActivationData:
    folder = activations_dir() / cache_key(cfg)
    if synthetic.is_synthetic(cfg):
        return ActivationData(*synthetic.activation_data(cfg, model, progress, folder))
    if not (folder / "manifest.json").exists() and cfg.dataset != "synthetic":  # tiny's Zipf text: held-out last
        if prefix := larger_cache_prefix(activations_dir(), cfg.tokens, cache_key_at(cfg)):
            train, eval_tokens, scale, larger = prefix
            return ActivationData(train, eval_tokens, scale, True, prefix_of=larger)
    tokens_path = folder / "eval_tokens.pt"

    def harvested(out: np.ndarray) -> None:  # the eval tokens are saved before the manifest that vouches for both
        train_contexts, eval_tokens = load_tokens(cfg, model, dataset_loader)
        harvest(model, train_contexts, cfg, out, progress)
        torch.save(eval_tokens, tokens_path)

    train, scale, from_cache = cached_activations(
        folder, (cfg.tokens, model.cfg.d_model if model else 0), cfg.cache_dtype, harvested,  # no model: reading
        "activations (the LLM is not run for training data)", key=cache_key(cfg),
        config=dict(model=cfg.model, layer=cfg.layer, dataset=cfg.dataset))
    return ActivationData(train, torch.load(tokens_path), scale, from_cache)


# ----------------------------------------------------------------------------------------------
# Plugins: plugins/<study>/run_<n>_<slug>.py, each defining what its run changes (see
# plugins/__init__.py), usually building on the run it imports as `parent`.

@dataclass
class Plugin:
    name: str  # file stem, e.g. run_7_adaptive_ln
    study: str
    run_number: int
    path: Path
    module: Any

    # What the run file defines (plugins/__init__.py fills in what it leaves out), and its docstring.
    sae_class = property(lambda self: self.module.SAE)
    trainer_class = property(lambda self: self.module.Trainer)
    hyperparams_class = property(lambda self: self.module.Hyperparams)
    title = property(lambda self: (self.module.__doc__ or self.name).strip().splitlines()[0])
    description = property(lambda self: (self.module.__doc__ or "").strip())

    @property
    def parent(self) -> str | None:
        """The run this one builds on: the plugin module it imports as `parent`."""
        parent = parent_module(self.module)
        return parent.__name__.rsplit(".", 1)[-1] if parent else None

    def identity(self) -> dict[str, Any]:
        """What a reader of the run folder needs to know of the plugin (final_info.json's `run`)."""
        return dict(study=self.study, plugin=self.name, number=self.run_number, title=self.title, parent=self.parent)

    @property
    def study_header(self) -> str:
        """The study's heading in the notebook: TITLE and DESCRIPTION from plugins/<study>/__init__.py,
        else the folder's name and its first run's docstring."""
        package = importlib.import_module(f"plugins.{self.study}")
        first = min((p for key, p in plugin_files().items() if key.startswith(f"{self.study}/")), key=run_number)
        title = getattr(package, "TITLE", self.study)
        description = getattr(package, "DESCRIPTION", None) or ast.get_docstring(ast.parse(first.read_text())) or ""
        return study_header(title, description)

    def source_hash(self) -> str:
        """sha256 over the code of this plugin's file and every plugin file it builds on, as this process
        imported them (not an edit since): syntax trees without docstrings, so editing prose reuses runs."""
        return plugin_source_sha256(self.module)


def run_number(path: Path) -> int:
    """run_<n>_<slug>.py -> n."""
    return int(re.match(r"run_(\d+)", path.stem).group(1))


def plugin_files() -> dict[str, Path]:
    """'study/run_n_slug' -> path, for every plugin file."""
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(PLUGINS_DIR.glob("*/run_*.py"))}


def find_plugin(name: str) -> Plugin:
    files = plugin_files()
    matches = [key for key in files if key == name or key.split("/")[1] == name]
    if len(matches) > 1:
        raise HarnessError(f"plugin name '{name}' is ambiguous: {', '.join(matches)}; pass study/name")
    if not matches:
        close = difflib.get_close_matches(name, [k.split("/")[1] for k in files] + list(files), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `python experiment.py list`"
        raise HarnessError(f"unknown plugin '{name}'{hint}")
    key = matches[0]
    study, stem = key.split("/")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        module = importlib.import_module(f"plugins.{study}.{stem}")
    except SyntaxError as exc:
        raise HarnessError(f"plugin {files[key]} has a syntax error at {exc.filename}:{exc.lineno}: {exc.msg}") from exc
    except Exception as exc:
        last = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{last.filename}:{last.lineno}"
        raise HarnessError(f"plugin {files[key]} failed to import at {where}: {type(exc).__name__}: {exc}") from exc
    plugin = Plugin(stem, study, run_number(files[key]), files[key], module)
    if not issubclass(plugin.sae_class, SAE):
        raise HarnessError(f"plugin {files[key]}: SAE must subclass experiment.SAE")
    plugin.source_hash()  # its code and its parents', read now, as imported
    return plugin


def parse_hyperparams(plugin: Plugin, assignments: list[str]) -> Any:
    """Build the plugin's hyperparameter dataclass from `--set key=value` strings, typed."""
    cls = plugin.hyperparams_class
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise HarnessError(f"--set '{item}' must look like key=value")
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise HarnessError(f"--set {key}: plugin {plugin.name} has no hyperparameter '{key}' (it has: {known})")
        kind = hints[key]
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                values[key] = raw.lower() in ("true", "1")
            elif kind in (int, float, str):
                values[key] = kind(raw)
            else:
                values[key] = type(fields[key].default)(json.loads(raw))
        except (ValueError, TypeError, json.JSONDecodeError):
            raise HarnessError(f"--set {key}={raw}: expected {getattr(kind, '__name__', kind)}") from None
    return cls(**values)


# ----------------------------------------------------------------------------------------------
# A run: check everything, train, save, evaluate, and mark the run folder; provenance and notes.md.

def execute(cfg: RunConfig, plugin: Plugin, run_dir: Path, notes: Path, resume: bool = False,
            model_loader=None, dataset_loader=None, eval_loaders=None, loaded_models: dict | None = None) -> dict:
    """Train and evaluate one run (or continue one from its checkpoint); returns final_info.
    Raises HarnessError on bad input, Interrupted on Ctrl-C (after checkpointing).
    model_loader(name, device=, dtype=) and dataset_loader(name) replace the hub (for tests);
    loaded_models (checked_model) lets the runs of one process share their model."""
    started = time.perf_counter()
    hp, device = checked_inputs(cfg, plugin, eval_loaders)
    rank, world = kernels.init_distributed(device)
    if cfg.batch_size % world:
        raise HarnessError(f"--batch-size {cfg.batch_size} does not split evenly over {world} processes")
    kernels.configure_kernels(cfg, device)
    kernels.take_thread_share()
    if rank == 0 and resume:
        started -= check_resumable(run_dir, plugin.source_hash())  # its wall time counts the time before
    elif rank == 0:
        check_writable(run_dir)
    model = checked_model(cfg, device, model_loader, loaded_models)
    sae, data, info = train_run(cfg, plugin, hp, model, run_dir, device, resume, rank, world, dataset_loader, started)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return info
    save_trained(info, sae, data.scale, run_dir)  # before evaluating: a failing eval must not cost the training
    try:
        evals.evaluate(info, evals.ScaledSAE(sae.eval(), data.scale), model, data.eval_tokens, cfg, device, run_dir,
                       eval_loaders)
    except Exception as exc:
        mark_failed(info, run_dir, cfg, plugin, device, started, failed_at="evaluation",
                    error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise HarnessError(f"evaluation failed after training ({type(exc).__name__}: {exc}); the trained SAE is "
                           f"saved: fix the cause, then `python experiment.py eval {run_dir} --evals "
                           f"{','.join(cfg.evals)}` (traceback in its final_info.json)") from None
    finish(info, run_dir, plugin, notes, cfg, device, time.perf_counter() - started)
    return info


def checked_inputs(cfg: RunConfig, plugin: Plugin, eval_loaders=None) -> tuple[Any, torch.device]:
    """The plugin's hyperparameters and the device, once everything checkable without work is checked."""
    try:
        hp = plugin.hyperparams_class(**cfg.hyperparams)
    except TypeError as exc:
        raise HarnessError(f"plugin {plugin.name}: bad hyperparameters {cfg.hyperparams}: {exc}") from None
    if hp.b_dec_init not in ("geometric_median", "zeros"):
        raise HarnessError(f"--set b_dec_init={hp.b_dec_init}: b_dec_init must be geometric_median or zeros")
    cfg.hyperparams = dataclasses.asdict(hp)
    device = kernels.resolve_device(cfg.device)
    evals.check_requirements(cfg.evals, cfg, loaders=eval_loaders)
    return hp, device


@torch.no_grad()
def check_contract(sae: SAE, x: torch.Tensor) -> None:
    """A plugin must map (B, d_in) -> latents (B, d_sae) -> reconstruction (B, d_in) and return
    scalar loss terms; checked on a few real activations before training starts."""
    d_sae, name = sae.cfg.d_sae, type(sae).__module__
    f = sae.encode(x)
    if f.shape != (len(x), d_sae):
        raise HarnessError(f"plugin {name}: encode returned shape {tuple(f.shape)}, expected {(len(x), d_sae)}")
    x_hat = sae.decode(f)
    if x_hat.shape != x.shape:
        raise HarnessError(f"plugin {name}: decode returned shape {tuple(x_hat.shape)}, expected {tuple(x.shape)}")
    with torch.enable_grad(), torch.random.fork_rng(devices=[]):
        out = copy.deepcopy(sae).loss(x, 0)  # a copy: loss may update plugin statistics
    bad = [k for k, v in out.terms.items() if v.dim() != 0]
    if bad or not out.terms:
        raise HarnessError(f"plugin {name}: loss must return scalar terms; {bad or 'none'} are not")


def checked_model(cfg: RunConfig, device: torch.device, model_loader=None, loaded: dict | None = None):
    """The run's model, checked against its layer and context size; `loaded` keeps the models this
    process has loaded, by name and device, for the next run that shares one (study, sweep)."""
    if synthetic.is_synthetic(cfg):  # SAELens's synthetic model: no LLM
        return synthetic.load_model(cfg.model, device)
    key = (cfg.model, str(device))
    model = loaded[key] if loaded and key in loaded else load_model(cfg.model, device, model_loader)
    if loaded is not None:
        loaded[key] = model
    if not 0 <= cfg.layer < model.cfg.n_layers:
        raise HarnessError(f"--layer {cfg.layer} is outside {cfg.model} (layers 0..{model.cfg.n_layers - 1})")
    if cfg.context_size > model.cfg.n_ctx:
        raise HarnessError(f"context size {cfg.context_size} exceeds {cfg.model}'s {model.cfg.n_ctx}")
    return model


def train_run(cfg: RunConfig, plugin: Plugin, hp, model, run_dir: Path, device: torch.device, resume: bool,
              rank: int, world: int, dataset_loader, started: float) -> tuple[SAE, ActivationData, dict]:
    """Activations, the plugin's SAE checked on them, the run folder, training: (sae, data, info)."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), RemainingOrDone(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        if rank == 0:  # the other ranks wait, then read what rank 0 cached
            data = activation_data(cfg, model, progress, dataset_loader)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            data = activation_data(cfg, model, progress, dataset_loader)
        torch.manual_seed(cfg.seed)
        sae = plugin.sae_class(model.cfg.d_model, cfg.dict_size, hp, cfg, device=device)
        check_contract(sae, torch.from_numpy(np.array(data.train[:8], dtype=np.float32)).to(device) * data.scale)
        trainer = plugin.trainer_class(sae, cfg)
        if not resume and rank == 0:  # only now, with every input checked, does the run folder appear
            run_dir.mkdir(parents=True)
            atomic_write(run_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
            torch.save(data.eval_tokens, run_dir / "eval_tokens.pt")  # `eval RUN_DIR` re-scores on these
        info: dict[str, Any] = dict(run=plugin.identity(), training_steps=0, final_loss=None, layer=cfg.layer,
                                    dict_size=cfg.dict_size, learning_rate=cfg.lr,
                                    sparsity_penalty=cfg.sparsity_penalty)
        try:
            final_terms = train(sae, trainer, data, cfg, run_dir, progress, device, source_sha256=plugin.source_hash(),
                                started=started, resume=resume, rank=rank, world=world)
        except NonFiniteLoss as exc:
            if rank == 0:
                mark_failed(info, run_dir, cfg, plugin, device, started, error=f"non-finite loss: {exc}")
            raise HarnessError(f"training stopped: {exc}"
                               + (f"; run marked failed in {run_dir}/final_info.json" if rank == 0 else "")) from None
    info.update(training_steps=cfg.steps, final_loss=final_terms["total_loss"], final_loss_terms=final_terms,
                activation_scale=data.scale, activation_cache=cache_key(cfg), activations_from_cache=data.from_cache,
                **({"activations_prefix_of": data.prefix_of.name} if data.prefix_of else {}))
    return sae, data, info


def mark_failed(info: dict, run_dir: Path, cfg: RunConfig, plugin: Plugin, device: torch.device, started: float,
                **why: str) -> None:
    """final_info.json of a run that stopped: status failed, why, provenance, and no metrics it lacks."""
    info.update(status="failed", **why, provenance=run_provenance(cfg, plugin, device, time.perf_counter() - started))
    atomic_write(run_dir / "final_info.json", json.dumps(info, indent=2, default=str))


def finish(info: dict, run_dir: Path, plugin: Plugin, notes: Path, cfg: RunConfig, device: torch.device,
           wall_time: float) -> None:
    """Mark an evaluated run completed: warnings, provenance, final_info.json, notebook entry."""
    for key in ("failed_at", "error", "traceback"):
        info.pop(key, None)
    index = run_index(runs_root(run_dir, plugin.name))  # the sibling runs, read once
    info["provenance"] = run_provenance(cfg, plugin, device, wall_time)  # its config: which parent runs compare
    parent = find_plugin(plugin.parent) if plugin.parent else None
    at_setting = parent and frontier.parent_hyperparams(
        cfg.hyperparams, dataclasses.asdict(plugin.hyperparams_class()), dataclasses.asdict(parent.hyperparams_class()))
    info["warnings"] = frontier.suspicious(info, run_dir, plugin.parent, index, parent and parent.source_hash(), at_setting,
                                           PRESETS)  # a budget short of its verdict preset's is warned
    info["status"] = "completed"
    info["convergence"] = convergence(read_json_lines(run_dir / "train_log.jsonl"))
    info["verdict"] = judged(info, index, plugin, run_dir)
    atomic_write(run_dir / "final_info.json", json.dumps(info, indent=2, default=str))
    entry = notes_entry(plugin, run_dir, info, parent_info(index, plugin, info), setting(plugin, info))
    append_notes(notes, plugin.study_header, entry)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the completed run supersedes it


def judged(info: dict, index: list, plugin: Plugin, run_dir: Path) -> dict[str, Any]:
    """The run's verdicts against each baseline swept on its activations (frontier.verdicts)."""
    knob_of = lambda name: find_plugin(f"baseline/{name}").sae_class.sparsity_knob  # noqa: E731
    defaults_of = lambda name: dataclasses.asdict(find_plugin(f"baseline/{name}").hyperparams_class())  # noqa: E731
    return frontier.verdicts(info, index, plugin.name, knob_of, run_dir, evals.score_of, defaults_of)


def parent_info(index: list, plugin: Plugin, info: dict) -> dict | None:
    """final_info of the parent plugin's newest completed run on the same activations."""
    return newest(index, plugin.parent, same_data_as=info) if plugin.parent else None


def run_provenance(cfg: RunConfig, plugin: Plugin, device: torch.device, wall_time: float) -> dict:
    return provenance(dataclasses.asdict(cfg), f"{plugin.study}/{plugin.name}", plugin.source_hash(), device,
                      wall_time)


def setting(plugin: Plugin, info: dict) -> str:
    """What the run set away from its preset and the plugin's defaults (notebook.changed_setting)."""
    config = info.get("provenance", {}).get("config", {})
    return changed_setting(config, PRESETS.get(config.get("preset"), {}), dataclasses.asdict(plugin.hyperparams_class()))


def saved_config(run_dir: Path, flag: str) -> tuple[RunConfig, Plugin]:
    """The config and plugin a run folder was made with; for --resume, only where it has a checkpoint."""
    values = read_json(run_dir / "config.json")
    if not values:
        raise HarnessError(f"{flag} {run_dir} is not a run folder (no config.json)")
    if flag == "--resume" and not (run_dir / CHECKPOINT).exists():
        raise HarnessError(f"--resume {run_dir} has no {CHECKPOINT} to continue from; start a new run")
    cfg = RunConfig(**{**values, "evals": tuple(values["evals"])})
    return cfg, find_plugin(cfg.plugin)


def saved_sae(run_dir: Path, cfg: RunConfig, plugin: Plugin, device: torch.device) -> evals.ScaledSAE:
    """A finished run's SAE, exactly as it was evaluated."""
    from safetensors.torch import load_file

    check_weights(run_dir)
    state = load_file(run_dir / "plugin_state.safetensors", device=str(device))
    scale = state.pop("activation_scale").item()
    sae = plugin.sae_class(state["W_dec"].shape[1], cfg.dict_size, plugin.hyperparams_class(**cfg.hyperparams),
                           cfg, device=device)
    sae.load_state_dict(state)
    return evals.ScaledSAE(sae.eval(), scale)


@dataclass
class LoadedRun:
    """A finished run, for one's own analysis (`load_run`)."""

    folder: Path
    config: RunConfig
    plugin: Plugin
    sae: evals.ScaledSAE  # the SAE as evaluated, on the model's raw activations: sae(x), encode, decode; (..., d_in)
    info: dict  # final_info.json: metrics, verdicts, warnings, provenance


def load_run(folder: str | Path, device: str = "cpu") -> LoadedRun:
    """A finished run folder read back: `load_run("runs/baseline/run_0_baseline/<stamp>").sae(x)`."""
    folder = Path(folder)
    cfg, plugin = saved_config(folder, "load_run")
    return LoadedRun(folder, cfg, plugin, saved_sae(folder, cfg, plugin, torch.device(device)),
                     read_json(folder / "final_info.json"))


# ----------------------------------------------------------------------------------------------
# The CLI. Options several commands take are declared once, here.

app = typer.Typer(cls=OneLineUsage, add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])

Preset = Annotated[str, typer.Option(help="embedded, embedded-4m, tiny, pythia-70m, gemma-2-2b, synth, synth-16k, synth-tiny.")]
Tokens = Annotated[int | None, typer.Option(help="Training activations to harvest and train on.")]
DictSize = Annotated[int | None, typer.Option(help="Number of SAE latents.")]
Seed = Annotated[int, typer.Option(help="Seeds initialisation, data order and plugin randomness.")]
Evals = Annotated[str | None, typer.Option(help="Comma-separated evals: core, sparse_probing, sae_probes, absorption, "
                                         "scr, tpp, unlearning, autointerp, all; ground_truth (synthetic presets, their default).")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Runs = Annotated[Path, typer.Option(help="Folder of run folders (searched for runs to reuse).")]
Notes = Annotated[Path, typer.Option(help="Lab notebook to append to.")]
Figures = Annotated[Path, typer.Option(help="Figures go to FIGURES/<study>.")]
Workers = Annotated[int, typer.Option(help="Run N runs at once on a local Ray cluster started for the command, "
                                           "each with its share of the CPUs and, where there are GPUs, one GPU.")]
RayAddress = Annotated[str | None, typer.Option("--ray", help="Run on the running Ray cluster at this address "
                                                "(`ray start --head` prints it); see docs/scaling-out.md.")]
RUNS, NOTES, FIGURES = ROOT / "runs", ROOT / "notes.md", ROOT / "figures"


@app.command()
def run(
    plugin: Annotated[str | None, typer.Option(help="Plugin file name (run_7_adaptive_ln) or study/name.")] = None,
    preset: Preset = "embedded",
    model: Annotated[str | None, typer.Option(help="Model: tiny, gemma-3-270m, or a hub name.")] = None,
    layer: Annotated[int | None, typer.Option(help="Residual stream layer to hook (blocks.L.hook_resid_post).")] = None,
    dict_size: DictSize = None,
    tokens: Tokens = None,
    batch_size: Annotated[int | None, typer.Option(help="SAE batch size in tokens.")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate.")] = None,
    sparsity_penalty: Annotated[float | None, typer.Option(help="L1 coefficient.")] = None,
    seed: Seed = 42,
    evals: Evals = None,
    device: Device = "auto",
    dataset: Annotated[str | None, typer.Option(help="embedded, a hub dataset, or a local .txt/.jsonl/.parquet.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<study>/<plugin>/<timestamp>).")] = None,
    notes: Notes = NOTES,
    set_: Annotated[list[str], typer.Option("--set", help="Plugin hyperparameter key=value (repeatable).")] = [],
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps.")] = 100,
    deterministic: Annotated[bool, typer.Option(help="CUDA: use deterministic kernels (slower).")] = False,
    dtype: Annotated[str, typer.Option(help="The SAE step: fp32, or bf16 (autocast; weights, Adam, losses fp32).")] = "fp32",
    compile_loss: Annotated[bool, typer.Option("--compile", help="torch.compile the SAE's loss (the first steps "
                                               "wait for the compiler; on CPU it needs a C++ compiler).")] = False,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run folder from its checkpoint.")] = None,
    wandb: Annotated[bool, typer.Option(help="Also log the config, every train_log row and the final metrics to "
                                        "wandb (offline without an API key or network; a failure only warns).")] = False,
    wandb_project: Annotated[str, typer.Option(help="The wandb project, with --wandb.")] = "sae-harness",
) -> None:
    """Train a plugin's SAE, evaluate it with sae_bench, write a run folder and a notebook entry."""
    import dashboard
    from notebook import print_summary

    with one_line_errors():
        try:
            if resume is not None:
                cfg, found = saved_config(resume, "--resume")
                run_dir = resume
            elif plugin is None:
                raise HarnessError("--plugin is required (see `python experiment.py list`), or --resume RUN_DIR")
            else:
                found = find_plugin(plugin)
                cfg = build_config(preset, f"{found.study}/{found.name}", model=model, layer=layer,
                                   dict_size=dict_size, tokens=tokens, batch_size=batch_size, lr=lr,
                                   sparsity_penalty=sparsity_penalty, seed=seed, device=device, dataset=dataset,
                                   checkpoint_every=checkpoint_every, deterministic=deterministic,
                                   compile=compile_loss, dtype=kernels.checked_dtype(dtype), evals=split(evals))
                cfg.hyperparams = dataclasses.asdict(parse_hyperparams(found, set_))
                run_dir = out or RUNS / found.study / found.name / time.strftime("%Y%m%d-%H%M%S")
            check_notes(notes)
            held = claimed(run_dir, wait=False)  # no study, sweep or second `run` writes there meanwhile
            with held, dashboard.WandbRun(wandb_project if wandb else None, dataclasses.asdict(cfg), str(run_dir),
                                          StepLog.sinks) as logged:
                info = execute(cfg, found, run_dir, notes, resume=resume is not None)
                logged.summarise(info)
        except Interrupted as exc:
            console.print(f"[yellow]{exc}; continue with: python experiment.py run --resume {run_dir}")
            raise typer.Exit(130) from None
    if info.get("status") == "completed":  # rank 0 (or the only process)
        print_summary(info, run_dir)


@app.command()
def study(
    name: Annotated[str, typer.Argument(help="The study: a folder of plugins/ (see `list`).")],
    preset: Preset = "embedded-4m",
    baselines: Annotated[str, typer.Option(help="Comma-separated baseline plugins, run first.")] = "run_0_baseline",
    tokens: Tokens = None,
    dict_size: DictSize = None,
    seed: Seed = 42,
    seeds: Annotated[int, typer.Option(help="Seeds per run, baselines too: --seed, --seed+1, ...")] = 1,
    cover_cap: Annotated[int, typer.Option(help="Widen each baseline's sweep to cover every run, to at most "
                                                "this many knob values (1: never).")] = 6,
    evals: Evals = None,
    device: Device = "auto",
    runs: Runs = RUNS,
    notes: Notes = NOTES,
    figures: Figures = FIGURES,
    workers: Workers = 0,
    ray_address: RayAddress = None,
) -> None:
    """Run a study's baselines and every run in order on one activation cache (reusing finished
    runs, resuming interrupted ones), then write its figures, compare table and notebook summary."""
    import studies

    with one_line_errors():
        check_notes(notes)
        check_runs_root(runs)
        overrides = dict(tokens=tokens, dict_size=dict_size, seed=seed, device=device, evals=split(evals))
        rows = studies.study(name, split(baselines), preset, overrides, runs, notes, figures,
                             ray_runner(workers, ray_address), seeds, cover_cap)
    Console(width=200).print(studies.summary_table(f"study {name}", rows))
    studies.exit_if_any_failed(rows)


@app.command()
def sweep(
    plugin: Annotated[str, typer.Option(help="Plugin file name or study/name.")],
    grid: Annotated[list[str], typer.Option(help="key=v1,v2: a run setting (" + ", ".join(frontier.SWEEPABLE) +
                                            ") or a plugin hyperparameter; repeat for the cross product.")] = [],
    seeds: Annotated[int, typer.Option(help="Seeds per setting: --seed, --seed+1, ...")] = 1,
    preset: Preset = "embedded-4m",
    tokens: Tokens = None,
    seed: Annotated[int, typer.Option(help="The first seed.")] = 42,
    evals: Evals = None,
    device: Device = "auto",
    runs: Annotated[Path, typer.Option(help="Folder of run folders; the sweep's go to RUNS/sweeps/.")] = RUNS,
    notes: Notes = NOTES,
    workers: Workers = 0,
    ray_address: RayAddress = None,
) -> None:
    """Train the cross product of --grid values × seeds (reusing finished runs, resuming interrupted
    ones) into one sweep folder with a manifest, a line per run and a summary table."""
    import studies

    with one_line_errors():
        check_notes(notes)
        check_runs_root(runs)
        found = find_plugin(plugin)
        overrides = dict(tokens=tokens, seed=seed, device=device, evals=split(evals))
        rows, sweep_dir = studies.sweep(found, grid, seeds, preset, overrides, runs, notes,
                                        ray_runner(workers, ray_address))
    Console(width=200).print(studies.summary_table(f"sweep {found.name} ({sweep_dir})", rows))
    studies.exit_if_any_failed(rows)


def ray_runner(workers: int, address: str | None):
    """cluster.py's Ray hand-off for --workers/--ray, or None: the local mode never loads Ray."""
    if workers == 0 and address is None:
        return None
    import cluster

    return cluster.runner(workers, address)


def split(text: str | None) -> tuple[str, ...] | None:  # None: the preset's (build_config)
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """The benchmark: runs `python bench.py` with these arguments (its --help lists them)."""
    import subprocess

    raise typer.Exit(subprocess.call([sys.executable, str(ROOT / "bench.py"), *ctx.args]))


@app.command("eval")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    evals: Evals = None,
    device: Device = "auto",
    notes: Notes = NOTES,
) -> None:
    """Re-score a saved SAE without retraining; results merge into its final_info.json."""
    import studies
    from notebook import print_summary

    with one_line_errors():
        check_notes(notes)
        info = studies.rescore(run_dir, evals, device, notes)
    print_summary(info, run_dir)


@app.command("dashboard")
def dashboard_page(
    run_dir: Annotated[Path, typer.Argument(help="A run folder with a trained SAE.")],
    latents: Annotated[str | None, typer.Option(help="The latents to show: ids and ranges, e.g. 0-49 or 3,17,100-120.")] = None,
    top: Annotated[int | None, typer.Option(help="Or the top N latents by --by (default: the top 50 by density).")] = None,
    by: Annotated[str, typer.Option(help="With --top: density or activation (the max on the text).")] = "density",
    tokens: Annotated[int | None, typer.Option(help="Held-out tokens to stream (default 16,384 where the run's text "
                                                    "allows more than its evaluation contexts; else those).")] = None,
    device: Device = "auto",
) -> None:
    """Write RUN_DIR/dashboard/index.html, one self-contained page: per latent its top and sampled
    contexts, activation histogram, promoted and suppressed tokens and plugin artifacts, under an
    index sortable by density and max activation that lists the latents that never fired."""
    import dashboard

    with one_line_errors():
        page = dashboard.for_run(run_dir, latents, top, by, tokens, device)
    console.print(f"dashboard: {page}")


@app.command()
def notes(
    out: Annotated[Path, typer.Option(help="The notebook to write (e.g. notes.md).")],
    runs: Runs = RUNS,
    study: Annotated[str | None, typer.Option(help="Only this study.")] = None,
    replace: Annotated[bool, typer.Option(help="Replace OUT if it exists (its old text is lost).")] = False,
) -> None:
    """Rebuild the lab notebook from the run folders: one entry per plugin and setting (its latest
    completed run), in the seed notebooks' shape, and each study's summary."""
    import studies

    with one_line_errors():
        if out.exists() and not replace:
            raise HarnessError(f"{out} exists; pass --replace to rebuild it from the runs, or another --out")
        check_notes(out)
        text = studies.rebuild_notebook(runs, study)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text)
    console.print(f"{text.count(chr(10) + '## Run ')} entries written to {out}")


@app.command()
def compare(
    study: Annotated[str | None, typer.Option(help="Only this study.")] = None,
    runs: Runs = RUNS,
) -> None:
    """Runs x key metrics: best value per column highlighted, deltas against each parent run."""
    import plot

    with one_line_errors():
        table = plot.compare_table(runs, study)
    Console(width=220).print(table)


@app.command()
def analyse(
    name: Annotated[str, typer.Argument(metavar="STUDY", help="The study (topk_ortho, adaptive_ortho, zscore_ortho, "
                                                               "contrastive, freq_order).")],
    analysis: Annotated[str | None, typer.Argument(help="One of its analyses (default: all; see analyses.py).")] = None,
    preset: Preset = "embedded-4m",
    tokens: Tokens = None,
    dict_size: DictSize = None,
    seed: Seed = 42,
    evals: Evals = None,
    device: Device = "auto",
    only: Annotated[str | None, typer.Option(help="Per-run analyses: only these runs of the study (and the baseline).")] = None,
    values: Annotated[str | None, typer.Option(help="Sweep analyses (topk_threshold, alpha): the values to sweep.")] = None,
    runs: Runs = RUNS,
    notes: Notes = NOTES,
    figures: Annotated[Path, typer.Option(help="The figures go to FIGURES/<study>/analysis_<name>.png.")] = FIGURES,
) -> None:
    """The study-level analyses its notebook asks for (analyses.py): each runs what it needs
    (reusing finished runs), writes a figure and appends a paragraph to the notebook."""
    import analyses

    with one_line_errors():
        check_notes(notes)
        check_runs_root(runs)
        overrides = dict(tokens=tokens, dict_size=dict_size, seed=seed, device=device, evals=split(evals))
        setting = analyses.Setting(name, preset, overrides, runs, notes, split(only or ""), split(values or ""))
        found = analyses.run_analyses(name, analysis, setting, figures)
    for path, finding in found.items():
        console.print(f"{path}: {finding.caption}")


@app.command("list")
def list_plugins() -> None:
    """Every plugin: study, run, title, parent and hyperparameters with defaults."""
    table = Table(title="Plugins")
    for column in ("study", "run", "plugin", "title", "parent", "hyperparameters"):
        table.add_column(column)
    with one_line_errors():
        plugins = [find_plugin(key) for key in plugin_files()]
    for p in sorted(plugins, key=lambda p: (p.study, p.run_number)):
        hps = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(p.hyperparams_class))
        table.add_row(p.study, str(p.run_number), p.name, p.title, p.parent or "-", hps or "-")
    Console(width=200).print(table)


@app.command()
def new(
    name: Annotated[str, typer.Argument(metavar="STUDY/run_N_slug", help="The new plugin, e.g. my_idea/run_1_first_try.")],
    parent: Annotated[str, typer.Option(help="The plugin it builds on (default: the plain ReLU SAE).")] = "baseline/run_0_baseline",
) -> None:
    """Write a plugin skeleton: its docstring to fill in, Hyperparams subclassing the parent's, and
    the hooks most runs override as commented stubs with their shapes."""
    import skeleton

    with one_line_errors():
        path = skeleton.write_plugin(PLUGINS_DIR, name, find_plugin(parent))
    console.print(f"wrote {os.path.relpath(path, ROOT)}; train it with: python experiment.py run --plugin "
                  f"{name} --preset tiny")


if __name__ == "__main__":
    app()
