"""The peer check: a baseline trained by the harness against the same architecture trained by its
reference trainer, on the same data, batches, learning rate, warm-up and seeds.

- `embedded` (the default): dictionary_learning 0.1.0's trainer of the same architecture on the same
  cached activations, both scored on the same rows (in-sample: the question is whether the two
  trainers agree, not how well either generalises): L0, explained variance (whole set), the latents
  that never fire, b_dec's distance from the data's mean. The harness trains its plugin as
  `experiment.py run` does, with the architecture's sparsity knob (--k, --sparsity-penalty or
  --l0-coefficient); the reference (REFERENCES: `StandardTrainer` for relu, `GatedSAETrainer` for
  gated, `JumpReluTrainer`, `TopKTrainer`, `BatchTopKTrainer`, `MatryoshkaBatchTopKTrainer`) gets
  the run's steps, lr, warm-up and seed and, through its constructor only, the plugin's settings
  (each mapping's docstring says how). What it cannot be given, it keeps:
    - its start: b_dec at 0 for relu, gated and jumprelu (the harness's: the first batch's geometric
      median, as the TopK family's references start); relu's encoder and first decoder rows at norm
      0.1; jumprelu's θ at 0.001 (the harness's 0.01), and no b_dec subtracted before its encoder;
    - its optimiser: Adam β1 = 0 for gated and jumprelu (the harness's: SAELens's default, 0.9); no
      gradient clipping for relu and gated (the harness clips at 1); lr 0 on the first warm-up step
      (the harness's (s + 1)/W);
    - jumprelu's θ stepping at the run's lr (the harness's at `threshold_lr_scale` times it), unclamped;
    - AuxK's dead window of 10M tokens (never reached at 250k; the harness's is a tenth of the run),
      and its loss divided by the residual's variance.
  With --start harness the reference instead starts and steps as the harness does
  (`start_as_harness`: the harness's parameters at its first step, Adam β1 0.9, clipping at 1, the
  harness's AuxK window and JumpReLU θ rate), so what is compared is the two trainers' loss and
  update code (for jumprelu: its objective too, at the harness's L0, unless --target-l0 trains the
  harness on the reference's objective).
- a synthetic preset: SAELens's own `SyntheticSAERunner` on the same synthetic model, both starting
  as SAELens does (b_dec at zero; unit decoder rows, the harness's start), with the same AuxK weight
  and dead window, and trained alike where SAELens's defaults differ from the harness's: activations
  scaled to a mean norm of √d_in, and decoder rows kept at unit norm (--decoder unit; `rescaled` is
  SAELens's default, free rows whose norms scale their latents); both scored by SAELens's
  ground-truth evaluation (MCC, F1 with its precision and recall, uniqueness, dead latents, L0,
  explained variance, shrinkage). The runner draws fresh samples; the harness reads its cache of the
  same generator.

    pip install --no-deps dictionary-learning==0.1.0    # its trainers need only torch and einops
    python peers.py --arch topk --k 32 --seeds 2        # embedded preset's cached activations
    python peers.py --arch relu --sparsity-penalty 0.2 --seeds 2     # gated likewise
    python peers.py --arch jumprelu --l0-coefficient 1 --seeds 2
    python peers.py --arch gated --sparsity-penalty 1 --start harness   # both from the harness's start
    python peers.py --arch jumprelu --l0-coefficient 0.3 --start harness --reference-l0-coefficient 100
    python peers.py --arch jumprelu --l0-coefficient 100 --target-l0 16 --start harness   # one objective
    python peers.py --preset synth --arch topk --k 16 --seeds 2

Prints and writes (--out, JSON) one line per trainer and seed. docs/baselines.md and
docs/synthetic.md keep the tables.
"""

from __future__ import annotations

from common import HarnessError, console, one_line_errors  # first: its import guards

import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import typer
from rich.progress import Progress

import experiment
import kernels
import sources
import synthetic
from plugins.baseline.run_0_jumprelu import threshold_rate
from plugins.baseline.run_0_matryoshka import prefix_widths
from runs import dead_window_steps

SCORED_ROWS = 16_384
SYNTHETIC_ARCHS = ("topk", "batchtopk")  # what SAELens's synthetic runner trains here (saelens_synthetic)


