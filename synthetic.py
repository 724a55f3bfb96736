"""Ground truth: training data from SAELens's synthetic models (SynthSAEBench), and the scores of
an SAE against the features that generated it. No language model is loaded for these presets.

A synthetic preset names a model of MODELS instead of an LLM: a `SyntheticModelConfig` (true
features, their Zipfian firing, hierarchy, correlations, magnitudes, a fixed seed). The harness
treats it as it treats a language model's layer:

    model = load_model(cfg.model, device)    # SAELens's SyntheticModel, built once and cached
    train, eval_tokens, scale, from_cache = activation_data(cfg, model, progress, key)
    evaluate(info, scaled_sae, model, cfg, device)   # the `ground_truth` eval into final_info

The training activations are sampled once, from a fixed seed, into a hash-named folder of the
activation cache (`train_acts.npy` and a manifest with its sha256, checked on every read; a
stale or damaged file is rebuilt), so every run of a sweep trains on the same samples and none
waits for the generator. The evaluation samples fresh activations from EVAL_SEED, the same for
every run, and scores with `sae_lens.synthetic.eval_sae_on_synthetic_data`: MCC, feature
uniqueness, per-latent precision/recall/F1, L0, dead latents, explained variance, shrinkage. They
are stored in final_info's `metrics` under the keys a language-model run uses where the quantity
is the same (L0, explained variance, L2 ratio, dead fraction), and under `ground_truth` otherwise.
"""

from __future__ import annotations

from common import HarnessError, activations_dir, console, file_sha256  # first: its import guards

import hashlib
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens.synthetic import (FoldedNormalMagnitudeConfig, HierarchyConfig, LinearMagnitudeConfig,
                                LowRankCorrelationConfig, OrthogonalizationConfig, SyntheticModel,
                                SyntheticModelConfig, ZipfianFiringProbabilityConfig, eval_sae_on_synthetic_data)

from runs import atomic_write
from sources import cached_activations

GROUND_TRUTH = "ground_truth"  # the one eval a synthetic run has
DATA_SEED, EVAL_SEED = 1, 2  # the training samples and the evaluation samples: fixed, and not the same
CHUNK = 8192  # samples generated at a time: SAELens's generator is several times faster per sample in big batches
VERSION = 1  # bump when what the cache holds, or how it is generated, changes


@dataclass(frozen=True)
class Model:
    config: SyntheticModelConfig
    eval_samples: int  # fresh samples the ground-truth evaluation scores on


def _bench_like(num_features: int, hidden_dim: int, min_prob: float, roots: int,
                orthogonalization: OrthogonalizationConfig | None, seed: int) -> SyntheticModelConfig:
    """SynthSAEBench-16k's recipe (SAELens docs, synth_sae_bench.md) at another size."""
    return SyntheticModelConfig(
        num_features=num_features, hidden_dim=hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=min_prob),
        hierarchy=HierarchyConfig(total_root_nodes=roots, branching_factor=4, max_depth=3,
                                  mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
                                  compensate_probabilities=True, scale_children_by_parent=True),
        orthogonalization=orthogonalization, correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5), bias=0.5, seed=seed)


# A model's seed must differ from the run's --seed: SAELens draws the true directions as
# torch.randn(num_features, hidden_dim) from the model's seed, and the SAE its decoder rows as
# torch.randn(d_sae, d_in) from the run's, so with equal seeds (and d_in = hidden_dim) the SAE starts
# on the first d_sae true features (check_run refuses it). Hence not 42, the runs' default seed.
MODEL_SEED = 1_000_003
MODELS = {
    # SynthSAEBench-16k as published: 16,384 features in 768 dimensions, Zipf(0.5, 0.4, 5e-4), 128
    # hierarchy roots, low-rank correlations, 100 orthogonalisation steps at lr 3e-4, seed 42 (so
    # its runs need another --seed).
    "synth-16k": Model(_bench_like(16_384, 768, 5e-4, 128, OrthogonalizationConfig(num_steps=100, lr=3e-4), 42),
                       500_000),
    # The same recipe at a quarter of the features in a third of the dimensions. Its minimum
    # firing probability keeps the true L0 in the tens; no orthogonalisation (it took 5 minutes
    # on the 2-core CPU; random directions in 256 dimensions are already nearly orthogonal).
    "synth": Model(_bench_like(4096, 256, 2e-3, 32, None, MODEL_SEED), 32_768),
    # For tests: seconds to generate and train.
    "synth-tiny": Model(_bench_like(512, 64, 1e-2, 4, None, MODEL_SEED), 4096),
}
_NO_LLM = dict(layer=0, context_size=1, dataset="synthetic", llm_batch_size=1, eval_batch_prompts=1,
               eval_reconstruction_batches=1, eval_sparsity_batches=1, evals=(GROUND_TRUTH,))
# The presets experiment.PRESETS takes in. Dictionaries a quarter as wide as the true features, as
# SynthSAEBench trains 4096 latents on its 16,384 features.
PRESETS: dict[str, dict[str, Any]] = {
    # Length, lr and L1 chosen by measurement (docs/synthetic.md#budget): at 1M samples most baselines
    # were still learning the true features; lr 3e-3 against 1e-3 for each architecture at 4M; L1 2.0
    # puts ReLU + L1 (and the studies built on it) near the true L0.
    "synth": dict(model="synth", dict_size=1024, tokens=4_000_000, batch_size=1024, lr=3e-3,
                  sparsity_penalty=2.0, warmup_steps=25, cache_dtype="float32", **_NO_LLM),
    # SynthSAEBench's training settings (lr 3e-4, batch 1024) on a cache of 4M samples: its 200M
    # would not fit a disk (SAELens streams them); meant for a GPU.
    "synth-16k": dict(model="synth-16k", dict_size=4096, tokens=4_000_000, batch_size=1024, lr=3e-4,
                      sparsity_penalty=0.1, warmup_steps=25, cache_dtype="float16", **_NO_LLM),
    "synth-tiny": dict(model="synth-tiny", dict_size=128, tokens=16_384, batch_size=256, lr=3e-3,
                       sparsity_penalty=0.1, warmup_steps=4, cache_dtype="float32", **_NO_LLM),
}


