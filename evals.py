"""All the sae_bench glue: its evaluations, core included, run on the harness's own loaded model.

    EVAL_NAMES                          every name --evals accepts ("all" means all of them)
    parse_evals("core,absorption")      the names, checked
    check_requirements(evals, cfg)      refuses, before any work, an eval whose data, model or key is missing
    evaluate_core(sae, model, eval_tokens, cfg, device, cache_dir=...)   (core metrics, per-latent metrics);
                                        without cache_dir, every pass sae_bench's own (the reference)
    run_evals(evals, sae, model, cfg, eval_tokens, device, cache_dir=...)   {eval_type_id: sae_bench's result}
    ScaledSAE(sae, scale)               a trained SAE as sae_bench sees it (the model's own scale)
    evaluate(info, sae, model, eval_tokens, cfg, device, run_dir)    a run's evals into its final_info

The caller hands in the SAE (a sae_bench BaseSAE taking the model's raw activations), the model,
the held-out tokens and the run's config (an experiment.RunConfig, read here, never imported).

Core runs sae_bench's `run_evals` with the passes that do not depend on the SAE (clean, zero-ablated)
read from a cache under `cache_dir` (clean_reference), so a run's core evaluation runs the model
once to the hooked layer and once on from it with its SAE spliced in; its metrics are sae_bench's.

Each other eval calls sae_bench's own `run_eval` for the one SAE, with the harness's model handed over
where sae_bench would load one by hub name, inside a fresh temporary working directory (sae_bench
writes its artifacts relative to it, so nothing from an earlier run is reused; the one cache kept
is sae_probes' model activations, which depend only on the model and the hook). A result is
sae_bench's output (eval_config, eval_result_metrics, eval_result_details, ...) plus
`budget_overrides`: the config values this preset sets below sae_bench's defaults. An eval that
cannot produce a number for a legitimate reason says why under `not_scored`, with no metrics.

What each eval needs (check_requirements checks it):
  core, sae_probes, absorption  the model only (sae_probes' datasets ship in its package)
  sparse_probing, scr, tpp      datasets from the Hugging Face hub
  unlearning                    an instruction-tuned model sae_bench has a prompt format for
                                (gemma-2-2b-it, gemma-2-9b-it), the gated WMDP bio forget corpus
                                (WMDP_BIO_FORGET_CORPUS=path/to/bio-forget-corpus.jsonl) and hub datasets
  autointerp                    OPENAI_API_KEY (gpt-4o-mini writes and scores the explanations);
                                its text is the run's held-out evaluation contexts
and every eval but core needs a tokenizer, which the tiny model does not have.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable
from unittest import mock

from common import HarnessError, activations_dir, console, file_sha256  # first: its import guards

import frontier
import synthetic
from runs import EVAL_SEED, atomic_write, save_context_rows

import numpy as np
import torch
from sae_bench.custom_saes.base_sae import BaseSAE

RunConfig = Any  # experiment.RunConfig, handed in by the caller

EVAL_NAMES = ("core", "sparse_probing", "sae_probes", "absorption", "scr", "tpp", "unlearning", "autointerp")

# Config values that differ from sae_bench's defaults, per preset; the hub presets run its defaults.
# `embedded` fits a 2-core CPU, `tiny` is for tests (its context is 32 tokens, its SAE 256 latents).
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "embedded": {
        "sparse_probing": dict(probe_train_set_size=400, probe_test_set_size=100),
        "sae_probes": dict(dataset_names=["117_us_state_FL", "154_athlete_sport_football",
                                          "131_temp_cat_Typical Time"]),
        "scr": dict(train_set_size=400, test_set_size=100),
        "tpp": dict(train_set_size=400, test_set_size=100),
        "autointerp": dict(n_latents=50),
    },
    "tiny": {
        "sparse_probing": dict(probe_train_set_size=40, probe_test_set_size=20, context_length=32),
        "sae_probes": dict(dataset_names=["117_us_state_FL"]),
        "absorption": dict(max_k_value=3, k_sparse_probe_num_epochs=10),
        "scr": dict(train_set_size=40, test_set_size=20, context_length=32, n_values=[2, 5, 10, 20],
                    column1_vals_lookup={"LabHC/bias_in_bios_class_set1": [("professor", "nurse")],
                                         "canrager/amazon_reviews_mcauley_1and5": [("Books", "CDs_and_Vinyl")]}),
        "tpp": dict(train_set_size=40, test_set_size=20, context_length=32, n_values=[2, 5, 10, 20]),
        "unlearning": dict(dataset_names=["wmdp-bio", "high_school_us_history"], dataset_size=8,
                           seq_len=32, retain_thresholds=[0.01], n_features_list=[2], multipliers=[25]),
        "autointerp": dict(n_latents=4),
    },
}
# Absorption probes every single-token word of the vocabulary (140k for Gemma 3), each in a prompt
# of about 65 tokens; a CPU preset probes this many, drawn with EVAL_SEED. With fewer, a letter
# has too few test words for its probe's F1 to clear sae_bench's bar (README, "Absorption").
ABSORPTION_WORDS = {"embedded": 4000}
# The verdict budget trains longer on embedded's model and text: it evaluates on embedded's budget.
BUDGETS["embedded-4m"], ABSORPTION_WORDS["embedded-4m"] = BUDGETS["embedded"], ABSORPTION_WORDS["embedded"]
# Autointerp reads at most sae_bench's default number of tokens from the run's held-out contexts
# (on the hub presets they hold more; on embedded, 32 contexts of 128).
AUTOINTERP_MAX_TOKENS = 2_000_000
UNLEARNING_MODELS = ("gemma-2-2b-it", "gemma-2-9b-it")  # sae_bench's MCQ prompt formats exist for these only
FORGET_CORPUS_VAR = "WMDP_BIO_FORGET_CORPUS"
# sae_bench opens the forget corpus here, relative to the working directory
FORGET_CORPUS_PATH = Path("sae_bench/evals/unlearning/data/bio-forget-corpus.jsonl")
# The loaders run_evals takes (test doubles): what each replaces, in which sae_bench modules.
LOADERS = {
    "load_dataset": ("load_dataset", ("sae_bench.sae_bench_utils.dataset_utils",
                                      "sae_bench.evals.scr_and_tpp.dataset_creation",
                                      "sae_bench.evals.unlearning.utils.feature_activation",
                                      "sae_bench.evals.unlearning.utils.metrics")),
    "openai_client": ("OpenAI", ("sae_bench.evals.autointerp.main",)),
}


def parse_evals(text: str) -> tuple[str, ...]:
    """'core, absorption' -> ('core', 'absorption'); 'all' -> EVAL_NAMES; duplicates dropped."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in EVAL_NAMES + ("all", synthetic.GROUND_TRUTH)]
    if unknown:
        raise HarnessError(f"unknown eval {', '.join(unknown)}; choose from all, {', '.join(EVAL_NAMES)}, "
                           f"{synthetic.GROUND_TRUTH}")
    expanded = [e for n in names for e in (EVAL_NAMES if n == "all" else (n,))]
    return tuple(dict.fromkeys(expanded))