# Each mapping takes the harness's hyperparameters, run config and scores (train_ours) and gives the
# reference trainer's constructor arguments beyond the run's own (train_reference).

def l1_settings(hp, cfg: experiment.RunConfig, ours: dict) -> dict[str, Any]:
    """ReLU + L1 and Gated: the run's λ (--sparsity-penalty) as the reference's `l1_penalty`, the same
    term in the same units (λ·Σ_i f_i per token, averaged over the batch; Gated's on ReLU(π_gate),
    both); no sparsity warm-up, as the harness has none (the reference's default, 2,000 steps, is
    longer than the run, which its schedule refuses)."""
    return dict(l1_penalty=cfg.sparsity_penalty, sparsity_warmup_steps=None)


def jumprelu_settings(hp, cfg: experiment.RunConfig, ours: dict) -> dict[str, Any]:
    """JumpReLU: the reference's penalty is λ·(L0/target − 1)², so it gets the harness's λ as its
    `sparsity_penalty` and the harness's target (--target-l0: the same objective) or else, against
    the harness's default λ·L0, the L0 the harness reached on the same seed: the two are compared at
    the same sparsity. The harness's bandwidth ε and λ warm-up too (the reference's defaults: ε
    0.001, a 2,000-step warm-up)."""
    return dict(sparsity_penalty=hp.l0_coefficient, target_l0=hp.target_l0 or ours["l0"], bandwidth=hp.bandwidth,
                sparsity_warmup_steps=hp.l0_warm_up_steps or None)


def topk_settings(hp, cfg: experiment.RunConfig, ours: dict) -> dict[str, Any]:
    """TopK: k and the AuxK weight α."""
    return dict(k=hp.k, auxk_alpha=hp.aux_loss_coefficient)


def batchtopk_settings(hp, cfg: experiment.RunConfig, ours: dict) -> dict[str, Any]:
    """BatchTopK: TopK's, and θ's running mean at the harness's rate η (the reference's β = 1 − η)
    from the first step: the reference's default start, step 1,000, never comes in a short run, and
    until it θ is −1, under which the reference encodes at inference with plain ReLU."""
    return dict(topk_settings(hp, cfg, ours), threshold_beta=1 - hp.topk_threshold_lr, threshold_start_step=0)


def matryoshka_settings(hp, cfg: experiment.RunConfig, ours: dict) -> dict[str, Any]:
    """Matryoshka: BatchTopK's, the harness's prefixes as the reference's groups, each group's error
    weighted n (of n groups): the reference averages its weighted terms, so its loss is then the
    harness's (SAELens's) sum over the prefixes; its default weights, 1/n, would scale it by 1/n²."""
    sizes = np.diff([0, *prefix_widths(hp.prefix_fractions, cfg.dict_size)])
    return dict(batchtopk_settings(hp, cfg, ours), group_fractions=(sizes / cfg.dict_size).tolist(),
                group_weights=[len(sizes)] * len(sizes))


class Reference(NamedTuple):
    plugin: str  # the harness's baseline, plugins/baseline/<plugin>.py
    module: str  # dictionary_learning.trainers.<module>
    trainer: str  # its trainer class
    settings: Callable[..., dict[str, Any]]  # the mapping above


REFERENCES = {  # --arch: the harness's baseline and dictionary_learning 0.1.0's trainer of it
    "relu": Reference("run_0_baseline", "standard", "StandardTrainer", l1_settings),
    "gated": Reference("run_0_gated", "gdm", "GatedSAETrainer", l1_settings),
    "jumprelu": Reference("run_0_jumprelu", "jumprelu", "JumpReluTrainer", jumprelu_settings),
    "topk": Reference("run_0_topk", "top_k", "TopKTrainer", topk_settings),
    "batchtopk": Reference("run_0_batchtopk", "batch_top_k", "BatchTopKTrainer", batchtopk_settings),
    "matryoshka": Reference("run_0_matryoshka", "matryoshka_batch_top_k", "MatryoshkaBatchTopKTrainer",
                            matryoshka_settings),
}


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
    module = importlib.import_module(f"dictionary_learning.trainers.{REFERENCES[arch].module}")
    return getattr(module, REFERENCES[arch].trainer)


