"""The peer check: a baseline trained by the harness against the same architecture trained by its
reference trainer, on the same data, batches, learning rate, warm-up and seeds.

- `embedded` (the default): dictionary_learning 0.1.0's trainer on the same cached activations,
  both scored on the same rows (in-sample: the question is whether the two trainers agree, not how
  well either generalises): L0, explained variance (whole set), the latents that never fire,
  b_dec's distance from the data's mean.
- a synthetic preset: SAELens's own `SyntheticSAERunner` on the same synthetic model, both starting
  as SAELens does (b_dec at zero; unit decoder rows, the harness's start), with the same AuxK weight
  and dead window; both scored by SAELens's ground-truth evaluation (MCC, F1, L0, explained
  variance). The runner draws fresh samples; the harness reads its cache of the same generator.

    pip install --no-deps dictionary-learning==0.1.0    # its trainers need only torch and einops
    python peers.py --arch topk --k 32 --seeds 2        # embedded preset's cached activations
    python peers.py --preset synth --arch topk --k 16 --seeds 2

Prints and writes (--out, JSON) one line per trainer and seed. docs/baselines.md and
docs/synthetic.md keep the tables.
"""

from __future__ import annotations

from common import HarnessError, console, one_line_errors  # first: its import guards

import dataclasses
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import typer
from rich.progress import Progress

import experiment
import synthetic
from runs import dead_window_steps

REFERENCES = {"topk": ("top_k", "TopKTrainer"), "batchtopk": ("batch_top_k", "BatchTopKTrainer")}
SCORED_ROWS = 16_384


def reference_trainer(arch: str):
    """dictionary_learning's trainer class, imported without its package __init__ (which loads
    nnsight for its activation buffer, unused here)."""
    if "dictionary_learning" not in sys.modules:
        spec = importlib.util.find_spec("dictionary_learning")
        if spec is None:
            raise HarnessError("dictionary_learning is not installed; pip install --no-deps dictionary-learning==0.1.0")
        package = types.ModuleType("dictionary_learning")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["dictionary_learning"] = package
    module_name, class_name = REFERENCES[arch]
    module = importlib.import_module(f"dictionary_learning.trainers.{module_name}")
    return getattr(module, class_name)


def scores(encode, decode, b_dec: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        f = encode(x)
        error = x - decode(f)
    return dict(l0=(f > 0).float().sum(-1).mean().item(),
                explained_variance=1 - (error.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
                never_fired=((f > 0).sum(0) == 0).float().mean().item(),
                b_dec_from_mean=((b_dec - x.mean(0)).norm() / x.mean(0).norm()).item())


def train_ours(arch: str, k: int, cfg: experiment.RunConfig, data: experiment.ActivationData, x: torch.Tensor):
    plugin = experiment.find_plugin(f"baseline/run_0_{arch}")
    hp = plugin.hyperparams_class(k=k)
    torch.manual_seed(cfg.seed)
    sae = plugin.sae_class(data.train.shape[1], cfg.dict_size, hp, cfg)
    with tempfile.TemporaryDirectory() as folder, Progress(disable=True) as progress:
        experiment.train(sae, plugin.trainer_class(sae, cfg), data, cfg, Path(folder), progress, torch.device("cpu"))
    return scores(sae.eval().encode, sae.decode, sae.b_dec, x)


def train_reference(arch: str, k: int, cfg: experiment.RunConfig, data: experiment.ActivationData, x: torch.Tensor):
    trainer = reference_trainer(arch)(steps=cfg.steps, activation_dim=data.train.shape[1], dict_size=cfg.dict_size,
                                      k=k, layer=cfg.layer, lm_name=cfg.model, lr=cfg.lr,
                                      warmup_steps=cfg.warmup_steps, seed=cfg.seed, device="cpu")
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed))  # as train's
    for step, batch in experiment.prefetched_batches(data, order, cfg, range(cfg.steps), 0, cfg.batch_size,
                                                     torch.device("cpu"), torch.float32):
        trainer.update(step, batch)
    ae = trainer.ae.eval()
    return scores(ae.encode, ae.decode, ae.b_dec, x)


