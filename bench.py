"""Where a run's time goes, measured in one process on the same data, side by side with SAELens.

    python bench.py --preset embedded --l0-fraction 0.02     # a table, and bench.json
    python bench.py --activations random --dtype bf16        # every baseline at 2304 x 16384 x 4096, no LLM

Four measurements: LLM activation harvest against the same model's plain forward to the hooked
layer; cached-activation reads through training's own prefetching reader; the plugin's SAE training
step (dense or sparse, as training's measured switch point picks it, or as --path forces it)
against SAELens's training SAE of the same architecture on the same batch, weights, dtype,
autocast and optimizer; and the step's dense-equivalent FLOP/s against a plain matmul of the same
shape in the step's dtype. Each pair is timed in turn over rounds (best of each), so load from
elsewhere on a shared machine hits both alike. With `--activations random` there is no LLM: the
step alone, on Gaussian activations at any shape, for every baseline architecture.

    python bench.py --eval runs/baseline/run_0_baseline_...      # a run's core evaluation, before and after

With `--eval RUN_DIR`: the run's core evaluation (its saved SAE, its held-out tokens) the way
sae_bench runs it, every pass its own (before), against the cached path (evals.evaluate_core with
a cache_dir: after), alternated in one process, each split into its parts, with the largest
relative difference between the two paths' metrics.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

from common import OneLineUsageCommand, activations_dir, cache_dir, one_line_errors  # first: its import guards

import evals
import experiment
import sources
import kernels
import numpy as np
import torch
import typer
from experiment import RunConfig
from runs import atomic_write
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        import psutil
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        process, self._stop = psutil.Process(), threading.Event()
        self._base = process.memory_info().rss

        def sample():
            while not self._stop.wait(0.005):
                self.peak_mb = max(self.peak_mb, (process.memory_info().rss - self._base) / 2**20)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def timed(fn, device: torch.device, repeats: int, warmup: bool = True) -> float:
    """Seconds per call (after one untimed warm-up call)."""
    if warmup:
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def alternated(fns: dict[str, Any], device: torch.device, repeats: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Each fn's best-of-`rounds` seconds per call and its peak MB, the fns timed in turn every
    round, so that load from elsewhere on the machine hits them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    peak_mb = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            with PeakMemory(device) as mem:
                seconds[name].append(timed(fn, device, repeats, warmup=False))
            peak_mb[name] = max(peak_mb[name], mem.peak_mb)
    return {name: (min(seconds[name]), peak_mb[name]) for name in fns}


def sae_lens_step(sae: experiment.SAE, cfg: RunConfig):
    """SAELens's own training SAE of the same architecture, with our SAE's weights, doing its
    trainer's step (its forward under the same autocast as ours, as its trainer's `autocast` flag
    does; the gradient's norm clipped at 1 before Adam, as SAETrainer clips it)."""
    from sae_lens.saes.sae import TrainStepInput

    ref, coefficients = sae.sae_lens_training()
    optimizer = torch.optim.Adam(ref.parameters(), lr=cfg.lr)
    no_dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.W_dec.device)

    def step(x):
        with kernels.step_autocast(cfg.dtype, x.device):
            out = ref.training_forward_pass(TrainStepInput(
                sae_in=x, coefficients=coefficients, dead_neuron_mask=no_dead, n_training_steps=0,
                is_logging_step=False))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        optimizer.step()
    return step


def sae_lens_architecture(plugin: experiment.Plugin, cfg: RunConfig) -> None:
    """Refuse, before any work, a plugin that no SAELens architecture is."""
    probe = plugin.sae_class(8, 16, plugin.hyperparams_class(**cfg.hyperparams), cfg)
    if not hasattr(probe, "sae_lens_training") or probe.sae_lens_training() is None:
        raise experiment.HarnessError(f"--plugin {plugin.name} with these settings is no SAELens architecture, so "
                                      "there is no SAELens step to time it against; bench the baselines "
                                      "(plugins/baseline/) at their defaults")


