"""The peer check: a baseline trained by the harness against the same architecture trained by its
reference trainer (dictionary_learning 0.1.0's), on the same cached activations, batches, learning
rate, warm-up and seeds; both scored on the same rows (in-sample: the question is whether the two
trainers agree, not how well either generalises).

    pip install --no-deps dictionary-learning==0.1.0    # its trainers need only torch and einops
    python peers.py --arch topk --k 32 --seeds 2        # embedded preset's cached activations

Prints and writes (--out, JSON) per seed: L0, explained variance (whole set), the latents that never
fire on the scored rows, b_dec's distance from the data's mean. docs/baselines.md keeps the table.
"""

from __future__ import annotations

from common import HarnessError, console, one_line_errors  # first: its import guards

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


def main(arch: str = typer.Option("topk", help="topk or batchtopk."), k: int = 32, seeds: int = 2,
         tokens: int = typer.Option(250_000, help="Training activations (a cached harvest of this size is used)."),
         out: Path | None = typer.Option(None, help="Also write the results here (JSON).")) -> None:
    with one_line_errors():
        if arch not in REFERENCES:
            raise HarnessError(f"--arch {arch}: choose one of {', '.join(REFERENCES)}")
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
                results.append(dict(trainer=trainer, arch=arch, k=k, seed=seed, tokens=tokens, **train(arch, k, cfg, data, x)))
                console.print(json.dumps(results[-1]))
        if out:
            out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    typer.run(main)