def scores(encode, decode, x: torch.Tensor) -> dict[str, float]:
    """b_dec is read as decode(0), whatever the SAE calls it."""
    with torch.no_grad():
        f = encode(x)
        error = x - decode(f)
        b_dec = decode(torch.zeros_like(f[:1]))[0]
    return dict(l0=(f > 0).float().sum(-1).mean().item(),
                explained_variance=1 - (error.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
                never_fired=((f > 0).sum(0) == 0).float().mean().item(),
                b_dec_from_mean=((b_dec - x.mean(0)).norm() / x.mean(0).norm()).item())


def harness_setting(arch: str, knob: dict, preset: str, seed: int, tokens: int | None):
    """(plugin, run config, hyperparameters) as `experiment.py run --plugin <arch's baseline> --preset
    <preset> --seed <seed> --tokens <tokens>` builds them with the knob: --sparsity-penalty where it
    is the run's, --set <knob>=<value> where it is the plugin's."""
    plugin = experiment.find_plugin(f"baseline/{REFERENCES[arch].plugin}")
    in_run = {name: value for name, value in knob.items() if name in experiment.RunConfig.__dataclass_fields__}
    cfg = experiment.build_config(preset, f"baseline/{plugin.name}", tokens=tokens, seed=seed, **in_run)
    hp = plugin.hyperparams_class(**{name: value for name, value in knob.items() if name not in in_run})
    cfg.hyperparams = dataclasses.asdict(hp)
    return plugin, cfg, hp


def train_ours(plugin, cfg: experiment.RunConfig, hp, data: experiment.ActivationData, x: torch.Tensor):
    """The plugin trained as `experiment.py run` trains it on the CPU (execute's kernel settings,
    train_run's seed, SAE and Trainer, `experiment.train`): (its scores, its parameters at the first
    step, after `init_from_data`)."""
    device = torch.device("cpu")
    kernels.configure_kernels(cfg, device)
    torch.manual_seed(cfg.seed)
    sae = plugin.sae_class(data.train.shape[1], cfg.dict_size, hp, cfg)
    start, init_from_data = {}, sae.init_from_data

    def init_and_keep(batch: torch.Tensor) -> None:
        init_from_data(batch)
        start.update({name: value.detach().clone() for name, value in sae.state_dict().items()})

    sae.init_from_data = init_and_keep
    with tempfile.TemporaryDirectory() as folder, Progress(disable=True) as progress:
        experiment.train(sae, plugin.trainer_class(sae, cfg), data, cfg, Path(folder), progress, device,
                         source_sha256=plugin.source_hash())
    return scores(sae.eval().encode, sae.decode, x), start


# The reference's parameters by name, and the harness's they start from under --start harness: the
# first one it has; the same name where not listed. nn.Linear's weights are (out, in): transposed.
HARNESS_NAMES = {"bias": ("b_dec",), "decoder_bias": ("b_dec",), "encoder.weight": ("W_enc",),
                 "encoder.bias": ("b_enc",), "gate_bias": ("b_enc",), "decoder.weight": ("W_dec",),
                 "mag_bias": ("b_mag",), "threshold": ("threshold", "topk_threshold")}
TRANSPOSED = {"encoder.weight", "decoder.weight"}
STARTS = ("own", "harness")  # --start: each trainer's own start, or the reference started as the harness


def start_as_harness(trainer, start: dict[str, torch.Tensor], cfg: experiment.RunConfig, hp) -> None:
    """The reference started and stepped as the harness is: from the harness's parameters at its first
    step (`copy_start`: b_dec from the data, which the TopK family's references compute again from the
    same batch, its encoder and decoder init, θ), with its Adam β (0.9, 0.999), its gradient clipping
    at norm 1 (`clip_before_step`) and its AuxK dead window (JumpReLU: `jumprelu_as_harness` too).
    What is left to differ is each trainer's loss and update code (and the reference's lr 0 on its
    first warm-up step)."""
    copy_start(trainer.ae, start)
    if REFERENCES["jumprelu"].trainer == type(trainer).__name__:
        jumprelu_as_harness(trainer, start, cfg, hp)
    for group in trainer.optimizer.param_groups:
        group["betas"] = (0.9, 0.999)
    if "clip_grad_norm_" not in inspect.getsource(type(trainer).update):
        clip_before_step(trainer)
    if hasattr(trainer, "dead_feature_threshold"):  # its count takes in this batch and tests ≥: 2 steps sooner
        trainer.dead_feature_threshold = ((getattr(hp, "dead_steps", 0) or dead_window_steps(cfg)) + 2) * cfg.batch_size


def copy_start(ae, start: dict[str, torch.Tensor]) -> None:
    """Every parameter of the reference's autoencoder (and BatchTopK's θ) from the harness's
    (HARNESS_NAMES); a parameter with none is refused, so a renamed one cannot go uncopied."""
    def ours(name: str) -> torch.Tensor | None:
        return next((start[n] for n in HARNESS_NAMES.get(name, (name,)) if n in start), None)

    missed = [name for name, _ in ae.named_parameters() if ours(name) is None]
    if missed:
        raise HarnessError(f"--start harness: the reference's {', '.join(missed)} has no harness parameter "
                           f"(peers.HARNESS_NAMES)")
    with torch.no_grad():
        for name, value in ae.state_dict().items():
            if (theirs := ours(name)) is not None:
                value.copy_(theirs.T if name in TRANSPOSED else theirs)


def clip_before_step(trainer) -> None:
    """The harness's clipping for a reference that does not clip (relu's and gated's ConstrainedAdam),
    in the harness's order: the decoder gradient's part along its rows removed, then the whole
    gradient clipped at norm 1, then the reference's step (whose own projection is then a no-op)."""
    step = trainer.optimizer.step

    @functools.wraps(step)  # keeps the lr scheduler's mark on the step it wrapped
    def clipped_step(*args, **kwargs):
        with torch.no_grad():
            for p in getattr(trainer.optimizer, "constrained_params", []):
                rows = p / p.norm(dim=0, keepdim=True)
                p.grad -= (p.grad * rows).sum(dim=0, keepdim=True) * rows
        torch.nn.utils.clip_grad_norm_(trainer.ae.parameters(), 1.0)
        return step(*args, **kwargs)

    trainer.optimizer.step = clipped_step


def jumprelu_as_harness(trainer, start: dict[str, torch.Tensor], cfg: experiment.RunConfig, hp) -> None:
    """JumpReluTrainer's encoder reads x, not x − b_dec: b_enc − b_dec·W_enc gives it the harness's
    first function. θ steps at the harness's rate (the plugin's threshold_rate) as a param group of its own."""
    ae = trainer.ae
    with torch.no_grad():
        ae.b_enc.sub_(start["b_dec"] @ start["W_enc"])
    rate = threshold_rate(hp, cfg)
    others = [p for p in ae.parameters() if p is not ae.threshold]
    trainer.optimizer = torch.optim.Adam([{"params": others}, {"params": [ae.threshold], "lr": cfg.lr * rate}],
                                         lr=cfg.lr, eps=1e-8)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, trainer.scheduler.lr_lambdas[0])