def harvest_and_read(cfg: RunConfig, model, device: torch.device, results: dict) -> torch.Tensor:
    """1. harvest against the plain forward, on the contexts harvesting uses; 2. cache reads
    through training's own reader. Returns one training batch."""
    contexts, _ = experiment.load_tokens(cfg, model)
    non_bos_so_far = (contexts != contexts[0, 0]).sum(1).cumsum(0)
    contexts = contexts[: int(torch.searchsorted(non_bos_so_far, cfg.tokens)) + 1]

    def plain_forward():
        with torch.no_grad():
            for start in range(0, len(contexts), cfg.llm_batch_size):
                model(contexts[start:start + cfg.llm_batch_size].to(device), stop_at_layer=cfg.layer + 1)
    with tempfile.TemporaryDirectory(prefix="sae_bench_") as tmp:
        acts = np.lib.format.open_memmap(Path(tmp) / "acts.npy", mode="w+", dtype=cfg.cache_dtype,
                                         shape=(cfg.tokens, model.cfg.d_model))
        with Progress(console=experiment.console, transient=True) as quiet:
            timings = alternated(dict(harvest=lambda: experiment.harvest(model, contexts, cfg, acts, quiet),
                                      plain_forward=plain_forward), device, repeats=1, rounds=3)
        for name, (seconds, peak_mb) in timings.items():
            results[name] = dict(tokens_per_s=cfg.tokens / seconds, peak_mb=peak_mb)
        results["harvest_vs_forward"] = timings["plain_forward"][0] / timings["harvest"][0]

        acts.flush()
        data = experiment.ActivationData(np.load(Path(tmp) / "acts.npy", mmap_mode="r"), torch.empty(0),
                                         sources.activation_scale(acts), from_cache=True)
        order = torch.randperm(cfg.tokens, generator=torch.Generator().manual_seed(cfg.seed))
        n_batches = cfg.tokens // cfg.batch_size

        def batches():
            return experiment.prefetched_batches(data, order, cfg, range(n_batches), 0, cfg.batch_size, device,
                                                 torch.float32)
        with PeakMemory(device) as mem:
            read_s = timed(lambda: collections.deque(batches(), maxlen=0), device, 3)
        results["cache_read"] = dict(tokens_per_s=n_batches * cfg.batch_size / read_s, peak_mb=mem.peak_mb)
        results["cache_read_vs_harvest"] = results["cache_read"]["tokens_per_s"] / results["harvest"]["tokens_per_s"]
        return next(batches())[1]


def sae_steps(cfg: RunConfig, plugin: experiment.Plugin, x: torch.Tensor, d_in: int, steps: int,
              l0_fraction: float | None, results: dict, path: str = "auto") -> float:
    """3. the plugin's training step against SAELens's on the same batch; returns ours in s."""
    torch.manual_seed(cfg.seed)
    sae = plugin.sae_class(d_in, cfg.dict_size, plugin.hyperparams_class(**cfg.hyperparams), cfg, device=x.device)
    if l0_fraction is not None:  # place the ReLU threshold so that this fraction of latents fires
        with torch.no_grad():
            pre = (x - sae.b_dec) @ sae.W_enc
            sae.b_enc.copy_(-torch.quantile(pre.float().flatten()[:1_000_000], 1 - l0_fraction))
    reference = sae_lens_step(sae, cfg)
    trainer = plugin.trainer_class(sae, cfg)
    density = (sae.encode(x) > 0).float().mean().item()
    step_numbers = itertools.count()  # as in training: the density check runs every 10th step
    with forced_path(path, x, cfg.dict_size):
        for _ in range(2):  # the first picks the dense or sparse step, the second compiles it (--compile)
            trainer.step(x, next(step_numbers))
        reference(x)
        timings = alternated(dict(ours=lambda: trainer.step(x, next(step_numbers)), sae_lens=lambda: reference(x)),
                             x.device, repeats=steps, rounds=3)
    (ours_s, ours_mb), (ref_s, ref_mb) = timings["ours"], timings["sae_lens"]
    results["sae_step"] = dict(tokens_per_s=cfg.batch_size / ours_s, peak_mb=ours_mb, latent_density=density,
                               path="sparse" if trainer.sparse else "dense", compiled=cfg.compile, dtype=cfg.dtype,
                               sparse_below=switch_point(sae, x) if path == "auto" else None)
    results["sae_lens_step"] = dict(tokens_per_s=cfg.batch_size / ref_s, peak_mb=ref_mb)
    results["ours_vs_sae_lens"] = ref_s / ours_s
    return ours_s