def _config(name: str, cfg: RunConfig, **fields: Any):
    """sae_bench's config for eval `name`: its defaults, this preset's budget, then `fields`."""
    module, cls = {
        "sparse_probing": ("sparse_probing", "SparseProbingEvalConfig"),
        "sae_probes": ("sparse_probing_sae_probes", "SparseProbingSaeProbesEvalConfig"),
        "absorption": ("absorption", "AbsorptionEvalConfig"),
        "scr": ("scr_and_tpp", "ScrAndTppEvalConfig"),
        "tpp": ("scr_and_tpp", "ScrAndTppEvalConfig"),
        "unlearning": ("unlearning", "UnlearningEvalConfig"),
        "autointerp": ("autointerp", "AutoInterpEvalConfig"),
    }[name]
    config_class = getattr(importlib.import_module(f"sae_bench.evals.{module}.eval_config"), cls)
    return config_class(random_seed=EVAL_SEED, **{**BUDGETS.get(cfg.preset, {}).get(name, {}), **fields})


def _hub_datasets(name: str, cfg: RunConfig) -> list[str]:
    """The hub repositories eval `name` reads."""
    if name == "unlearning":  # named inside sae_bench's unlearning code
        return ["wikitext", "cais/wmdp", "cais/mmlu"]
    if name in ("sparse_probing", "scr", "tpp"):  # sae_bench's subset names, e.g. ..._class_set1
        return sorted({re.sub(r"_class_set\d+$|_sentiment$", "", d) for d in _config(name, cfg).dataset_names})
    return []


def check_requirements(evals, cfg: RunConfig, *, loaders: dict[str, Callable] | None = None) -> None:
    """Raise HarnessError, in one line, naming every missing requirement of `evals` and how to
    provide it. `loaders` (as for run_evals) stand in for the hub and the API key."""
    loaders = loaders or {}
    if wrong_kind := synthetic.check_run(evals, cfg):
        raise HarnessError(wrong_kind)
    problems = []
    if cfg.model == "tiny" and set(evals) - {"core"}:
        problems.append("every eval but core reads text, and the tiny model has no tokenizer: use another preset")
    if "sae_probes" in evals and importlib.util.find_spec("sae_probes") is None:
        problems.append("sae_probes needs the package sae-probes: pip install -r requirements.txt")
    if "unlearning" in evals:
        if cfg.model.split("/")[-1] not in UNLEARNING_MODELS:
            problems.append(f"unlearning needs an instruction-tuned model sae_bench has a prompt format for "
                            f"({', '.join(UNLEARNING_MODELS)}), not {cfg.model}: e.g. "
                            "--preset gemma-2-2b --model google/gemma-2-2b-it")
        corpus = os.environ.get(FORGET_CORPUS_VAR)
        if not corpus or not Path(corpus).is_file():
            problems.append(f"unlearning needs the WMDP bio forget corpus, which is gated: request it at "
                            f"huggingface.co/datasets/cais/wmdp-bio-forget-corpus and set "
                            f"{FORGET_CORPUS_VAR}=path/to/bio-forget-corpus.jsonl"
                            + (f" ({corpus} is not a file)" if corpus else ""))
    if "autointerp" in evals and "openai_client" not in loaders and not os.environ.get("OPENAI_API_KEY"):
        problems.append("autointerp needs an OpenAI API key (gpt-4o-mini writes and scores the explanations): "
                        "set OPENAI_API_KEY")
    if "load_dataset" not in loaders:
        unreadable = functools.cache(_unreadable_on_hub)
        for name in evals:
            repos = _hub_datasets(name, cfg)
            why = next((w for w in map(unreadable, repos) if w), None)
            if why:
                problems.append(f"{name} needs the Hugging Face hub datasets {', '.join(repos)}, and {why}: "
                                "run with access to huggingface.co (HF_TOKEN for gated ones), or drop "
                                f"{name} from --evals")
    if problems:
        raise HarnessError("; ".join(problems))


def _unreadable_on_hub(repo: str) -> str | None:
    """Why `repo` cannot be read from the hub now, or None."""
    import huggingface_hub

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):  # read here, not at import
        return "HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.HfApi().dataset_info(repo, timeout=10)
    except Exception as exc:  # no network, no such repository, gated: each refuses the eval
        return f"{repo} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


def evaluate_core(sae, model, eval_tokens: torch.Tensor, cfg: RunConfig, device: torch.device,
                  cache_dir: Path | None = None, per_context: dict | None = None) -> tuple[dict, dict]:
    """sae_bench core metrics (every compute flag on) via its inner `run_evals` (its
    `multiple_evals` would swallow exceptions): (metrics, per-latent metrics as lists). Added,
    labelled as the harness's: the whole-set explained variance, the fraction of latents that never
    fire on the evaluation text, and each headline score's bootstrap standard error (`bootstrap_se`);
    `per_context`, given, receives the context rows they are computed from (context_rows).

    With `cache_dir`, what does not depend on the SAE (the clean and the zero-ablated pass) comes
    from a cache kept there (clean_reference), and the model runs once up to the hooked layer and
    once on from there with the SAE spliced in: sae_bench's metrics, to float rounding. Without it,
    or for a model with soft-capped logits (Gemma 2: the cached KL term needs logits linear in the
    final residual), sae_bench runs every pass itself, as it always did: the reference."""
    import datasets
    from sae_bench.evals.core import main as core
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae
    from sae_lens import ActivationsStore

    _, sae, _ = load_and_format_sae("custom_sae", sae, str(device))
    sae.cfg.context_size = cfg.context_size
    store = ActivationsStore.from_sae(
        model, sae, dataset=datasets.Dataset.from_dict({"input_ids": eval_tokens.tolist()}),
        context_size=cfg.context_size, streaming=False, store_batch_size_prompts=cfg.eval_batch_prompts,
        device=str(device))
    eval_cfg = core.CoreEvalConfig(
        model_name=cfg.model, batch_size_prompts=cfg.eval_batch_prompts,
        n_eval_reconstruction_batches=cfg.eval_reconstruction_batches,
        n_eval_sparsity_variance_batches=cfg.eval_sparsity_batches, context_size=cfg.context_size,
        compute_kl=True, compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True, exclude_special_tokens_from_reconstruction=True)
    special = special_tokens(model, eval_tokens)
    run_core = functools.partial(core.run_evals, sae, store, model, eval_cfg, ignore_tokens=special)
    if cache_dir is None or model.cfg.output_logits_soft_cap > 0:
        metrics, feature_metrics, variance, losses = _sae_bench_passes(run_core, sae, model, eval_tokens, cfg,
                                                                       special, device)
    else:
        metrics, feature_metrics, variance, losses = _cached_passes(run_core, sae, model, eval_tokens, cfg,
                                                                    special, device, Path(cache_dir))
    metrics["reconstruction_quality"]["explained_variance_whole_set"] = whole_set_explained_variance(variance)
    metrics["sparsity"]["dead_fraction_eval"] = float(np.mean(np.asarray(feature_metrics["feature_density"]) == 0))
    metrics["bootstrap_se"] = bootstrap_standard_errors(variance, losses)
    if per_context is not None:  # kept in the run folder: a verdict's paired bootstrap resamples them
        per_context.update(context_rows(variance, losses))
    return metrics, {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in feature_metrics.items()}