def saelens_synthetic(arch: str, k: int, cfg: experiment.RunConfig) -> dict[str, float]:
    """SAELens's SyntheticSAERunner on cfg's synthetic model at cfg's samples, batch, lr, warm-up and
    seed: AuxK weight 1/32 and the harness's dead window (`runs.dead_window_steps`), unit decoder rows."""
    from sae_lens import BatchTopKTrainingSAEConfig, LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.synthetic import SyntheticSAERunner, SyntheticSAERunnerConfig

    model = synthetic.MODELS[cfg.model]
    sae_cfg = dict(topk=TopKTrainingSAEConfig, batchtopk=BatchTopKTrainingSAEConfig)[arch](
        d_in=model.config.hidden_dim, d_sae=cfg.dict_size, k=k, aux_loss_coefficient=1 / 32, decoder_init_norm=1.0)
    runner_cfg = SyntheticSAERunnerConfig(
        synthetic_model=model.config, sae=sae_cfg, training_samples=cfg.tokens, batch_size=cfg.batch_size,
        lr=cfg.lr, lr_warm_up_steps=cfg.warmup_steps, checkpoint_path=None, output_path=None,
        eval_samples=model.eval_samples, dead_feature_window=dead_window_steps(cfg),
        logger=LoggingConfig(log_to_wandb=False))
    torch.manual_seed(cfg.seed)
    result = SyntheticSAERunner(runner_cfg).run().final_eval
    return dict(mcc=result.mcc, f1=result.classification.f1_score, l0=result.sae_l0,
                explained_variance=result.explained_variance)


def harness_synthetic(arch: str, k: int, cfg: experiment.RunConfig) -> dict[str, float]:
    """The harness's run of baseline/run_0_<arch> at cfg, started as the runner starts (b_dec at 0)."""
    plugin = experiment.find_plugin(f"baseline/run_0_{arch}")
    cfg.hyperparams = dataclasses.asdict(plugin.hyperparams_class(k=k, b_dec_init="zeros"))
    with tempfile.TemporaryDirectory() as folder:
        experiment.execute(cfg, plugin, Path(folder) / "run", Path(folder) / "notes.md")
        metrics = json.loads((Path(folder) / "run" / "final_info.json").read_text())["metrics"]
    return dict(mcc=metrics["ground_truth"]["mcc"], f1=metrics["ground_truth"]["f1"], l0=metrics["sparsity"]["l0"],
                explained_variance=metrics["reconstruction_quality"]["explained_variance_whole_set"])


def synthetic_peers(arch: str, k: int, preset: str, seeds: int, tokens: int | None) -> list[dict]:
    results = []
    for seed in range(seeds):
        cfg = experiment.build_config(preset, f"baseline/run_0_{arch}", tokens=tokens, seed=seed)
        for trainer, train in (("harness", harness_synthetic), ("SAELens SyntheticSAERunner", saelens_synthetic)):
            results.append(dict(trainer=trainer, arch=arch, k=k, seed=seed, samples=cfg.tokens, **train(arch, k, cfg)))
            console.print(json.dumps(results[-1]))
    return results


def dictionary_learning_peers(arch: str, k: int, seeds: int, tokens: int) -> list[dict]:
    reference_trainer(arch)
    results = []
    for seed in range(seeds):
        cfg = experiment.build_config("embedded", f"baseline/run_0_{arch}", tokens=tokens, seed=seed)
        if not (experiment.activations_dir() / experiment.cache_key(cfg) / "manifest.json").exists():
            raise HarnessError(f"no cached embedded activations for --tokens {tokens}; harvest them once with "
                               f"`python experiment.py run --plugin run_0_{arch} --tokens {tokens}`")
        data = experiment.activation_data(cfg, None, None)
        rows = np.linspace(0, len(data.train) - 1, SCORED_ROWS).astype(int)
        x = torch.from_numpy(np.asarray(data.train[rows], dtype=np.float32)) * data.scale
        for trainer, train in (("harness", train_ours), ("dictionary_learning", train_reference)):
            results.append(dict(trainer=trainer, arch=arch, k=k, seed=seed, tokens=tokens,
                                **train(arch, k, cfg, data, x)))
            console.print(json.dumps(results[-1]))
    return results


def main(arch: str = typer.Option("topk", help="topk or batchtopk."), k: int = 32, seeds: int = 2,
         preset: str = typer.Option("embedded", help="embedded (dictionary_learning) or a synthetic preset "
                                                     "(SAELens's SyntheticSAERunner)."),
         tokens: int = typer.Option(None, help="Training activations (embedded: a cached harvest of this size, "
                                                "250k by default; synthetic: the preset's samples by default)."),
         out: Path | None = typer.Option(None, help="Also write the results here (JSON).")) -> None:
    with one_line_errors():
        if arch not in REFERENCES:
            raise HarnessError(f"--arch {arch}: choose one of {', '.join(REFERENCES)}")
        if preset in synthetic.PRESETS:
            results = synthetic_peers(arch, k, preset, seeds, tokens)
        elif preset != "embedded":
            raise HarnessError(f"--preset {preset}: choose embedded or one of {', '.join(synthetic.PRESETS)}")
        else:
            results = dictionary_learning_peers(arch, k, seeds, tokens or 250_000)
        if out:
            out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    typer.run(main)