def train_reference(arch: str, cfg: experiment.RunConfig, hp, data: experiment.ActivationData, x: torch.Tensor,
                    ours: dict, start: dict[str, torch.Tensor] | None = None):
    """The reference trainer on the harness's batches in the harness's order, seeded here too
    (JumpReluTrainer does not seed itself); started as the harness (`start_as_harness`) if given
    the harness's start."""
    torch.manual_seed(cfg.seed)
    trainer = reference_trainer(arch)(steps=cfg.steps, activation_dim=data.train.shape[1], dict_size=cfg.dict_size,
                                      layer=cfg.layer, lm_name=cfg.model, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                      seed=cfg.seed, device="cpu", **REFERENCES[arch].settings(hp, cfg, ours))
    if start is not None:
        start_as_harness(trainer, start, cfg, hp)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed))  # as train's
    for step, batch in experiment.prefetched_batches(data, order, cfg, range(cfg.steps), 0, cfg.batch_size,
                                                     torch.device("cpu"), torch.float32):
        trainer.update(step, batch)
    ae = trainer.ae.eval()
    return scores(ae.encode, ae.decode, x)


DECODERS = ("unit", "rescaled")  # SAELens's decoder: the harness's unit rows, or its own default


def saelens_synthetic(arch: str, k: int, cfg: experiment.RunConfig, decoder: str = "unit") -> dict[str, float]:
    """SAELens's SyntheticSAERunner on cfg's synthetic model (`runner_config`), its decoder rows kept
    unit as the harness keeps them (decoder "unit", `unit_rows`) or left free and rescaled, SAELens's
    default ("rescaled")."""
    from sae_lens.synthetic import SyntheticSAERunner

    torch.manual_seed(cfg.seed)
    runner = SyntheticSAERunner(runner_config(arch, k, cfg))
    if decoder == "unit":
        unit_rows(runner.sae)
    result = runner.run().final_eval
    found = result.classification
    return dict(mcc=result.mcc, f1=found.f1_score, precision=found.precision, recall=found.recall,
                uniqueness=result.uniqueness, dead_latents=result.dead_latents, l0=result.sae_l0,
                explained_variance=result.explained_variance, shrinkage=result.shrinkage)