def special_tokens(model, eval_tokens: torch.Tensor) -> set[int]:
    """The tokens sae_bench leaves out of its means; without a tokenizer (the tiny model), BOS,
    every context's first token."""
    tokenizer = model.tokenizer
    return ({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} if tokenizer is not None
            else {int(eval_tokens[0, 0])}) - {None}


def _sae_bench_passes(run_core: Callable, sae, model, eval_tokens: torch.Tensor, cfg: RunConfig,
                      special: set[int], device: torch.device):
    """sae_bench's own passes (clean, spliced, zero-ablated; to the hooked layer), then one more to
    the hooked layer for the variance sums: (metrics, feature metrics, variance rows, loss rows)."""
    from sae_bench.evals.core import main as core

    losses: dict[str, list[torch.Tensor]] = {}
    with mock.patch.object(core, "get_recons_loss", _per_context(core.get_recons_loss, special, losses)):
        metrics, feature_metrics = run_core()
    return metrics, feature_metrics, _variance_sums(sae, model, eval_tokens, cfg, special, device), losses


def _cached_passes(run_core: Callable, sae, model, eval_tokens: torch.Tensor, cfg: RunConfig,
                   special: set[int], device: torch.device, cache_dir: Path):
    """sae_bench's run_evals with its model passes replaced: the clean and zero-ablated values
    from the cache, the hooked layer's activations computed once per batch (the sparsity pass and
    the variance sums read them too), the rest of the model run from there with the SAE spliced in."""
    from sae_bench.evals.core import main as core

    reference = clean_reference(model, eval_tokens, cfg, device, cache_dir)
    activations = _EvalActivations(model, cfg, eval_tokens, sae, special)
    spliced = functools.partial(_spliced_losses, reference=reference, activations=activations,
                                unembed=_Unembedding(model))
    losses: dict[str, list[torch.Tensor]] = {}
    with (mock.patch.object(core, "get_recons_loss", _per_context(spliced, special, losses)),
          mock.patch.object(model, "run_with_cache", activations.run_with_cache)):
        metrics, feature_metrics = run_core()
    return metrics, feature_metrics, activations.variance_sums(), losses


def _per_context(get_recons_loss: Callable, special: set[int], losses: dict[str, list[torch.Tensor]]) -> Callable:
    """sae_bench's `get_recons_loss`, also keeping each context's (sum, count) of every per-token
    value over the tokens sae_bench's mean keeps (special ones excluded): the bootstrap's rows."""
    def recording(sae, model, batch_tokens, *args, **kwargs):
        result = get_recons_loss(sae, model, batch_tokens, *args, **kwargs)
        keep = ~torch.isin(batch_tokens, torch.tensor(sorted(special), device=batch_tokens.device))
        for name, value in result.items():
            mask = keep[:, : value.shape[1]]  # the CE losses have one position fewer
            losses.setdefault(name, []).append(
                torch.stack([(value * mask).sum(1), mask.sum(1)], 1).double().cpu())
        return result
    return recording


@torch.no_grad()
def _variance_sums(sae, model, eval_tokens: torch.Tensor, cfg: RunConfig, special: set[int],
                   device: torch.device) -> np.ndarray:
    """Per evaluation context, over its non-special tokens: [Σ‖x − x̂‖², Σ‖x‖², n, Σx (d_in)],
    in float64 (Gemma's outlier tokens reach norms in the thousands)."""
    rows = []
    for tokens in eval_tokens.split(cfg.eval_batch_prompts):
        tokens = tokens.to(device)
        _, cache = model.run_with_cache(tokens, names_filter=cfg.hook_name, stop_at_layer=cfg.layer + 1)
        rows.append(_variance_row(sae, cache[cfg.hook_name], tokens, special))
    return torch.cat(rows).numpy()


@torch.no_grad()
def _variance_row(sae, x: torch.Tensor, tokens: torch.Tensor, special: set[int]) -> torch.Tensor:
    """_variance_sums' rows for one batch of contexts, from their activations x."""
    keep = ~torch.isin(tokens, torch.tensor(sorted(special), device=tokens.device)).unsqueeze(-1)
    error = (x.double() - sae(x).double()) * keep
    x = x.double() * keep
    return torch.cat([error.pow(2).sum((1, 2))[:, None], x.pow(2).sum((1, 2))[:, None],
                      keep.sum((1, 2))[:, None].double(), x.sum(1)], 1).cpu()


# ----------------------------------------------------------------------------------------------
# The cached path. The clean and the zero-ablated pass depend on the model, the layer and the
# evaluation tokens alone: computed once, kept on disk. What the KL with the SAE needs of the clean
# pass is three numbers and one d_model vector per position, not its logits: with p the clean
# probabilities, z = h·W_U + b_U the spliced pass's logits and log q = z − logsumexp(z),
#     KL(p‖q) = Σ p log p − Σ p log q = Σ p log p − (h · W_U p + b_U · p) + logsumexp(z) · Σ p.
# p is sae_bench's fp32 softmax, whose sum over Gemma 3's 262k tokens misses 1 by up to ~1e-5:
# keeping Σ p keeps sae_bench's KL to ~1e-7, where exact probabilities would move it by ~1e-5.