@contextlib.contextmanager
def forced_path(path: str, x: torch.Tensor, d_sae: int):
    """--path: training's own choice of the dense or the sparse step (auto), or one of them forced.
    Within, Trainer.step reads its switch from a scratch cache holding a switch point of 1 (sparse)
    or 0 (dense) for this shape, and a forced sparse step may run on x's device (training takes it
    on CPU only, kernels.SPARSE_DEVICES). An SAE with no sparse step stays dense."""
    if path == "auto":
        yield
        return
    devices = kernels.SPARSE_DEVICES
    if path == "sparse" and x.device.type not in devices:
        devices = (*devices, x.device.type)
    with tempfile.TemporaryDirectory(prefix="sae_bench_path_") as scratch:
        forced = {"sparse_below": float(path == "sparse")}
        kernels.sparse_below(len(x), x.shape[1], d_sae, scratch, measure=lambda *_: forced)
        with mock.patch.dict(os.environ, {"SAE_HARNESS_CACHE": scratch}), \
                mock.patch.object(kernels, "SPARSE_DEVICES", devices):
            yield


def switch_point(sae: experiment.SAE, x: torch.Tensor) -> float | None:
    """The latent density below which training takes the sparse step, as it measured it (once per
    machine and shape, cached); None where this step has no sparse path."""
    if x.device.type not in kernels.SPARSE_DEVICES or not sae.takes_sparse_step():
        return None
    return kernels.sparse_below(len(x), sae.cfg.d_in, sae.cfg.d_sae, cache_dir())


def roofline(cfg: RunConfig, d_in: int, ours_s: float, device: torch.device, steps: int, results: dict) -> None:
    """4. the step's dense-equivalent FLOP/s against one B × d_in × d_sae matmul in its dtype."""
    results["roofline_flops"] = matmul_flops(cfg, d_in, device, steps)
    results["roofline_dtype"] = matmul_dtype(cfg.dtype, device)
    roofline_fraction(cfg, d_in, ours_s, results["roofline_flops"], results)


def matmul_flops(cfg: RunConfig, d_in: int, device: torch.device, steps: int) -> float:
    """FLOP/s of a plain B × d_in × d_sae matmul in the step's matmul dtype, best of three rounds."""
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    a = torch.randn(cfg.batch_size, d_in, device=device, dtype=dtype)
    b = torch.randn(d_in, cfg.dict_size, device=device, dtype=dtype)
    matmul_s, _ = alternated(dict(matmul=lambda: a @ b), device, repeats=steps, rounds=3)["matmul"]
    return 2 * cfg.batch_size * d_in * cfg.dict_size / matmul_s


def matmul_dtype(dtype: str, device: torch.device) -> str:
    """What the step's matmuls run in: bf16, or fp32 (TF32 on CUDA where training allows it)."""
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return "bf16" if dtype == "bf16" else "tf32" if tf32 else "fp32"


def roofline_fraction(cfg: RunConfig, d_in: int, ours_s: float, roofline_flops: float, results: dict) -> None:
    """The step's dense-equivalent FLOP/s (five B × d_in × d_sae matmuls: 10·B·d_in·d_sae) and its
    fraction of the matmul's."""
    results["sae_step_flops"] = 10 * cfg.batch_size * d_in * cfg.dict_size / ours_s
    results["sae_step_roofline_fraction"] = results["sae_step_flops"] / roofline_flops


def run_bench(cfg: RunConfig, steps: int, l0_fraction: float | None, path: str = "auto") -> dict[str, Any]:
    plugin = experiment.find_plugin(cfg.plugin)
    device = kernels.resolve_device(cfg.device)
    kernels.configure_kernels(cfg, device)  # as training does: TF32 on CUDA
    model = experiment.load_model(cfg.model, device)
    d_in = model.cfg.d_model
    results: dict[str, Any] = dict(plugin=cfg.plugin, hyperparams=cfg.hyperparams, device=str(device),
                                   device_name=device_name(device), model=cfg.model, layer=cfg.layer, d_in=d_in,
                                   d_sae=cfg.dict_size, batch_size=cfg.batch_size, tokens=cfg.tokens, dtype=cfg.dtype,
                                   torch_threads=torch.get_num_threads())
    x = harvest_and_read(cfg, model, device, results)
    ours_s = sae_steps(cfg, plugin, x, d_in, steps, l0_fraction, results, path)
    roofline(cfg, d_in, ours_s, device, steps, results)
    return results