def runner_config(arch: str, k: int, cfg: experiment.RunConfig, dead_window: int | None = None):
    """The SyntheticSAERunnerConfig of cfg's run: its synthetic model, samples, batch, lr, warm-up; AuxK
    weight 1/32 and the harness's dead window (`runs.dead_window_steps`) unless given; unit decoder
    rows at the start (SAELens's default norm is 0.1); activations scaled to a mean norm of √d_in
    estimated on up to 100k samples, as the harness scales them (`sources.activation_scale`; the runner's
    default trains on raw ones)."""
    from sae_lens import BatchTopKTrainingSAEConfig, LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.synthetic import SyntheticSAERunnerConfig

    model = synthetic.MODELS[cfg.model]
    sae_cfg = dict(topk=TopKTrainingSAEConfig, batchtopk=BatchTopKTrainingSAEConfig)[arch](
        d_in=model.config.hidden_dim, d_sae=cfg.dict_size, k=k, aux_loss_coefficient=1 / 32, decoder_init_norm=1.0,
        normalize_activations="expected_average_only_in")
    return SyntheticSAERunnerConfig(
        synthetic_model=model.config, sae=sae_cfg, training_samples=cfg.tokens, batch_size=cfg.batch_size,
        lr=cfg.lr, lr_warm_up_steps=cfg.warmup_steps, checkpoint_path=None, output_path=None,
        eval_samples=model.eval_samples, dead_feature_window=dead_window or dead_window_steps(cfg),
        n_batches_for_norm_estimate=-(-min(100_000, cfg.tokens) // cfg.batch_size),
        logger=LoggingConfig(log_to_wandb=False))


def unit_rows(sae) -> None:
    """Train a SAELens TopK-family SAE as the harness trains its own: each decoder row put back to unit
    norm before every training pass and its gradient's component along the row projected out (then
    SAELens's trainer clips and steps, as the harness's does). Its default instead leaves the rows
    free and multiplies each latent's pre-activation by its row's norm: a per-latent gain that Adam
    learns through the decoder, the same function class trained differently."""
    forward = sae.training_forward_pass

    def forward_on_unit_rows(step_input):
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
        return forward(step_input)

    def along_the_sphere(grad: torch.Tensor) -> torch.Tensor:
        rows = sae.W_dec.detach()
        return grad - (grad * rows).sum(1, keepdim=True) * rows

    sae.training_forward_pass = forward_on_unit_rows
    sae.W_dec.register_hook(along_the_sphere)


def harness_synthetic(arch: str, k: int, cfg: experiment.RunConfig) -> dict[str, float]:
    """The harness's run of baseline/run_0_<arch> at cfg, started as the runner starts (b_dec at 0)."""
    plugin = experiment.find_plugin(f"baseline/run_0_{arch}")
    cfg.hyperparams = dataclasses.asdict(plugin.hyperparams_class(k=k, b_dec_init="zeros"))
    with tempfile.TemporaryDirectory() as folder:
        experiment.execute(cfg, plugin, Path(folder) / "run", Path(folder) / "notes.md")
        metrics = json.loads((Path(folder) / "run" / "final_info.json").read_text())["metrics"]
    truth = metrics["ground_truth"]
    return dict(**{name: truth[name] for name in ("mcc", "f1", "precision", "recall", "uniqueness", "dead_latents")},
                l0=metrics["sparsity"]["l0"],
                explained_variance=metrics["reconstruction_quality"]["explained_variance_whole_set"],
                shrinkage=metrics["shrinkage"]["l2_ratio"])


def synthetic_peers(arch: str, k: int, preset: str, seeds: range, tokens: int | None, decoder: str) -> list[dict]:
    results = []
    for seed in seeds:
        cfg = experiment.build_config(preset, f"baseline/run_0_{arch}", tokens=tokens, seed=seed)
        setting = dict(arch=arch, k=k, seed=seed, samples=cfg.tokens, lr=cfg.lr)
        results.append(dict(trainer="harness", **setting, **harness_synthetic(arch, k, cfg)))
        console.print(json.dumps(results[-1]))
        results.append(dict(trainer=f"SAELens SyntheticSAERunner, {decoder} decoder", **setting,
                            **saelens_synthetic(arch, k, cfg, decoder)))
        console.print(json.dumps(results[-1]))
    return results


def compare(arch: str, plugin, cfg: experiment.RunConfig, hp, data: experiment.ActivationData,
            start: str = "own", reference_hp=None) -> list[dict]:
    """The harness's run and the reference's on the same data, scored on the same SCORED_ROWS rows;
    start "harness": the reference started as the harness (`start_as_harness`); reference_hp: the
    reference's hyperparameters where they differ from the harness's (its own knob value)."""
    rows = np.linspace(0, len(data.train) - 1, SCORED_ROWS).astype(int)
    x = torch.from_numpy(np.asarray(data.train[rows], dtype=np.float32)) * data.scale
    ours, our_start = train_ours(plugin, cfg, hp, data, x)
    theirs = train_reference(arch, cfg, reference_hp or hp, data, x, ours, our_start if start == "harness" else None)
    knob = plugin.sae_class.sparsity_knob

    def setting(trained_with) -> dict:
        target = {"target_l0": hp.target_l0} if getattr(hp, "target_l0", 0) else {}
        return {"arch": arch, knob: getattr(trained_with if hasattr(trained_with, knob) else cfg, knob), **target,
                "seed": cfg.seed, "tokens": cfg.tokens, "start": start}

    results = [dict(trainer="harness", **setting(hp), **ours),
               dict(trainer="dictionary_learning", **setting(reference_hp or hp), **theirs)]
    for result in results:
        console.print(json.dumps(result))
    return results


def dictionary_learning_peers(arch: str, knob: dict, seeds: range, tokens: int, start: str = "own",
                              reference_knob: dict | None = None) -> list[dict]:
    """Each seed's `compare` on the embedded cache of `tokens`; reference_knob: the reference's own
    value of the knob, where it is given one."""
    reference_trainer(arch)
    results = []
    for seed in seeds:
        plugin, cfg, hp = harness_setting(arch, knob, "embedded", seed, tokens)
        if not ((experiment.activations_dir() / experiment.cache_key(cfg) / "manifest.json").exists()
                or sources.larger_caches(experiment.activations_dir(), tokens, experiment.cache_key_at(cfg))):
            raise HarnessError(f"no cached embedded activations for --tokens {tokens}; harvest them once with "
                               f"`python experiment.py run --plugin {plugin.name} --tokens {tokens}`")
        results += compare(arch, plugin, cfg, hp, experiment.activation_data(cfg, None, None), start,
                           dataclasses.replace(hp, **reference_knob) if reference_knob else None)
    return results


def checked_choice(arch: str, preset: str, decoder: str, start: str = "own",
                   reference_l0_coefficient: float | None = None, target_l0: float | None = None) -> None:
    if arch not in REFERENCES:
        raise HarnessError(f"--arch {arch}: choose one of {', '.join(REFERENCES)}")
    if preset != "embedded" and preset not in synthetic.PRESETS:
        raise HarnessError(f"--preset {preset}: choose embedded or one of {', '.join(synthetic.PRESETS)}")
    if preset in synthetic.PRESETS and arch not in SYNTHETIC_ARCHS:
        raise HarnessError(f"--preset {preset} checks only {' and '.join(SYNTHETIC_ARCHS)} (SAELens's synthetic "
                           f"runner); check --arch {arch} on embedded")
    if decoder not in DECODERS:
        raise HarnessError(f"--decoder {decoder}: choose {' or '.join(DECODERS)}")
    if reference_l0_coefficient is not None and (arch != "jumprelu" or preset != "embedded"):
        raise HarnessError("--reference-l0-coefficient: the jumprelu reference's own λ, on embedded only")
    if target_l0 is not None and (arch != "jumprelu" or preset != "embedded" or not 0 < target_l0 < math.inf):
        raise HarnessError(f"--target-l0 {target_l0}: a positive L0 target for --arch jumprelu on embedded")
    if target_l0 is not None and reference_l0_coefficient is not None:
        raise HarnessError("--target-l0 trains both on one objective at one λ; drop --reference-l0-coefficient")
    if start not in STARTS:
        raise HarnessError(f"--start {start}: choose {' or '.join(STARTS)}")
    if start == "harness" and preset != "embedded":
        raise HarnessError(f"--start harness: an embedded option (--preset {preset} starts both as SAELens does)")
    if preset not in synthetic.PRESETS and decoder != "unit":
        raise HarnessError(f"--decoder {decoder}: SAELens's decoder is a synthetic preset's option "
                           f"(dictionary_learning keeps unit rows)")


def chosen_knob(arch: str, given: dict) -> dict:
    """{the arch's sparsity knob (its plugin's `sparsity_knob`): its value}: k 32 unless given, the
    others the preset's or the plugin's default ({}); another architecture's knob is refused."""
    knob = experiment.find_plugin(f"baseline/{REFERENCES[arch].plugin}").sae_class.sparsity_knob
    stray = [name for name, value in given.items() if value is not None and name != knob]
    if stray:
        raise HarnessError(f"--{stray[0].replace('_', '-')} does not apply to --arch {arch}; "
                           f"its knob is --{knob.replace('_', '-')}")
    value = 32 if knob == "k" and given[knob] is None else given[knob]
    return {} if value is None else {knob: value}


def main(arch: str = typer.Option("topk", help=f"{', '.join(REFERENCES)}; a synthetic preset: "
                                               f"{' or '.join(SYNTHETIC_ARCHS)}."),
         k: int | None = typer.Option(None, help="topk, batchtopk, matryoshka: latents per token (32 unless given)."),
         sparsity_penalty: float | None = typer.Option(None, help="relu, gated: the L1 coefficient λ (the preset's "
                                                                   "unless given)."),
         l0_coefficient: float | None = typer.Option(None, help="jumprelu: λ, the L0 coefficient (the plugin's "
                                                                 "unless given)."),
         seeds: int = typer.Option(2, help="Seeds: --seed, --seed+1, ..."),
         seed: int = typer.Option(0, help="The first seed."),
         preset: str = typer.Option("embedded", help="embedded (dictionary_learning) or a synthetic preset "
                                                     "(SAELens's SyntheticSAERunner)."),
         tokens: int = typer.Option(None, help="Training activations (embedded: a cached harvest of this size, "
                                                "250k by default; synthetic: the preset's samples by default)."),
         decoder: str = typer.Option("unit", help="A synthetic preset: SAELens's decoder rows kept unit as the "
                                                  "harness keeps them (unit), or its default (rescaled)."),
         start: str = typer.Option("own", help="embedded: each trainer's own start (own), or the reference "
                                               "started and stepped as the harness (harness)."),
         reference_l0_coefficient: float | None = typer.Option(
             None, help="jumprelu: the reference's own λ for its objective λ·(L0/target − 1)², whose pull at the "
                        "harness's λ leaves its L0 above its target (the harness's λ unless given)."),
         target_l0: float | None = typer.Option(
             None, help="jumprelu: train the harness on the reference's objective λ·(L0/target − 1)² with this "
                        "target (the plugin's target_l0), so both train one objective."),
         out: Path | None = typer.Option(None, help="Also write the results here (JSON).")) -> None:
    with one_line_errors():
        checked_choice(arch, preset, decoder, start, reference_l0_coefficient, target_l0)
        knob = chosen_knob(arch, dict(k=k, sparsity_penalty=sparsity_penalty, l0_coefficient=l0_coefficient))
        if target_l0 is not None:
            knob["target_l0"] = target_l0
        if preset in synthetic.PRESETS:
            results = synthetic_peers(arch, knob["k"], preset, range(seed, seed + seeds), tokens, decoder)
        else:
            reference_knob = None if reference_l0_coefficient is None else {"l0_coefficient": reference_l0_coefficient}
            results = dictionary_learning_peers(arch, knob, range(seed, seed + seeds), tokens or 250_000, start,
                                                reference_knob)
        if out:
            out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    typer.run(main)