REFERENCE_VERSION = 2  # bump when what clean_reference stores, or how, changes
REFERENCE_FIELDS = {"ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_with_ablation", "neg_entropy",
                    "expected_unembedding", "expected_bias", "probability_mass"}
LOGIT_CHUNK = 1 << 26  # logits computed at a time (positions × vocabulary): 256 MiB in fp32


def clean_reference(model, eval_tokens: torch.Tensor, cfg: RunConfig, device: torch.device,
                    cache_dir: Path) -> dict[str, torch.Tensor]:
    """What the core eval needs of the clean and the zero-ablated pass over the reconstruction
    contexts (per position: `_reference_values`), read from cache_dir/core_reference/ or computed
    there first. The file is named by a sha256 of what the values are computed from; its own
    sha256, in the manifest beside it, is checked on every read, and a stale or damaged file is
    computed again, never read."""
    from safetensors.torch import load_file, save_file

    source = _reference_source(model, eval_tokens, cfg, device)
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir).resolve() / "core_reference"
    path, manifest_path = folder / f"{key[:16]}.safetensors", folder / f"{key[:16]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        manifest = json.loads(manifest_path.read_text())
        if manifest["key"] == key and file_sha256(path) == manifest["sha256"]:
            values = load_file(path)
            if set(values) == REFERENCE_FIELDS:
                return {name: value.to(device) for name, value in values.items()}
    values = _reference_values(model, eval_tokens, cfg, device)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{key[:16]}.{os.getpid()}.partial"  # renamed into place whole
    save_file({k: v.contiguous().cpu() for k, v in values.items()}, partial)
    digest = file_sha256(partial)
    os.replace(partial, path)
    _atomic_write(manifest_path, json.dumps(dict(key=key, sha256=digest, computed_from=source), indent=2))
    return values