def is_synthetic(cfg) -> bool:
    return cfg.model in MODELS


def cache_fields(cfg) -> dict[str, Any]:
    """What, besides experiment.cache_key's fields, determines a synthetic run's activations:
    the synthetic model's whole configuration. Nothing for a language model (its keys stay)."""
    if not is_synthetic(cfg):
        return {}
    return dict(synthetic=MODELS[cfg.model].config.to_dict(), data_seed=DATA_SEED, synthetic_version=VERSION)


def load_model(name: str, device: torch.device):
    """MODELS[name]'s SyntheticModel where the harness expects the LLM (experiment.checked_model): its
    width as `cfg.d_model`, one layer, no context. From the cache (its files' sha256 checked),
    built and cached where missing or damaged."""
    config = MODELS[name].config
    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    folder = activations_dir() / f"synthetic-model-{key}"
    manifest = folder / "manifest.json"
    if manifest.exists() and _intact(folder, json.loads(manifest.read_text())):
        synthetic = SyntheticModel.load_from_disk(folder, device=str(device))
    else:
        console.print(f"Building the synthetic model {name} ({config.num_features} features in "
                      f"{config.hidden_dim} dimensions) into {folder}")
        synthetic = SyntheticModel(config, device=str(device))
        synthetic.save(folder)
        files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.name != "manifest.json"}
        atomic_write(manifest, json.dumps(files, indent=2))
    return types.SimpleNamespace(synthetic=synthetic, cfg=types.SimpleNamespace(d_model=config.hidden_dim, n_layers=1,
                                                                                n_ctx=1))


def _intact(folder: Path, sha256s: dict[str, str]) -> bool:
    return all((folder / name).exists() and file_sha256(folder / name) == digest for name, digest in sha256s.items())


def activation_data(cfg, model, progress, folder: Path) -> tuple[np.ndarray, torch.Tensor, float, bool]:
    """experiment.ActivationData's fields for a synthetic preset: cfg.tokens samples from
    DATA_SEED, memory-mapped from `folder` (checked against its manifest), generated there first
    where missing, stale or damaged. No evaluation tokens: the evaluation samples its own."""
    def generated(out: np.ndarray) -> None:
        task = progress.add_task(f"generate {cfg.model} activations", total=cfg.tokens, status="")
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(DATA_SEED)
            for row in range(0, cfg.tokens, CHUNK):
                n = min(CHUNK, cfg.tokens - row)
                out[row:row + n] = model.synthetic.sample(n).float().cpu().numpy()
                progress.update(task, completed=row + n)

    train, scale, from_cache = cached_activations(folder, (cfg.tokens, model.cfg.d_model), cfg.cache_dtype, generated,
                                                  "synthetic activations",
                                                  config=dict(model=cfg.model, data_seed=DATA_SEED))
    return train, torch.empty(0, dtype=torch.long), scale, from_cache


def check_run(names, cfg) -> str | None:
    """Why this run cannot be scored on this preset, or None: a synthetic run has only the
    ground-truth eval, only a synthetic run has it, and a run seeded as its synthetic model would
    start on the true features (MODEL_SEED's comment)."""
    if is_synthetic(cfg) and cfg.seed == MODELS[cfg.model].config.seed:
        return (f"--seed {cfg.seed} is the seed of {cfg.model}'s true features: the SAE's decoder would start on "
                f"them; use another --seed")
    if is_synthetic(cfg) and (needs_llm := [n for n in names if n != GROUND_TRUTH]):
        return (f"{', '.join(needs_llm)} need{'s' if len(needs_llm) == 1 else ''} a language model and its "
                f"tokenizer, and preset {cfg.preset} is synthetic: use --evals {GROUND_TRUTH}")
    if not is_synthetic(cfg) and GROUND_TRUTH in names:
        return (f"{GROUND_TRUTH} needs the true features, which only a synthetic preset has: "
                f"--preset {' or '.join(PRESETS)}")
    return None


@torch.no_grad()
def evaluate(info: dict, sae, model, cfg, device: torch.device) -> None:
    """SAELens's ground-truth scores of `sae` (evals.ScaledSAE: raw activations in and out) on
    MODELS[cfg.model].eval_samples fresh samples from EVAL_SEED, into info["metrics"]."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(EVAL_SEED)
        result = eval_sae_on_synthetic_data(sae, model.synthetic.feature_dict, model.synthetic.activation_generator,
                                            num_samples=MODELS[cfg.model].eval_samples, batch_size=CHUNK)
    found = result.classification
    info["metrics"] = dict(
        ground_truth=dict(mcc=result.mcc, f1=found.f1_score, precision=found.precision, recall=found.recall,
                          accuracy=found.accuracy,
                          uniqueness=result.uniqueness, true_l0=result.true_l0, dead_latents=result.dead_latents,
                          eval_samples=MODELS[cfg.model].eval_samples),
        sparsity=dict(l0=result.sae_l0, dead_fraction_eval=result.dead_latents / sae.cfg.d_sae),
        reconstruction_quality=dict(explained_variance_whole_set=result.explained_variance),
        shrinkage=dict(l2_ratio=result.shrinkage))
    if not np.isfinite([v for v in info["metrics"]["ground_truth"].values()]).all():
        raise HarnessError(f"the ground-truth evaluation gave a non-finite score: {info['metrics']['ground_truth']}")