REFERENCE_SHAPE = dict(d_in=2304, dict_size=16384, batch_size=4096)  # Gemma-2-2B's residual width, the field's d_sae


def run_synthetic(cfgs: list[RunConfig], d_in: int, steps: int, l0_fraction: float | None, path: str) -> dict[str, Any]:
    """The SAE step alone, no LLM: each config's plugin against SAELens's on one batch of Gaussian
    activations, (B, d_in) with unit-variance entries, so a mean norm of about √d_in, the scale
    training feeds the SAE; and the matmul roofline in the step's dtype, measured once."""
    cfg = cfgs[0]
    device = kernels.resolve_device(cfg.device)
    kernels.configure_kernels(cfg, device)  # as training does: TF32 on CUDA
    x = torch.randn(cfg.batch_size, d_in, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    results: dict[str, Any] = dict(
        activations="random", device=str(device), device_name=device_name(device), d_in=d_in, d_sae=cfg.dict_size,
        batch_size=cfg.batch_size, dtype=cfg.dtype, path=path, l0_fraction=l0_fraction, steps=steps,
        torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
        roofline_dtype=matmul_dtype(cfg.dtype, device), roofline_flops=matmul_flops(cfg, d_in, device, steps),
        architectures={})
    for each in cfgs:
        row: dict[str, Any] = dict(hyperparams=each.hyperparams)
        ours_s = sae_steps(each, experiment.find_plugin(each.plugin), x, d_in, steps, l0_fraction, row, path)
        roofline_fraction(each, d_in, ours_s, results["roofline_flops"], row)
        results["architectures"][each.plugin] = row
        experiment.console.print(f"{each.plugin}: ours / sae_lens {row['ours_vs_sae_lens']:.2f}x "
                                 f"({row['sae_step']['path']} step, {cfg.dtype})")
    return results


class EvalParts:
    """Seconds spent in each part of a core evaluation while the block runs: the model's passes by
    kind and sae_bench's and the harness's steps, each part's own time (a part it calls is counted
    there, not in it); `other` is the rest (sae_bench's bookkeeping, the token store, the SAE's setup)."""

    FULL_PASSES = ("full pass: clean", "full pass: SAE spliced in", "full pass: zero-ablated")

    def __init__(self, model):
        from sae_bench.evals.core import main as core

        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._nested: list[float] = []
        self._full_passes = iter(())
        functions = [
            (core, "get_recons_loss", "sae_bench's KL and CE from full logits", self.FULL_PASSES),
            (core, "get_sparsity_and_variance_metrics", "sae_bench's sparsity and variance metrics", ()),
            (core, "get_featurewise_weight_based_metrics", "sae_bench's weight-based metrics", ()),
            (evals, "_variance_sums", "harness variance sums", ()),
            (evals, "_variance_row", "harness variance sums", ()),
            (evals, "bootstrap_standard_errors", "harness bootstrap", ()),
            (evals, "clean_reference", "cached reference: read and sha256 check", ()),
            (evals, "_reference_values", "cached reference: KL and clean terms (built once)",
             itertools.cycle(self.FULL_PASSES[::2])),
            (evals, "_spliced_losses", "splice, KL and CE from cached terms", ()),
            (evals, "_logit_terms", "unembedding of kept positions, log-normaliser", ()),
        ]
        self._patches = [mock.patch.object(module, name, self._timed(getattr(module, name), label, passes))
                         for module, name, label, passes in functions]
        self._patches.append(mock.patch.object(model, "forward", self._timed(model.forward, self._pass_kind)))

    def _pass_kind(self, kwargs: dict) -> str:
        if kwargs.get("start_at_layer"):
            return "model from the hooked layer on, SAE spliced in"
        if kwargs.get("stop_at_layer") is not None:
            return "model up to the hooked layer"
        return next(self._full_passes, "full pass")

    def _timed(self, fn, label, passes=()):
        def timed(*args, **kwargs):
            name = label(kwargs) if callable(label) else label
            if passes:  # the full passes this function runs, in order
                self._full_passes = iter(passes)
            self._nested.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[name] += elapsed - self._nested.pop()
                if self._nested:
                    self._nested[-1] += elapsed
        return timed

    def __enter__(self):
        for patch in self._patches:
            patch.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total = time.perf_counter() - self._start
        for patch in self._patches:
            patch.stop()
        self.seconds["other"] = self.total - sum(self.seconds.values())


EVAL_PATHS = ("sae_bench", "cached")  # before, after


def run_eval_bench(run_dir: Path, rounds: int) -> dict[str, Any]:
    """A run's core evaluation, sae_bench's path and the cached one in turn each round, in one
    process: each path's fastest round, split into its parts; the cached reference's first
    computation (when this call makes it) apart; and how far the two paths' metrics differ."""
    cfg, plugin = experiment.saved_config(run_dir, "bench --eval")
    device = kernels.resolve_device(cfg.device)
    kernels.configure_kernels(cfg, device)  # as the run evaluated
    sae, eval_tokens = experiment.saved_sae(run_dir, cfg, plugin, device), torch.load(run_dir / "eval_tokens.pt")
    model = experiment.load_model(cfg.model, device)
    cache_dirs = dict(sae_bench=None, cached=activations_dir())

    def evaluate(path: str) -> tuple[EvalParts, dict]:
        with EvalParts(model) as parts:
            metrics, _ = evals.evaluate_core(sae, model, eval_tokens, cfg, device,
                                                        cache_dir=cache_dirs[path])
        return parts, metrics

    first, _ = evaluate("cached")  # computes the cached reference if no earlier run did
    best: dict[str, EvalParts] = {}
    found: dict[str, dict] = {}
    for _ in range(rounds):
        for path in EVAL_PATHS:
            parts, found[path] = evaluate(path)
            best[path] = min(best.get(path, parts), parts, key=lambda p: p.total)
    differences = metric_differences(found["sae_bench"], found["cached"])
    return dict(eval=dict(
        run=str(run_dir), preset=cfg.preset, model=cfg.model, layer=cfg.layer, device=str(device),
        device_name=device_name(device), torch_threads=torch.get_num_threads(), rounds=rounds,
        contexts=list(eval_tokens.shape), reference_first_s=first.total,
        reference_built=first.seconds.get("cached reference: KL and clean terms (built once)", 0) > 0,
        paths={path: dict(total_s=best[path].total, parts=dict(best[path].seconds)) for path in EVAL_PATHS},
        cached_vs_sae_bench=best["cached"].total / best["sae_bench"].total,
        max_relative_difference=max(differences.values()), relative_differences=differences))


def metric_differences(reference: dict, other: dict, prefix: str = "") -> dict[str, float]:
    """|a − b| / |a| for every number in two nested metric dicts (0 where both are 0)."""
    found = {}
    for key, value in reference.items():
        if isinstance(value, dict):
            found.update(metric_differences(value, other[key], f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and value is not None:
            found[prefix + key] = abs(value - other[key]) / abs(value) if value else float(other[key] != 0)
    return found


def print_eval_table(results: dict[str, Any]) -> None:
    run = results["eval"]
    table = Table(title=f"core evaluation of {run['run']}: {run['model']} layer {run['layer']}, "
                        f"{run['contexts'][0]} x {run['contexts'][1]} tokens, {run['device_name']}, "
                        f"best of {run['rounds']} (seconds)")
    for column in ("part", "sae_bench (before)", "cached (after)"):
        table.add_column(column, justify="left" if column == "part" else "right")
    paths = [run["paths"][path] for path in EVAL_PATHS]
    names = sorted({name for path in paths for name in path["parts"]}, key=lambda n: (n == "other", n))
    for name in names:
        table.add_row(name, *(f"{path['parts'][name]:.2f}" if name in path["parts"] else "" for path in paths))
    table.add_row("total", *(f"{path['total_s']:.2f}" for path in paths))
    Console().print(table)
    Console().print(f"cached / sae_bench: {run['cached_vs_sae_bench']:.2f} of the time; largest relative difference "
                    f"in a metric: {run['max_relative_difference']:.1e}; the cached reference took "
                    f"{run['reference_first_s']:.1f} s to {'compute' if run['reference_built'] else 'read'} first")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else kernels.cpu_model()


def print_table(cfg: RunConfig, results: dict[str, Any]) -> None:
    table = Table(title=f"bench {cfg.plugin}: {cfg.model} layer {cfg.layer}, d_sae {cfg.dict_size}, "
                        f"batch {cfg.batch_size}, {cfg.dtype}, {results['device']}")
    table.add_column("what")
    table.add_column("tokens/s", justify="right")
    table.add_column("peak MB", justify="right")
    step = results["sae_step"]
    switch = f", sparse below {step['sparse_below']:.0%}" if step["sparse_below"] is not None else ""
    labels = dict(sae_step=f"sae_step ({step['path']}{switch}{', compiled' if step['compiled'] else ''})")
    for key in ("plain_forward", "harvest", "cache_read", "sae_step", "sae_lens_step"):
        table.add_row(labels.get(key, key), f"{results[key]['tokens_per_s']:,.0f}", f"{results[key]['peak_mb']:,.0f}")
    Console().print(table)
    Console().print(
        f"harvest / plain forward: {results['harvest_vs_forward']:.2f}   cache read / harvest: "
        f"{results['cache_read_vs_harvest']:.1f}x   ours / sae_lens: {results['ours_vs_sae_lens']:.2f}x   "
        f"SAE step: {results['sae_step_flops'] / 1e9:.1f} GFLOP/s (the dense step's FLOPs over its time) = "
        f"{results['sae_step_roofline_fraction']:.0%} of the {results['roofline_flops'] / 1e9:.1f} GFLOP/s "
        f"{results['roofline_dtype']} matmul roofline (latent density {step['latent_density']:.1%})")


def print_synthetic_table(results: dict[str, Any]) -> None:
    table = Table(title=f"bench, random activations: {results['d_in']} x {results['d_sae']} x batch "
                        f"{results['batch_size']}, {results['dtype']}, {results['device_name']}; roofline "
                        f"{results['roofline_flops'] / 1e9:,.1f} GFLOP/s ({results['roofline_dtype']} matmul)")
    for column in ("architecture", "step", "density", "ours tok/s", "sae_lens tok/s", "ours / sae_lens",
                   "roofline", "peak MB ours / sae_lens"):
        text = column in ("architecture", "step")
        table.add_column(column, justify="left" if text else "right", no_wrap=text)
    for name, row in results["architectures"].items():
        ours, theirs = row["sae_step"], row["sae_lens_step"]
        table.add_row(name.removeprefix("baseline/"), ours["path"], f"{ours['latent_density']:.1%}",
                      f"{ours['tokens_per_s']:,.0f}", f"{theirs['tokens_per_s']:,.0f}",
                      f"{row['ours_vs_sae_lens']:.2f}x", f"{row['sae_step_roofline_fraction']:.0%}",
                      f"{ours['peak_mb']:,.0f} / {theirs['peak_mb']:,.0f}")
    Console().print(table)


ACTIVATIONS, PATHS = ("model", "random"), ("auto", "dense", "sparse")


def checked_options(activations: str, path: str, d_in: int | None, model: str | None, layer: int | None) -> None:
    if activations not in ACTIVATIONS:
        raise experiment.HarnessError(f"unknown --activations '{activations}'; use model or random")
    if path not in PATHS:
        raise experiment.HarnessError(f"unknown --path '{path}'; use auto, dense or sparse")
    if activations == "model" and d_in is not None:
        raise experiment.HarnessError("--d-in is for --activations random; with model activations the model sets it")
    if activations == "random" and (model is not None or layer is not None):
        raise experiment.HarnessError("--model and --layer are for --activations model; random activations have "
                                      "no model (set their width with --d-in)")


def bench_configs(preset: str, plugin: str | None, activations: str, set_: list[str], **overrides) -> list[RunConfig]:
    """One config per architecture to time: --plugin, or with random activations and no --plugin
    every baseline; each checked to be a SAELens architecture, before any work."""
    names = [plugin] if plugin else ["run_0_baseline"] if activations == "model" else \
        [key for key in experiment.plugin_files() if key.startswith("baseline/")]
    cfgs = []
    for name in names:
        found = experiment.find_plugin(name)
        cfg = experiment.build_config(preset, f"{found.study}/{found.name}", **overrides)
        cfg.hyperparams = dataclasses.asdict(experiment.parse_hyperparams(found, set_))
        sae_lens_architecture(found, cfg)
        cfgs.append(cfg)
    return cfgs


@app.command(cls=OneLineUsageCommand)
def bench(
    preset: str = typer.Option("embedded", help="Model, layer and data (and lr, L1) come from this preset."),
    plugin: str = typer.Option(None, help="The architecture to time: a baseline plugin (plugins/baseline/); "
                               "default run_0_baseline, or every baseline with --activations random."),
    activations: str = typer.Option("model", help="model: the preset's LLM's, harvested (harvest and cache reads "
                                    "timed too); random: Gaussian, no LLM, the SAE step alone at any shape."),
    d_in: int = typer.Option(None, help="--activations random: their width (default 2304, Gemma-2-2B's)."),
    model: str = typer.Option(None), layer: int = typer.Option(None),
    dict_size: int = typer.Option(None, help="d_sae (random activations: default 16384)."),
    batch_size: int = typer.Option(None, help="Tokens per step (random activations: default 4096)."),
    tokens: int = typer.Option(32_768, help="Tokens to harvest for the harvest and read timings."),
    steps: int = typer.Option(20, help="Timed SAE steps per round (three rounds)."),
    l0_fraction: float = typer.Option(None, help="Set the fraction of latents that fire (e.g. 0.02)."),
    compile_loss: bool = typer.Option(False, "--compile", help="torch.compile our SAE's loss, as `run --compile`."),
    dtype: str = typer.Option("fp32", help="The step's precision, as `run --dtype`: fp32 or bf16 (autocast, "
                              "SAELens's step too)."),
    path: str = typer.Option("auto", help="Our step: auto (as training picks it), or dense or sparse forced."),
    device: str = typer.Option("auto"), out: Path = typer.Option(Path("bench.json")),
    set_: list[str] = typer.Option([], "--set", help="Plugin hyperparameter key=value (repeatable), e.g. k=32."),
    eval_run: Path = typer.Option(None, "--eval", help="A finished run's folder: time its core evaluation, "
                                  "sae_bench's path against the cached one (nothing else is timed)."),
    eval_rounds: int = typer.Option(3, help="--eval: rounds, each timing both paths in turn."),
) -> None:
    """Throughput of harvesting, cache reads and the SAE step (vs sae_lens), the SAE step's
    fraction of the measured matmul roofline, and peak memory; a table and bench.json. With
    --activations random: the SAE step of every baseline (vs sae_lens) at any shape, no LLM."""
    with one_line_errors():
        kernels.take_thread_share()  # as a run does: timings beside other harness processes are a share's
    if eval_run is not None:
        with one_line_errors():
            results = run_eval_bench(eval_run, eval_rounds)
        atomic_write(out, json.dumps(results, indent=2))
        print_eval_table(results)
        return
    with one_line_errors():
        checked_options(activations, path, d_in, model, layer)
        shape = dict(dict_size=dict_size, batch_size=batch_size)
        if activations == "random":
            shape = {k: v or REFERENCE_SHAPE[k] for k, v in shape.items()}
            tokens = max(tokens, shape["batch_size"])  # not harvested; only a config with one step or more
        cfgs = bench_configs(preset, plugin, activations, set_, model=model, layer=layer, tokens=tokens,
                             device=device, compile=compile_loss, dtype=kernels.checked_dtype(dtype), **shape)
        if activations == "random":
            results = run_synthetic(cfgs, d_in or REFERENCE_SHAPE["d_in"], steps, l0_fraction, path)
        else:
            results = run_bench(cfgs[0], steps, l0_fraction, path)
    atomic_write(out, json.dumps(results, indent=2))
    if activations == "random":
        print_synthetic_table(results)
    else:
        print_table(cfgs[0], results)


if __name__ == "__main__":
    app()