def _reference_source(model, eval_tokens: torch.Tensor, cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """Everything clean_reference's values are computed from: the model (its weights by sample),
    the hook, the reconstruction contexts and their batching, the kernels and the libraries."""
    contexts = eval_tokens[: cfg.eval_batch_prompts * cfg.eval_reconstruction_batches].cpu().contiguous()
    return dict(
        version=REFERENCE_VERSION, model=cfg.model, model_name=model.cfg.model_name, weights=_weights_sample(model),
        dtype=str(model.cfg.dtype), device=device.type, hook=cfg.hook_name, batch_prompts=cfg.eval_batch_prompts,
        tokens=hashlib.sha256(contexts.numpy().tobytes()).hexdigest(), tokens_shape=list(contexts.shape),
        deterministic=torch.are_deterministic_algorithms_enabled(),
        libraries={name: importlib.metadata.version(name) for name in ("torch", "transformer_lens", "sae_bench")})


def _weights_sample(model, per_tensor: int = 4096) -> str:
    """A sha256 of the model's parameter names, shapes and an evenly spaced sample of each one's
    values: hashing every weight would cost as much as a good part of the evaluation."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        flat = value.detach().flatten()
        sample = flat[:: max(1, len(flat) // per_tensor)].float().cpu().numpy()
        digest.update(f"{name}{list(value.shape)}{value.dtype}".encode() + sample.tobytes())
    return digest.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def _reference_values(model, eval_tokens: torch.Tensor, cfg: RunConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The clean and the zero-ablated pass exactly as sae_bench's get_recons_loss runs them, over
    the reconstruction contexts in its batches; per position: the clean and the zero-ablated CE
    (positions - 1), the zero-ablated KL, and of the clean distribution p: Σ p log p, W_U p,
    b_U · p and Σ p (float64: the KL with the SAE is their small difference with logsumexp)."""
    n_contexts = cfg.eval_batch_prompts * cfg.eval_reconstruction_batches
    zero_ablate = [(cfg.hook_name, lambda acts, hook: torch.zeros_like(acts))]
    unembed = _Unembedding(model)
    parts: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for tokens in eval_tokens[:n_contexts].split(cfg.eval_batch_prompts):
        tokens = tokens.to(device)
        logits, clean_ce = model(tokens, return_type="both", loss_per_token=True)
        ablated_logits, ablated_ce = model.run_with_hooks(tokens, return_type="both", fwd_hooks=zero_ablate,
                                                          loss_per_token=True)
        parts["ce_loss_without_sae"].append(clean_ce)
        parts["ce_loss_with_ablation"].append(ablated_ce)
        for name, value in _clean_distribution_terms(logits, ablated_logits, unembed).items():
            parts[name].append(value)
        del logits, ablated_logits
    return {name: torch.cat(values) for name, values in parts.items()}


def _clean_distribution_terms(logits: torch.Tensor, ablated_logits: torch.Tensor, unembed) -> dict[str, torch.Tensor]:
    """Per position, over chunks of positions: sae_bench's KL(clean ‖ zero-ablated), in its own
    arithmetic (softmax, then log), and of its clean probabilities p (fp32, as its KL with the SAE
    reads them): Σ p log p, W_U p, b_U · p and Σ p, summed in float64."""
    shape = logits.shape[:-1]
    logits, ablated_logits = logits.flatten(0, -2), ablated_logits.flatten(0, -2)
    found: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for rows in torch.arange(len(logits), device=logits.device).split(max(1, LOGIT_CHUNK // logits.shape[-1])):
        p = torch.nn.functional.softmax(logits[rows], dim=-1)
        log_p = torch.log(p)
        log_q = torch.log(torch.nn.functional.softmax(ablated_logits[rows], dim=-1))
        found["kl_div_with_ablation"].append((p * (log_p - log_q)).sum(dim=-1))
        found["neg_entropy"].append((p * log_p).sum(dim=-1, dtype=torch.float64))
        del log_p, log_q
        p = p.double()
        found["expected_unembedding"].append(p @ unembed.weight_double)
        found["expected_bias"].append(p @ unembed.bias_double)
        found["probability_mass"].append(p.sum(dim=-1))
    return {name: torch.cat(values).unflatten(0, shape) for name, values in found.items()}


class _Unembedding:
    """The model's unembedding as TransformerLens computes it (F.linear with W_U transposed and
    contiguous), with that transpose made once rather than on every call; and W_U, b_U in float64."""

    def __init__(self, model):
        self.weight = model.unembed.W_U.T.contiguous()
        self.bias = model.unembed.b_U

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h, self.weight, self.bias)

    @functools.cached_property
    def weight_double(self) -> torch.Tensor:
        return self.weight.double()  # (d_vocab, d_model): p @ it is W_U p

    @functools.cached_property
    def bias_double(self) -> torch.Tensor:
        return self.bias.double()


class _EvalActivations:
    """The hooked layer's activations per batch of evaluation contexts, each batch's computed once
    (the forward stopped there) with the attention mask the model's own forward would use. The
    spliced pass keeps what it computes for sae_bench's sparsity pass, which reads it last; each
    batch's variance sums (`_variance_sums`' rows) are taken when it is first computed."""

    def __init__(self, model, cfg: RunConfig, eval_tokens: torch.Tensor, sae, special: set[int]):
        self.model, self.cfg, self.sae, self.special = model, cfg, sae, special
        self.batches = list(eval_tokens.split(cfg.eval_batch_prompts))
        self.index = {self._key(batch): i for i, batch in enumerate(self.batches)}
        self.kept: dict[int, tuple] = {}
        self.variance: dict[int, torch.Tensor] = {}

    @staticmethod
    def _key(tokens: torch.Tensor) -> bytes:
        return str(list(tokens.shape)).encode() + tokens.long().cpu().numpy().tobytes()

    def batch_index(self, tokens: torch.Tensor) -> int:
        """Which batch of the evaluation contexts `tokens` is (sae_bench's store hands them in order)."""
        try:
            return self.index[self._key(tokens)]
        except KeyError:
            raise HarnessError("sae_bench's core eval batched the evaluation contexts other than "
                               f"{self.cfg.eval_batch_prompts} at a time, in order: the cached path needs that") from None

    def __call__(self, tokens: torch.Tensor, keep: bool = False) -> tuple:
        """(activations, attention mask, shortformer position embedding) of this batch."""
        index = self.batch_index(tokens)
        if index in self.kept:
            return self.kept[index] if keep else self.kept.pop(index)
        found = self._forward(tokens)
        self.variance[index] = _variance_row(self.sae, found[0], tokens, self.special)
        if keep:
            self.kept[index] = found
        return found

    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor) -> tuple:
        residual, tokens, shortformer, attention_mask = self.model.input_to_embed(tokens)
        acts = self.model(residual, start_at_layer=0, stop_at_layer=self.cfg.layer + 1, tokens=tokens,
                          shortformer_pos_embed=shortformer, attention_mask=attention_mask)
        return acts, attention_mask, shortformer

    def run_with_cache(self, tokens: torch.Tensor, *args, names_filter, **kwargs):
        """Stands in for model.run_with_cache in sae_bench's sparsity pass, which reads the hooked layer."""
        assert list(names_filter) == [self.cfg.hook_name], names_filter
        return None, {self.cfg.hook_name: self(tokens)[0]}

    def variance_sums(self) -> np.ndarray:
        """`_variance_sums` over every evaluation context: the batches no pass read computed now."""
        for index, tokens in enumerate(self.batches):
            if index not in self.variance:
                self(tokens.to(self.model.cfg.device))
        return torch.cat([self.variance[i] for i in range(len(self.batches))]).numpy()


@torch.no_grad()
def _spliced_losses(sae, model, batch_tokens: torch.Tensor, *args, reference: dict[str, torch.Tensor],
                    activations: _EvalActivations, unembed: _Unembedding, ignore_tokens: set[int],
                    **kwargs) -> dict[str, torch.Tensor]:
    """Stands in for sae_bench's get_recons_loss (every compute flag on, special tokens kept out of
    the reconstruction): the same five per-token values, from one pass that starts at the hooked
    layer with the SAE's reconstruction spliced in and the cached clean and zero-ablated values.
    Logits are made only where sae_bench's means read them (positions holding no special token)."""
    start = activations.batch_index(batch_tokens) * activations.cfg.eval_batch_prompts
    rows = slice(start, start + len(batch_tokens))
    acts, attention_mask, shortformer = activations(batch_tokens, keep=True)
    keep = ~torch.isin(batch_tokens, torch.tensor(sorted(ignore_tokens), device=batch_tokens.device))
    reconstructed = sae.decode(sae.encode(acts.to(sae.device))).to(acts.dtype).to(acts.device)
    spliced = torch.where(keep[..., None], reconstructed, acts)
    residual = model(spliced, start_at_layer=activations.cfg.layer + 1, stop_at_layer=model.cfg.n_layers,
                     shortformer_pos_embed=shortformer, attention_mask=attention_mask)
    h = model.ln_final(residual) if model.cfg.normalization_type is not None else residual
    log_normaliser, ce = _logit_terms(unembed, h, batch_tokens, keep)
    cross = (h.double() * reference["expected_unembedding"][rows]).sum(-1) + reference["expected_bias"][rows]
    mass = reference["probability_mass"][rows]
    kl = torch.where(keep, reference["neg_entropy"][rows] - cross + log_normaliser * mass, 0.0)
    return dict(kl_div_with_sae=kl.to(ce.dtype), kl_div_with_ablation=reference["kl_div_with_ablation"][rows],
                ce_loss_with_sae=ce[:, :-1], ce_loss_without_sae=reference["ce_loss_without_sae"][rows],
                ce_loss_with_ablation=reference["ce_loss_with_ablation"][rows])


def _logit_terms(unembed: _Unembedding, h: torch.Tensor, tokens: torch.Tensor,
                 keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (0 where not kept): the logits' log-normaliser (logsumexp, float64) and the
    CE of the next token as TransformerLens computes it (−log_softmax, gathered), the logits made a
    chunk of kept positions at a time. log_softmax is one fused pass (faster than logsumexp); the
    log-normaliser is the top logit less its log-prob, which log_softmax rounds only once."""
    log_normaliser = torch.zeros(keep.numel(), dtype=torch.float64, device=h.device)
    ce = torch.zeros(keep.numel(), dtype=h.dtype, device=h.device)
    next_tokens = tokens.roll(-1, dims=1).flatten()  # the last position's is a stand-in: its CE is not used
    kept = keep.flatten().nonzero().squeeze(1)
    h = h.flatten(0, 1)
    for rows in kept.split(max(1, LOGIT_CHUNK // unembed.weight.shape[0])):
        logits = unembed(h[rows])
        log_probs = torch.log_softmax(logits, dim=-1)
        top, top_token = logits.max(dim=-1)
        log_normaliser[rows] = top.double() - log_probs.gather(-1, top_token[:, None])[:, 0].double()
        ce[rows] = -log_probs.gather(-1, next_tokens[rows, None])[:, 0]
    return log_normaliser.view(keep.shape), ce.view(keep.shape)


def whole_set_explained_variance(variance: np.ndarray) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over every evaluation token, x̄ their mean (the field's
    definition: dictionary_learning's, sparsify's, SAELens's); rows as `_variance_sums` gives."""
    total = variance.sum(0)
    sse, squares, n, x_sum = total[0], total[1], total[2], total[3:]
    return float(1 - sse / (squares - x_sum @ x_sum / n))


def _score(losses: np.ndarray, name: str) -> float:
    """sae_bench's CE-loss or KL score from rows of [(sum, count) per loss]: the token means."""
    mean = {k: v[:, 0].sum() / v[:, 1].sum() for k, v in zip(SCORE_PARTS[name], losses.transpose(1, 0, 2))}
    if name == "ce_loss_score":
        return (mean["ce_loss_with_ablation"] - mean["ce_loss_with_sae"]) / (
            mean["ce_loss_with_ablation"] - mean["ce_loss_without_sae"])
    return (mean["kl_div_with_ablation"] - mean["kl_div_with_sae"]) / mean["kl_div_with_ablation"]


SCORE_PARTS = {"ce_loss_score": ("ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation"),
               "kl_div_score": ("kl_div_with_sae", "kl_div_with_ablation")}


def context_rows(variance: np.ndarray, losses: dict[str, list[torch.Tensor]]) -> dict[str, np.ndarray]:
    """Per evaluation context, what each headline score (frontier's names) is computed from: the
    variance sums, and each score's loss parts as (contexts, parts, [sum, count])."""
    return {"explained_variance": variance, **{
        name: np.stack([torch.cat(losses[part]).numpy() for part in parts], 1) for name, parts in SCORE_PARTS.items()}}


def score_of(name: str) -> Callable[[np.ndarray], float]:
    """The headline score `name` (frontier's names) as a function of its context rows."""
    return whole_set_explained_variance if name == "explained_variance" else functools.partial(_score, name=name)


def bootstrap_standard_errors(variance: np.ndarray, losses: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """Each headline score's standard error over evaluation contexts resampled with replacement
    (frontier.bootstrap_se: seeded, so a run always gets the same one; None below 2 contexts)."""
    rows = context_rows(variance, losses)
    found = {"explained_variance_whole_set" if name == "explained_variance" else name:
             frontier.bootstrap_se(values, score_of(name)) for name, values in rows.items()}
    return {**found, "contexts": len(rows["explained_variance"])}


class _LoadedModel:
    """Stands in for `HookedTransformer` in an sae_bench eval module whose `run_eval` loads the
    model by hub name: it hands over the harness's model instead."""

    def __init__(self, model):
        self.model = model

    def from_pretrained_no_processing(self, *args, **kwargs):
        return self.model


def run_evals(evals, sae, model, cfg: RunConfig, eval_tokens: torch.Tensor, device: torch.device, *,
              cache_dir: Path, loaders: dict[str, Callable] | None = None) -> dict[str, dict]:
    """Run every eval in `evals` except core (evaluate_core does that) on `sae` (a BaseSAE taking
    the model's raw activations; it is copied, never changed) and return {eval_type_id: result}.
    Exceptions propagate. `cache_dir` keeps what reads the model alone between runs (sae_probes'
    activations, absorption's first-letter probe). `loaders` replaces what sae_bench reads from outside, for tests:
      "load_dataset":  called as sae_bench calls datasets.load_dataset, e.g. ("LabHC/bias_in_bios"),
                       ("Helsinki-NLP/europarl", "en-fr", streaming=True, split="train"),
                       ("cais/mmlu", "human_aging", split="test")
      "openai_client": called as openai.OpenAI(api_key=...); sae_bench then calls
                       client.chat.completions.create(model=, messages=, n=, max_tokens=, stream=False)
    """
    loaders = loaders or {}
    if set(loaders) - set(LOADERS):
        raise ValueError(f"unknown loaders {sorted(set(loaders) - set(LOADERS))}; known: {sorted(LOADERS)}")
    results = {}
    with contextlib.ExitStack() as stack:
        for key, replacement in loaders.items():
            attribute, modules = LOADERS[key]
            for module in modules:
                stack.enter_context(mock.patch.object(importlib.import_module(module), attribute, replacement))
        for name in evals:
            if name == "core":
                continue
            with _sandbox(model, EVAL_SEED) as workdir:
                # a copy: sae_bench casts, moves and relabels the SAE it is given
                runner = RUNNERS[name]
                if name in ("sae_probes", "absorption"):  # each keeps what reads the model alone
                    runner = functools.partial(runner, cache_dir=cache_dir)
                result = runner(copy.deepcopy(sae), model, cfg, eval_tokens, str(device), workdir)
            result["budget_overrides"] = _budget_overrides(name, cfg.preset)
            results[result["eval_type_id"]] = json.loads(json.dumps(result, default=str))
    return results


def _budget_overrides(name: str, preset: str) -> dict[str, Any]:
    overrides = dict(BUDGETS.get(preset, {}).get(name, {}))
    if name == "absorption" and preset in ABSORPTION_WORDS:
        overrides["vocabulary_words"] = ABSORPTION_WORDS[preset]
    return overrides


@contextlib.contextmanager
def _sandbox(model, seed: int):
    """Yields a fresh temporary folder for sae_bench's files. Meanwhile: seeded RNGs, gradients
    on, sae_bench's runtime shape checks off; the tokenizer's padding and truncation sides are
    put back afterwards (sae_probes sets them for its own use). The shape checks wrongly reject
    sparse probing's k-sparse probes with the pinned jaxtyping (README, "Evaluations")."""
    import jaxtyping

    tokenizer = model.tokenizer
    sides, checks_off = (tokenizer.padding_side, tokenizer.truncation_side), jaxtyping.config.jaxtyping_disable
    _reseed(seed)
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        with tempfile.TemporaryDirectory(prefix="sae_bench_") as workdir, torch.enable_grad():
            yield Path(workdir)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
        jaxtyping.config.update("jaxtyping_disable", checks_off)


def _reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _llm_fields(cfg: RunConfig, model) -> dict[str, Any]:
    return dict(model_name=model.cfg.model_name, llm_batch_size=cfg.llm_batch_size,
                llm_dtype=str(model.cfg.dtype).removeprefix("torch."))


def _run_eval(module, config, sae, cfg: RunConfig, device: str, workdir: Path, model=None, **kwargs) -> dict | None:
    """sae_bench's `run_eval` in `module` for this one SAE, run from `workdir` (it writes its
    artifacts relative to the working directory): its result, or None where it stopped without
    one. `model` is handed over where `run_eval` would load one by hub name."""
    (workdir / "results").mkdir(exist_ok=True)  # absorption writes its result there without making it
    with contextlib.chdir(workdir), (mock.patch.object(module, "HookedTransformer", _LoadedModel(model))
                                     if model is not None else contextlib.nullcontext()):
        results = module.run_eval(config=config, selected_saes=[(cfg.plugin.replace("/", "_"), sae)],
                                  device=device, output_path="results", **kwargs)
    return next(iter(results.values()), None)


def _sparse_probing(sae, model, cfg, eval_tokens, device, workdir) -> dict:
    from sae_bench.evals.sparse_probing import main

    config = _config("sparse_probing", cfg, **_llm_fields(cfg, model))
    return _run_eval(main, config, sae, cfg, device, workdir, model)


def _scr_or_tpp(perform_scr: bool, sae, model, cfg, eval_tokens, device, workdir) -> dict:
    from sae_bench.evals.scr_and_tpp import main

    config = _config("scr" if perform_scr else "tpp", cfg, perform_scr=perform_scr, **_llm_fields(cfg, model))
    return _run_eval(main, config, sae, cfg, device, workdir, model)


def _sae_probes(sae, model, cfg, eval_tokens, device, workdir, *, cache_dir: Path) -> dict:
    """sae_probes would load the model itself: its activations are made first, with ours, in a
    cache kept next to the harness's activations (sae_probes regenerates a file of the wrong length)."""
    from sae_bench.evals.sparse_probing_sae_probes import main
    from sae_probes.generate_model_activations import ensure_dataset_activations

    cache = Path(cache_dir).resolve() / "sae_probes"
    config = _config("sae_probes", cfg, model_name=model.cfg.model_name, model_cache_path=str(cache))
    ensure_dataset_activations(model_name=config.model_name, dataset_short_names=config.dataset_names,
                               hook_names=[cfg.hook_name], model_cache_path=cache, device=device, model=model)
    return _run_eval(main, config, sae, cfg, device, workdir)


def _absorption(sae, model, cfg, eval_tokens, device, workdir, *, cache_dir: Path) -> dict:
    """sae_bench keeps absorption's probes and results inside its own package folder and stops
    without a result when too few first letters are linearly decodable: here the results go to the
    work folder, the first-letter probe (trained on the model alone) to a cache shared by every run
    on that model and layer, and the stop becomes a `not_scored` result."""
    from sae_bench.evals.absorption import main

    config = _config("absorption", cfg, **_llm_fields(cfg, model))
    sae = unit_decoder_rows(sae)
    k_sparse_dir, probes_dir = workdir / "k_sparse_probing", _absorption_probe(model, cfg, config, cache_dir, device)
    _reseed(EVAL_SEED)  # the same random state after the probe whether it was trained now or read back
    patches = [
        mock.patch.object(main, "run_k_sparse_probing_experiment", functools.partial(
            main.run_k_sparse_probing_experiment, experiment_dir=k_sparse_dir, probes_dir=probes_dir)),
        mock.patch.object(main, "run_feature_absortion_experiment", functools.partial(
            main.run_feature_absortion_experiment, experiment_dir=workdir / "feature_absorption",
            sparse_probing_experiment_dir=k_sparse_dir, probes_dir=probes_dir)),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches + _absorption_vocabulary(model, cfg):
            stack.enter_context(patch)
        result = _run_eval(main, config, sae, cfg, device, workdir, model)
    if result is not None:
        return result
    (probe_file,) = (workdir / "artifacts" / "absorption").glob("*_k_sparse_probing.json")
    f1 = {row["letter"]: row["f1_probe"] for row in json.loads(probe_file.read_text())}
    found = sum(v > config.min_GT_probe_f1 for v in f1.values())
    return dict(eval_type_id="absorption_first_letter", eval_config=dataclasses.asdict(config),
                eval_result_metrics={}, eval_result_details=[],
                eval_result_unstructured={"first_letter_probe_f1": f1},
                not_scored=f"{model.cfg.model_name} layer {cfg.layer}: a linear probe reads the first letter "
                           f"of a word with F1 > {config.min_GT_probe_f1} for {found} of 26 letters; sae_bench "
                           f"needs {config.min_feats_for_eval} to measure absorption"
                           + (f" (probes trained on this preset's {ABSORPTION_WORDS[cfg.preset]} words, not the "
                              "whole vocabulary)" if cfg.preset in ABSORPTION_WORDS else ""))


def unit_decoder_rows(sae):
    """`sae` (the copy run_evals hands an eval) changed to move each decoder row's norm into its
    latent: f_i‖d_i‖ and d_i/‖d_i‖, the same f_i d_i. Absorption reads latent i's share along the
    probe direction p as f_i · cos(d_i, p), true only for unit rows; the harness's rows carry the
    activation scale (norm 1/scale, about 130 on Gemma 3), and unfolded every absorption read 0."""
    norms = sae.W_dec.norm(dim=1).clamp_min(1e-12)
    encode, decode = sae.encode, sae.decode
    sae.W_dec.data /= norms[:, None]
    sae.encode = lambda x: encode(x) * norms.to(x.device)
    sae.decode = lambda f: decode(f / norms.to(f.device))
    return sae


def _absorption_vocabulary(model, cfg) -> list:
    """The patches absorption runs under: the preset's capped vocabulary, and the model stopped
    after the hooked layer (sae_bench caches only that layer's activations but runs the whole
    model, unembedding included: over half of Gemma 3's compute, for the same activations)."""
    from sae_bench.evals.absorption import common, feature_absorption

    patches = [mock.patch.object(model, "run_with_cache", functools.partial(model.run_with_cache,
                                                                            stop_at_layer=cfg.layer + 1))]
    if cfg.preset in ABSORPTION_WORDS:
        words = _capped_vocabulary(common.get_alpha_tokens, ABSORPTION_WORDS[cfg.preset], EVAL_SEED)
        patches += [mock.patch.object(common, "get_alpha_tokens", words),
                    mock.patch.object(feature_absorption, "get_alpha_tokens", words)]
    return patches


def _absorption_probe(model, cfg, config, cache_dir: Path, device: str) -> Path:
    """The folder holding sae_bench's first-letter probe for this model, layer, vocabulary, seed
    and prompt, trained once (with EVAL_SEED) and kept: it reads the model, not the SAE."""
    from sae_bench.evals.absorption import common

    key = json.dumps([cfg.model, model.cfg.model_name, cfg.layer, ABSORPTION_WORDS.get(cfg.preset), EVAL_SEED,
                      config.prompt_template, config.prompt_token_pos, importlib.metadata.version("sae_bench")])
    folder = Path(cache_dir).resolve() / "absorption_probes" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (folder / model.cfg.model_name / f"layer_{cfg.layer}" / "probe.pth").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with (tempfile.TemporaryDirectory(dir=folder.parent, ignore_cleanup_errors=True) as partial,
              contextlib.ExitStack() as stack):
            for patch in _absorption_vocabulary(model, cfg):
                stack.enter_context(patch)
            _reseed(EVAL_SEED)
            common.train_and_save_probes(model, layers=[cfg.layer], probes_dir=partial, device=device,
                                         base_template=config.prompt_template, pos_idx=config.prompt_token_pos)
            (Path(partial) / "key.json").write_text(key)
            with contextlib.suppress(OSError):  # another process kept the same probe first
                os.rename(partial, folder)
    return folder


def _capped_vocabulary(get_alpha_tokens, limit: int, seed: int):
    """At most `limit` words, an equal share per first letter: sae_bench's k-sparse probing
    crashes (KeyError) on a letter that has test words but no training word, which a plain
    sample of a few rare letters produces. Sorted before sampling, because the tokenizer's
    vocabulary comes in a different order in every process."""
    def words(tokenizer, *args, **kwargs):
        found = sorted(get_alpha_tokens(tokenizer, *args, **kwargs))
        if len(found) <= limit:
            return found
        by_letter: dict[str, list[str]] = {}
        for word in found:
            by_letter.setdefault(word.strip()[0].lower(), []).append(word)
        rng, share = random.Random(seed), limit // len(by_letter)
        return [word for letter in sorted(by_letter)
                for word in rng.sample(by_letter[letter], min(share, len(by_letter[letter])))]
    return words


def _unlearning(sae, model, cfg, eval_tokens, device, workdir) -> dict:
    """sae_bench opens the forget corpus at a fixed path under the working directory."""
    from sae_bench.evals.unlearning import main
    from sae_bench.evals.unlearning.main import get_metrics_df

    (workdir / FORGET_CORPUS_PATH).parent.mkdir(parents=True)
    (workdir / FORGET_CORPUS_PATH).symlink_to(Path(os.environ[FORGET_CORPUS_VAR]).resolve())
    config = _config("unlearning", cfg, **_llm_fields(cfg, model))
    tables = []  # each intervention's accuracies, which sae_bench reduces to one score and deletes

    def kept(metrics_dir):
        tables.append(table := get_metrics_df(metrics_dir))
        return table

    with mock.patch.object(main, "get_metrics_df", kept):
        result = _run_eval(main, config, sae, cfg, device, workdir, model)
    # one row per (retain threshold, features ablated, multiplier): each dataset's accuracy
    result["eval_result_unstructured"] = {"interventions": tables[0].sort_values(
        ["retain_thres", "n_features", "multiplier"]).to_dict("records")}
    return result


def _autointerp(sae, model, cfg, eval_tokens, device, workdir) -> dict:
    """Autointerp's text is the run's held-out evaluation contexts (BOS first, like sae_bench's)."""
    from sae_bench.evals.autointerp import main
    from sae_bench.sae_bench_utils import dataset_utils

    context = eval_tokens.shape[1]
    config = _config("autointerp", cfg, dataset_name=cfg.eval_dataset or cfg.dataset, llm_context_size=context,
                     total_tokens=min(AUTOINTERP_MAX_TOKENS, eval_tokens.numel()), **_llm_fields(cfg, model))

    def held_out_tokens(dataset_name, ctx_len, num_tokens, tokenizer, **kwargs):
        return eval_tokens[: -(-num_tokens // context)]

    with mock.patch.object(dataset_utils, "load_and_tokenize_dataset", held_out_tokens):
        return _run_eval(main, config, sae, cfg, device, workdir, model, api_key=os.environ.get("OPENAI_API_KEY", ""))


RUNNERS: dict[str, Callable[..., dict]] = {
    "sparse_probing": _sparse_probing,
    "sae_probes": _sae_probes,
    "absorption": _absorption,
    "scr": functools.partial(_scr_or_tpp, True),
    "tpp": functools.partial(_scr_or_tpp, False),
    "unlearning": _unlearning,
    "autointerp": _autointerp,
}


# ----------------------------------------------------------------------------------------------
# A run's evaluation: its SAE as sae_bench sees it, and the evals it asked for.

class ScaledSAE(BaseSAE):
    """The trained SAE as sae_bench sees it: takes the model's raw activations, with any leading
    dimensions (sae_bench passes (batch, position, d_in)); plugins only ever see (tokens, d_in)."""

    def __init__(self, sae, scale: float):
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


def evaluate(info: dict, sae: BaseSAE, model, eval_tokens: torch.Tensor, cfg, device: torch.device,
             run_dir: Path, eval_loaders=None, names: tuple[str, ...] | None = None) -> None:
    """Run the requested evals (the run's own by default) into info."""
    names = names or cfg.evals
    if synthetic.GROUND_TRUTH in names:
        console.print(f"Evaluating against the ground truth of {cfg.model}...")
        synthetic.evaluate(info, sae, model, cfg, device)
    if "core" in names:
        console.print("Evaluating with sae_bench core metrics...")
        per_context: dict[str, np.ndarray] = {}
        info["metrics"], feature_metrics = evaluate_core(sae, model, eval_tokens, cfg, device,
                                                         cache_dir=activations_dir(), per_context=per_context)
        atomic_write(run_dir / "feature_metrics.json", json.dumps(feature_metrics))
        save_context_rows(run_dir, per_context)
    if set(names) - {"core", synthetic.GROUND_TRUTH}:
        console.print(f"Evaluating with sae_bench: {', '.join(e for e in names if e not in ('core', synthetic.GROUND_TRUTH))}...")
        results = run_evals(names, sae, model, cfg, eval_tokens, device, cache_dir=activations_dir(),
                                   loaders=eval_loaders)
        info.setdefault("evals", {}).update(results)
