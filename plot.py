"""Figures and a comparison table from run folders: the seed notebooks' plots, each drawn only
from data that exists.

    python plot.py                                    # every study under runs/ -> figures/
    python plot.py --study zscore_ortho               # one study
    python plot.py --run runs/zscore_ortho/run_7_adaptive_ln/20250101-120000   # this folder, not the latest

A run folder is any folder under --runs, at any depth, that holds a final_info.json (runs still
training or interrupted have none and are passed over); it says itself which study and plugin it
ran. Each plugin is shown by its latest run folder (latest by the folder's timestamp name, else its
modification time), unless --run picks one. Runs are ordered by run number and each plugin keeps
one colour in every figure. A failed run is drawn as a hatched "failed" slot or an × marker, never
as a zero; a figure whose data no run has is not written. figures/README.md lists the figures
written, with a caption each, and the run folders they come from. With several studies, each gets
its own folder figures/<study>/.

Read top to bottom: reading runs, metrics and their directions, drawing helpers, the figures
(core metrics, training curves, final losses, sae_bench evals, per-run latent frequencies), the
README, the comparison table, and the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import textwrap
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, HarnessError, OneLineUsageCommand, console, one_line_errors  # first: its import guards

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import typer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

from frontier import at_defaults, matched, unread_settings  # noqa: E402
from runs import Index, Run, identify, newest, read_json, read_run, run_index, same_instrument  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Choosing runs (run folders are read by runs.py): each plugin's latest, the study's baselines.

# One colour per run number (0, the baseline, is grey), so a plugin looks the same in every figure.
PALETTE = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
           "#e377c2", "#bcbd22", "#17becf", "#1b1b7a", "#e6ab02",  # enough for six baselines and a study:
           "#843c39", "#637939", "#7b4173", "#3182bd", "#31a354", "#8c6d31", "#393b79", "#de9ed6"]


def select_runs(runs_dir: Path, study: str | None = None, picks: Iterable[Path] = ()) -> dict[str, list[Run]]:
    """study -> its plugins' runs in run-number order: each plugin's latest finished run folder
    under runs_dir, or the folder picked for it."""
    return choose_runs(run_index(runs_dir), runs_dir, study, picks)


def reference_baselines(index: Index) -> Index:
    """The baseline runs that stand for their architecture beside another study (its run 0, its
    dashed curves), oldest first: those at their plugin's defaults but for its knob, as
    frontier.verdicts counts them, not a calibration or another objective on the same activations,
    and of runs alike but for a setting their loss does not read the newest completed one. A
    baseline whose plugin is gone keeps its runs."""
    from experiment import find_plugin  # only here: the baselines' code holds their knobs and defaults

    at_its_defaults, unread = {}, {}
    for name in {who["plugin"] for _, who, _ in index if who["study"] == "baseline"}:
        try:
            plugin = find_plugin(f"baseline/{name}")
        except HarnessError:
            continue
        knob = plugin.sae_class.sparsity_knob
        at_its_defaults[name] = at_defaults(dataclasses.asdict(plugin.hyperparams_class()), knob)
        unread[name] = unread_settings(knob)
    newest = {}  # a run again at a setting its loss does not read is one point, not two: the newest completed
    for folder, who, info in index:
        if who["study"] == "baseline" and at_its_defaults.get(who["plugin"], lambda info: True)(info):
            config = info.get("provenance", {}).get("config") or {"folder": str(folder)}
            alike = {k: v for k, v in config.items() if k not in ("device", "preset", *unread.get(who["plugin"], ()))}
            key = (who["plugin"], json.dumps(alike, sort_keys=True, default=str))
            if info.get("status") == "completed" or key not in newest:
                newest.pop(key, None)  # re-inserted: the list stays oldest first
                newest[key] = (folder, who, info)
    return list(newest.values())


def frontier_runs(index: Index, study: str) -> list[Run]:
    """What a study's frontier figures draw from: all its runs, and the baselines' (every one of them
    where the study is the baseline, else reference_baselines)."""
    references = reference_baselines(index) if study != "baseline" else []
    own = [(folder, who, info) for folder, who, info in index if who["study"] == study]
    return [read_run(folder) for folder, _, _ in own + references]


def choose_runs(index: Index, runs_dir: Path, study: str | None, picks: Iterable[Path]) -> dict[str, list[Run]]:
    """select_runs on an index already read. A run of a sweep (under RUNS/sweeps/, as `sweep` and
    the sweep analyses write them) stands for its plugin only where the plugin has no other run:
    a study's figures show the study's runs, not the last value a sweep tried."""
    swept = (runs_dir / "sweeps").resolve()
    chosen: dict[tuple[str, str], Path] = {}
    for folder, who, _ in index:  # oldest first: the latest wins
        key = (who["study"], who["plugin"])
        if key not in chosen or not folder.resolve().is_relative_to(swept) or chosen[key].resolve().is_relative_to(swept):
            chosen[key] = folder
    for folder in picks:
        if not (folder / "final_info.json").is_file():
            raise HarnessError(f"--run {folder} is not a finished run folder (it holds no final_info.json)")
        who = identify(folder, read_json(folder / "final_info.json"))
        chosen[who["study"], who["plugin"]] = folder
    if not chosen:
        raise HarnessError(f"no finished run folders under {runs_dir} "
                           "(folders holding a final_info.json, at any depth); train one first")
    studies = sorted({s for s, _ in chosen})
    if study is not None and study not in studies:
        raise HarnessError(f"no runs of study '{study}' under {runs_dir}; studies with runs: {', '.join(studies)}")
    grouped = {}
    for name in studies if study is None else [study]:
        runs = sorted((read_run(f) for (s, _), f in chosen.items() if s == name), key=lambda r: (r.number, r.plugin))
        if name != "baseline" and not any(r.number == 0 for r in runs):
            runs[:0] = study_baselines(reference_baselines(index), runs)
        grouped[name] = paint(runs)
    return grouped


# Settings a study's runs share with the baseline run that stands as their run 0.
SHARED_SETTINGS = ("sparsity_penalty", "dict_size", "tokens", "batch_size", "lr", "seed")


def study_baselines(index: Index, runs: list[Run]) -> list[Run]:
    """The field's baselines as a study's run 0, where trained on the same activations: of each
    baseline plugin the latest run at the study's own setting (a swept baseline has runs at many),
    else its latest; the ReLU baseline first."""
    caches = {r.info.get("activation_cache") for r in runs}
    common = {k: v.pop() for k in SHARED_SETTINGS if len(v := {json.dumps(r.config.get(k)) for r in runs}) == 1}
    found: dict[str, tuple[bool, Path]] = {}  # oldest first: the latest wins among equals
    for folder, who, info in index:
        if who["study"] == "baseline" and info.get("activation_cache") in caches:
            config = info.get("provenance", {}).get("config", {})
            matches = all(json.dumps(config.get(k)) == v for k, v in common.items())
            if matches or not found.get(who["plugin"], (False,))[0]:
                found[who["plugin"]] = (matches, folder)
    order = sorted(found, key=lambda plugin: plugin != "run_0_baseline")
    return [read_run(found[plugin][1]) for plugin in order]


def paint(runs: list[Run]) -> list[Run]:
    """Each run gets its run number's colour, or the next free one if two runs share a number."""
    taken: set[str] = set()
    for run in runs:
        i = run.number % len(PALETTE)
        while PALETTE[i] in taken and len(taken) < len(PALETTE):
            i = (i + 1) % len(PALETTE)
        run.color = PALETTE[i]
        taken.add(run.color)
    return runs


# ----------------------------------------------------------------------------------------------
# Metrics: where each lives in final_info.json, its axis label, and which direction is better
# ("one": closest to 1).

METRICS = {
    # The field's: 1 − ΣSSE/ΣSST over all evaluation tokens. sae_bench 0.6.0's explained_variance
    # exceeds 1 on Gemma-scale activations, and its legacy one averages per-batch ratios.
    "explained_variance": (("metrics", "reconstruction_quality", "explained_variance_whole_set"),
                           "explained variance, 1 − ΣSSE/ΣSST over all tokens (1 = perfect)", "higher"),
    "explained_variance_legacy": (("metrics", "reconstruction_quality", "explained_variance_legacy"),
                                  "explained variance, sae_bench legacy (mean of per-batch ratios)", "higher"),
    "mse": (("metrics", "reconstruction_quality", "mse"), "reconstruction MSE (model activation units²)", "lower"),
    "l0": (("metrics", "sparsity", "l0"), "L0 (latents active per token)", "lower"),
    "l1": (("metrics", "sparsity", "l1"), "L1 (summed latent activation per token)", "lower"),
    "kl_div_score": (("metrics", "model_behavior_preservation", "kl_div_score"),
                     "KL-divergence score (fraction recovered; 1 = perfect)", "higher"),
    "ce_loss_score": (("metrics", "model_performance_preservation", "ce_loss_score"),
                      "CE-loss score (fraction recovered; 1 = perfect)", "higher"),
    "l2_ratio": (("metrics", "shrinkage", "l2_ratio"), "L2 ratio ‖x̂‖ / ‖x‖ (1 = no shrinkage)", "one"),
    "cossim": (("metrics", "reconstruction_quality", "cossim"), "cosine similarity of x̂ and x (1 = perfect)", "higher"),
    "final_loss": (("final_loss",), "final training loss (total, last step)", "lower"),
    # A synthetic run's recovery of the true features (synthetic.py, SAELens's synthetic evals).
    "mcc": (("metrics", "ground_truth", "mcc"), "MCC, decoder against true features (1 = all recovered)", "higher"),
    "f1": (("metrics", "ground_truth", "f1"), "F1, latents as detectors of their true feature (mean)", "higher"),
}
EVOLUTION = ["explained_variance", "mse", "l0", "l1", "kl_div_score", "ce_loss_score", "l2_ratio"]
# Scores where 1 is perfect: below -1 a run is simply broken, and one run at -700 would flatten
# every other run onto a line, so evolution plots put such values on the floor, marked.
SCORE_FLOOR = {"explained_variance": -1.0, "kl_div_score": -1.0, "ce_loss_score": -1.0}
# Where evaluation stored each metric's bootstrap standard error (metrics.bootstrap_se).
SE_KEY = {"ce_loss_score": "ce_loss_score", "kl_div_score": "kl_div_score",
          "explained_variance": "explained_variance_whole_set"}
# The smallest difference worth a slope where no run says its noise: scores are read to 0.01.
RESOLUTION = {"explained_variance": 0.01, "ce_loss_score": 0.01, "kl_div_score": 0.01}
BETTER = {"higher": "higher is better", "lower": "lower is better", "one": "closest to 1 is better"}
ABSORPTION_SCORE = ("mean_absorption_score", "mean_absorption_fraction_score")  # older, newer sae_bench


def number(value) -> float | None:
    """A finite number as float, else None: absent data stays absent, never a zero."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def metric(info: dict, name: str) -> float | None:
    node = info
    for key in METRICS[name][0]:
        node = node.get(key) if isinstance(node, dict) else None
    if name in SCORE_FLOOR and node == -math.inf:  # sae_bench's score when the SAE's KL is infinite
        return -math.inf
    return number(node)


def find(tree, key: str) -> float | None:
    """The number stored under `key` anywhere in a nested sae_bench result."""
    if isinstance(tree, dict):
        if key in tree:
            return number(tree[key])
        return next((v for v in (find(t, key) for t in tree.values()) if v is not None), None)
    return None


def keys_in(tree) -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield key
            yield from keys_in(value)


def eval_result(run: Run, prefix: str) -> dict | None:
    """final_info's evals.<eval_type_id> whose id starts with prefix (absorption_first_letter...),
    if it was drawn with the harness's instrument: one drawn with another eval seed is not drawn
    beside the others (it read the SAE with other probes or words)."""
    return next((v for k, v in run.info.get("evals", {}).items() if k.startswith(prefix) and same_instrument(v)), None)


def absorption_score(run: Run) -> float | None:
    result = eval_result(run, "absorption")
    return next((v for v in (find(result, k) for k in ABSORPTION_SCORE) if v is not None), None)


# ----------------------------------------------------------------------------------------------
# Drawing helpers. Per-run bars and points sit on a categorical axis: one slot per run, a
# hatched "failed" slot for a failed run, "no data" where a finished run lacks the value.

def failed_label(run: Run) -> str:
    return f"{run.label} (failed)" if run.failed else run.label


def shown(runs: list[Run], values: list[float | None]) -> list[int]:
    """Indices of the runs a per-run figure shows: those with a value, and failed runs."""
    return [i for i, (r, v) in enumerate(zip(runs, values)) if v is not None or r.failed]


def has(values: list[float | None]) -> bool:
    return any(v is not None for v in values)


def with_setting(title: str, runs: list[Run]) -> str:
    """The title, and below it the runs' common setting (preset, model, layer, size, tokens)."""
    settings = sorted({r.setting for r in runs})
    return f"{title}\n{settings[0] if len(settings) == 1 else 'mixed settings: see README.md'}"


def run_slots(ax, runs: list[Run], values: list[float | None], ylabel: str, compact: bool = False) -> list[int]:
    """Ticks, failed and no-data marks for runs on a categorical x axis; returns the slots with data."""
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([f"Run {r.number}" if compact else r.label for r in runs],
                       rotation=0 if compact else 30, ha="center" if compact else "right")
    for tick, run in zip(ax.get_xticklabels(), runs):
        tick.set_color(run.color)
    ax.set_xlim(-0.6, len(runs) - 0.4)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    for i, (run, value) in enumerate(zip(runs, values)):
        if run.failed:
            ax.axvspan(i - 0.4, i + 0.4, facecolor="none", edgecolor="0.55", hatch="///", lw=0)
            ax.text(i, 0.5, "failed", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                    va="center", fontsize=9, fontweight="bold", bbox=dict(facecolor="white", edgecolor="0.55"))
        elif value is None:
            ax.text(i, 0.5, "no data", transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                    va="center", fontsize=8, color="0.5")
    return [i for i, v in enumerate(values) if v is not None]


def bar_panel(ax, runs: list[Run], values: list[float | None], ylabel: str, compact: bool = False) -> None:
    present = run_slots(ax, runs, values, ylabel, compact)
    bars = ax.bar(present, [values[i] for i in present], color=[runs[i].color for i in present], width=0.7)
    upright = compact and len(present) > 4  # narrow bars: values written upwards
    ax.bar_label(bars, fmt="%.3g", fontsize=8, padding=2, rotation=90 if upright else 0)
    ax.margins(y=0.3 if upright else 0.15)
    ax.axhline(0, color="0.3", lw=0.8)


def least_span(name: str, values: list[float], errors: list[float | None]) -> float:
    """The smallest y span a metric's axis may show: four standard errors where runs know theirs,
    else the metric's resolution (1% of its size for unbounded ones)."""
    known = [e for e in errors if e]
    resolution = RESOLUTION.get(name, 0.01 * max((abs(v) for v in values), default=0.0))
    return max(4 * max(known, default=0.0), resolution)


def runs_span(runs: list[Run], name: str, values: list[float | None]) -> float:
    """least_span for one value per run, with the runs' bootstrap standard errors."""
    errors = [number(r.info.get("metrics", {}).get("bootstrap_se", {}).get(SE_KEY.get(name))) for r in runs]
    return least_span(name, [v for v in values if v is not None and math.isfinite(v)], errors)


def floor_span(ax, least: float) -> None:
    """Never stretch differences below the noise into a slope: widen the y axis to `least`
    around its middle, and label ticks without an offset."""
    low, high = ax.get_ylim()
    if high - low < least:
        middle = (low + high) / 2
        ax.set_ylim(middle - least / 2, middle + least / 2)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")


def point_panel(ax, runs: list[Run], values: list[float | None], ylabel: str, floor: float | None = None,
                span: float = 0.0) -> None:
    """Values as points joined across consecutive runs; the line breaks at a failed or missing run.
    Values below `floor` (−inf included) sit on it as ▼, labelled with their true value; the y
    axis spans at least `span` (least_span: differences below the noise stay flat)."""
    drawn = [v if v is None or floor is None else max(v, floor) for v in values]
    present = run_slots(ax, runs, drawn, ylabel)
    ax.plot(range(len(runs)), [math.nan if v is None else v for v in drawn], color="0.6", zorder=1)
    for marker, group in (("o", [i for i in present if drawn[i] == values[i]]),
                          ("v", [i for i in present if drawn[i] != values[i]])):
        ax.scatter(group, [drawn[i] for i in group], c=[runs[i].color for i in group], s=60, zorder=2, marker=marker)
    for i in present:
        ax.annotate(f"{values[i]:.3g}" + (" (off scale)" if drawn[i] != values[i] else ""), (i, drawn[i]),
                    textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax.margins(y=0.15)
    floor_span(ax, span)


def run_legend(fig_or_ax, runs: list[Run], **where) -> None:
    handles = [Patch(facecolor="none", edgecolor="0.55", hatch="///", label=failed_label(r)) if r.failed
               else Patch(color=r.color, label=r.label) for r in runs]
    fig_or_ax.legend(handles=handles, fontsize=8, **where)


def per_run_figure(runs: list[Run], values: list[float | None], ylabel: str, title: str, panel) -> Figure:
    keep = shown(runs, values)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.8 * len(keep) + 3), 5))
    panel(ax, [runs[i] for i in keep], [values[i] for i in keep], ylabel)
    ax.set_title(with_setting(title, runs), fontsize=11)
    return fig


def panel_grid(runs: list[Run], series: dict[str, list[float | None]], labels: dict[str, str],
               title: str) -> Figure:
    """One bar panel per series (a metric or loss term), runs keyed by number, legend at the side."""
    keep = sorted({i for values in series.values() for i in shown(runs, values)})
    kept = [runs[i] for i in keep]
    width = max(4.0, 0.5 * len(kept) + 2)  # inches per panel
    cols = max(1, min(len(series), int(16 // width)))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.6 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, series.items()):
        ylabel = textwrap.fill(labels.get(name, name.replace("_", " ")), 30)
        bar_panel(ax, kept, [values[i] for i in keep], ylabel, compact=True)
        ax.set_title(name, fontsize=10)
    for ax in axes.flat[len(series):]:
        ax.set_visible(False)
    fig.suptitle(with_setting(title, runs), fontsize=11)
    run_legend(fig, kept, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def line_legend(ax, runs: list[Run], drawn: list[Run]) -> None:
    """Legend of the drawn runs, plus failed runs with nothing to draw (as ×), outside the axes."""
    for run in runs:
        if run.failed and run not in drawn:
            ax.plot([], [], "X", color="black", label=f"{run.label} (failed, no data)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


# ----------------------------------------------------------------------------------------------
# The figures. Each generator yields (file name, figure, caption) for every figure it has data
# for, and nothing otherwise.

Figures = Iterator[tuple[str, Figure, str]]


def core_metric_figures(runs: list[Run]) -> Figures:
    """Notebook 000: each core metric's evolution across runs, and the key metrics together."""
    for name in EVOLUTION:
        values = [metric(r.info, name) for r in runs]
        if has(values):
            _, label, better = METRICS[name]
            yield (f"{name}_evolution.png",
                   per_run_figure(runs, values, label, f"{name} across runs ({BETTER[better]})",
                                  functools.partial(point_panel, floor=SCORE_FLOOR.get(name),
                                                    span=runs_span(runs, name, values))),
                   f"{label[0].upper()}{label[1:]} for each plugin in run order ({BETTER[better]}): "
                   f"{sequence(runs, values)}.")
    key = {name: [metric(r.info, name) for r in runs] for name in ("explained_variance", "l0", "kl_div_score")}
    key = {name: values for name, values in key.items() if has(values)}
    if key:
        keep = sorted({i for values in key.values() for i in shown(runs, values)})
        fig, axes = plt.subplots(len(key), 1, sharex=True, squeeze=False,
                                 figsize=(max(6.4, 0.8 * len(keep) + 3), 2.8 * len(key) + 1))
        for ax, (name, values) in zip(axes[:, 0], key.items()):
            point_panel(ax, [runs[i] for i in keep], [values[i] for i in keep],
                        f"{name}\n({BETTER[METRICS[name][2]]})", floor=SCORE_FLOOR.get(name),
                        span=runs_span(runs, name, values))
        axes[0, 0].set_title(with_setting("Key metrics across runs", runs), fontsize=11)
        fig.tight_layout()
        yield ("key_metrics_combined.png", fig,
               f"{', '.join(key)} stacked on one run axis, to read trade-offs between reconstruction, "
               "sparsity and behaviour preservation.")


LOG_LABELS = {
    "total_loss": "total loss (sum of the terms)",
    "l2_loss": "L2 reconstruction loss (squared error per token)",
    "sparsity_loss": "sparsity loss (penalty × L1 per token)",
    "ortho_loss": "orthogonality loss",
    "l0": "L0 (latents active per token, batch)",
    "dead_fraction": "fraction of latents dead",
    "lr": "learning rate",
    "active_features": "latents active in the batch",
    "selected_pairs": "latent pairs selected",
    "unique_features_in_pairs": "distinct latents in selected pairs",
    "max_pair_correlation": "max |cos| of selected decoder pairs",
    "mean_pair_correlation": "mean |cos| of selected decoder pairs",
    "pair_jaccard": "Jaccard overlap with previous step's pairs",
    "ordering_loss": "frequency-ordering loss",
    "frequency_index_spearman": "Spearman ρ of frequency with index (−1 = ordered)",
    "ordering_error": "ordering error (0 = ordered, 1 = reversed)",
    "recon_cosine": "reconstruction cosine similarity (batch)",
}


def training_curve_figures(runs: list[Run]) -> Figures:
    """Notebook 004: every logged quantity over training steps, one line per run."""
    keys = list(dict.fromkeys(k for r in runs for record in r.log for k in record if k not in ("step", "tokens")))
    for key in keys:
        curves = {r.plugin: [(rec["step"], v) for rec in r.log if (v := number(rec.get(key))) is not None]
                  for r in runs}
        drawn = [r for r in runs if curves[r.plugin]]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(10, 5))
        for run in drawn:
            steps, values = zip(*curves[run.plugin])
            label = f"{run.label} (failed; × where it stopped)" if run.failed else run.label
            ax.plot(steps, values, color=run.color, label=label, marker="." if len(steps) < 30 else None)
            if run.failed:  # where training stopped
                ax.plot(steps[-1], values[-1], "X", color="black", ms=10, zorder=3)
        values = [v for r in drawn for _, v in curves[r.plugin]]
        if min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(LOG_LABELS.get(key, key.replace("_", " ")))
        ax.grid(alpha=0.3)
        ax.set_title(with_setting(f"{key} during training", runs), fontsize=11)
        line_legend(ax, runs, drawn)
        yield (f"{key}_comparison.png", fig,
               f"{key}: {LOG_LABELS.get(key, key.replace('_', ' '))} over training steps (train_log.jsonl), "
               "one line per run; a failed run's line ends in × where it stopped.")


def final_loss_figures(runs: list[Run]) -> Figures:
    """Notebooks 002 and 003: final losses per run; notebook 004: the plugin's final metrics."""
    totals = [metric(r.info, "final_loss") for r in runs]
    if has(totals):
        yield ("final_losses.png",
               per_run_figure(runs, totals, METRICS["final_loss"][1], "Final training loss per run (lower is better)",
                              bar_panel),
               "Final total training loss of each run (all of the plugin's loss terms summed; "
               "terms differ between plugins).")
    terms = list(dict.fromkeys(k for r in runs for k in r.info.get("final_loss_terms", {}) if k != "total_loss"))
    if terms:
        series = {t: [number(r.info.get("final_loss_terms", {}).get(t)) for r in runs] for t in terms}
        yield ("training_loss_comparison.png",
               panel_grid(runs, series, LOG_LABELS, "Final loss terms per run"),
               "Each loss term at the last training step, per run: what the final loss is made of.")
    names = list(dict.fromkeys(k for r in runs for k in r.info.get("final_metrics", {})))
    if names:
        series = {n: [number(r.info.get("final_metrics", {}).get(n)) for r in runs] for n in names}
        yield ("final_metrics_comparison.png",
               panel_grid(runs, series, LOG_LABELS, "Final metrics per run (final_info.json final_metrics)"),
               "The plugin's own final metrics (losses, active latents, pair statistics), one panel each.")


def eval_figures(runs: list[Run]) -> Figures:
    """Notebooks 002 and 003: reconstruction, absorption and SCR results per run."""
    recon = {n: [metric(r.info, n) for r in runs] for n in ("kl_div_score", "cossim")}
    if all(map(has, recon.values())):
        yield ("reconstruction_metrics.png",
               panel_grid(runs, recon, {n: METRICS[n][1] for n in recon}, "Reconstruction metrics (higher is better)"),
               "KL-divergence score (behaviour preserved) and cosine similarity of reconstructions, per run.")
    scores = [absorption_score(r) for r in runs]
    splits = [find(eval_result(r, "absorption"), "mean_num_split_features") for r in runs]
    labels = {"mean absorption score": "mean absorption score (fraction; lower is better)",
              "mean split latents": "mean number of latents a letter feature is split across"}
    if has(scores):
        yield ("absorption_scores.png",
               per_run_figure(runs, scores, labels["mean absorption score"], "Mean absorption score per run", bar_panel),
               "Mean first-letter absorption score per run (sae_bench absorption); lower means less absorption.")
    if has(splits):
        yield ("feature_splits.png",
               per_run_figure(runs, splits, labels["mean split latents"], "Mean split latents per run", bar_panel),
               "Mean number of latents a first-letter feature is split across, per run (sae_bench absorption).")
    if has(scores) and has(splits):
        yield ("absorption_metrics.png",
               panel_grid(runs, {"mean absorption score": scores, "mean split latents": splits}, labels,
                          "Absorption metrics"),
               "Mean absorption score and mean split latents side by side, per run.")
    yield from letter_figure(runs)
    yield from scr_figure(runs)


def letter_figure(runs: list[Run]) -> Figures:
    letters = {}
    for run in runs:
        details = (eval_result(run, "absorption") or {}).get("eval_result_details") or []
        rates = {d["first_letter"]: number(d.get("mean_absorption_fraction", d.get("absorption_rate")))
                 for d in details if "first_letter" in d}
        if has(list(rates.values())):
            letters[run.plugin] = rates
    if not letters:
        return
    fig, ax = plt.subplots(figsize=(12, 5))
    drawn = [r for r in runs if r.plugin in letters]
    axis = sorted({k for rates in letters.values() for k in rates})
    for run in drawn:
        ax.plot(range(len(axis)), [math.nan if letters[run.plugin].get(k) is None else letters[run.plugin][k]
                                   for k in axis], "o-", color=run.color, label=run.label, ms=4)
    ax.set_xticks(range(len(axis)), axis)
    ax.set_xlabel("first letter of the token")
    ax.set_ylabel("mean absorption fraction")
    ax.grid(alpha=0.3)
    ax.set_title(with_setting("Absorption by first letter", runs), fontsize=11)
    line_legend(ax, runs, drawn)
    yield ("letter_absorption.png", fig,
           "Absorption per first letter (sae_bench absorption details), one line per run.")


def scr_figure(runs: list[Run]) -> Figures:
    curves = {}
    for run in runs:
        result = eval_result(run, "scr")
        keys = sorted({k for k in keys_in(result) if re.fullmatch(r"scr_metric_threshold_\d+", k)},
                      key=lambda k: int(k.rsplit("_", 1)[1]))
        points = [(int(k.rsplit("_", 1)[1]), find(result, k)) for k in keys]
        points = [(t, v) for t, v in points if v is not None]
        if points:
            curves[run.plugin] = points
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(10, 5))
    drawn = [r for r in runs if r.plugin in curves]
    for run in drawn:
        ax.plot(*zip(*curves[run.plugin]), "o-", color=run.color, label=run.label)
    thresholds = sorted({t for points in curves.values() for t, _ in points})
    ax.set_xscale("log")
    ax.set_xticks(thresholds, [str(t) for t in thresholds])
    ax.minorticks_off()
    ax.set_xlabel("latents ablated (threshold k)")
    ax.set_ylabel("SCR metric (higher is better)")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.grid(alpha=0.3)
    ax.set_title(with_setting("Spurious correlation removal by threshold", runs), fontsize=11)
    line_legend(ax, runs, drawn)
    yield ("scr_threshold_comparison.png", fig,
           "SCR metric (sae_bench scr) against the number of latents ablated, one line per run.")


def frequency_figures(runs: list[Run]) -> Figures:
    """Notebook 003, per run: latent activation frequencies (artifacts.safetensors) by latent index,
    and sorted, to judge frequency ordering."""
    from safetensors.numpy import load_file
    from scipy.stats import spearmanr

    for run in runs:
        path = run.folder / "artifacts.safetensors"
        freq = load_file(path).get("feature_frequencies") if path.exists() else None
        if freq is None:
            continue
        freq = freq.astype(np.float64).ravel()
        unit = "fraction of tokens" if freq.max() <= 1.001 else "count"  # an EMA of rates can round past 1
        fig, ax = plt.subplots(figsize=(10, 4.5))
        ax.fill_between(np.arange(len(freq)), freq, step="mid", color=run.color, lw=0)
        ax.set_xlabel("latent index")
        ax.set_ylabel(f"activation frequency ({unit})")
        ax.set_xlim(0, len(freq) - 1)
        ax.grid(alpha=0.3)
        ax.set_title(with_setting(f"{run.label}: activation frequency by latent", [run]), fontsize=11)
        yield (f"feature_frequencies_{run.plugin}.png", fig,
               f"{run.label}: each latent's activation frequency in index order (an ordered SAE decreases "
               "left to right; zeros are dead latents).")

        fig, ax = plt.subplots(figsize=(10, 4.5))
        fired = np.flatnonzero(freq > 0)
        rho = spearmanr(freq, np.arange(len(freq))).statistic if freq.std() > 0 else math.nan  # ties averaged
        ax.plot(np.arange(len(fired)), np.sort(freq)[::-1][:len(fired)], color="black", lw=2,
                label="sorted by frequency (ideal order)")
        ax.plot(fired, freq[fired], ".", color=run.color, ms=3, alpha=0.7, label="in latent index order")
        ax.set_yscale("log")
        ax.set_xlabel("position (latent index, or rank by frequency)")
        ax.set_ylabel(f"activation frequency ({unit}, log)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title_fontsize=8, title=f"Spearman ρ(frequency, index) = {rho:.3f} (−1 = ordered); "
                  f"{len(freq) - len(fired)} dead latents not shown")
        ax.set_title(with_setting(f"{run.label}: frequency ordering", [run]), fontsize=11)
        yield (f"frequency_ordering_{run.plugin}.png", fig,
               f"{run.label}: frequencies in index order against the same frequencies sorted; the closer the "
               "dots follow the line (Spearman ρ near −1), the better the index order matches frequency.")


# The L0–fidelity frontier (SAEBench's first figure): every completed run of the study's plugins
# and of the baselines on the same activations, seeds of one setting pooled.
FRONTIER = ["ce_loss_score", "explained_variance", "kl_div_score"]
GROUND_TRUTH = ["mcc", "f1"]  # figures and columns only where runs have them: synthetic presets


@dataclass
class Point:
    l0: float
    value: float
    error: float | None  # standard error across seeds, else the run's bootstrap one
    seeds: int


def frontier_points(infos: list[dict], name: str) -> list[Point]:
    """One plugin's completed runs as points sorted by L0: runs of one config (the seed, device and
    preset name aside) pooled into their mean, with the standard error across seeds (one seed: its
    bootstrap SE)."""
    groups: dict[str, list[dict]] = {}
    for info in infos:
        config = {k: v for k, v in info.get("provenance", {}).get("config", {}).items()
                  if k not in ("seed", "device", "preset")}  # as studies.comparable: the values, not their names
        groups.setdefault(json.dumps(config, sort_keys=True, default=str), []).append(info)
    points = []
    for group in groups.values():
        pairs = [(l0, v, i) for i in group
                 if (l0 := metric(i, "l0")) and (v := metric(i, name)) is not None and math.isfinite(v)]
        if not pairs:
            continue
        values = [v for _, v, _ in pairs]
        error = (float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1
                 else number(pairs[0][2].get("metrics", {}).get("bootstrap_se", {}).get(SE_KEY.get(name))))
        points.append(Point(float(np.mean([l0 for l0, _, _ in pairs])), float(np.mean(values)), error, len(pairs)))
    return sorted(points, key=lambda p: p.l0)


def sequence(runs: list[Run], values: list[float | None]) -> str:
    """A one-line reading of a metric across runs: first, highest, lowest and last."""
    present = [(r, v) for r, v in zip(runs, values) if v is not None and math.isfinite(v)]
    if not present:
        return ""
    marks = {"first": present[0], "highest": max(present, key=lambda rv: rv[1]),
             "lowest": min(present, key=lambda rv: rv[1]), "last": present[-1]}
    said, parts = set(), []
    for word, (run, value) in marks.items():
        if id(run) not in said:
            said.add(id(run))
            parts.append(f"{word} {value:.3g} (run {run.number}{'' if run.number else ', ' + run.plugin})")
    return "; ".join(parts)


def trend(points: list[Point]) -> str:
    """'0.62 at L0 16 → 0.85 at L0 128' (one point: '0.70 ± 0.01 at L0 40')."""
    first, last = points[0], points[-1]
    if len(points) == 1:
        return f"{meaningful(first.value, first.error)} at L0 {first.l0:.3g}"
    return f"{meaningful(first.value, first.error)} at L0 {first.l0:.3g} → {meaningful(last.value, last.error)} at L0 {last.l0:.3g}"


def meaningful(value: float, error: float | None) -> str:
    """The value with the digits its standard error leaves meaningful, and the error."""
    if not error:
        return f"{value:.3g}"
    digits = max(0, 1 - math.floor(math.log10(error)))
    return f"{value:.{digits}f} ± {error:.1g}"


def minor_l0_label(value: float, _) -> str:
    """20, 30, 50 (and 200, 300, 500...) between the decades, not every tick: 9 beside 10 overlaps."""
    return f"{value:g}" if value > 0 and round(value / 10 ** math.floor(math.log10(value))) in (2, 3, 5) else ""


def frontier_figures(runs: list[Run], everything: list[Run]) -> Figures:
    """Metric against L0 (log): the baselines as dashed reference curves, each plugin of the study
    as markers joined across its settings, error bars from seeds or the bootstrap."""
    caches = {r.info.get("activation_cache") for r in runs}
    plugins = {(r.study, r.plugin): r for r in runs}
    members: dict[tuple[str, str], list[dict]] = {}
    for r in everything:
        if (r.study, r.plugin) in plugins and r.info.get("status") == "completed" \
                and r.info.get("activation_cache") in caches:
            members.setdefault((r.study, r.plugin), []).append(r.info)
    for name in GROUND_TRUTH + FRONTIER:
        series = {key: pts for key, infos in members.items() if (pts := frontier_points(infos, name))}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8.5, 5.2))
        lines = []
        for key, pts in series.items():
            run, baseline = plugins[key], key[0] == "baseline"
            ax.errorbar([p.l0 for p in pts], [p.value for p in pts], yerr=[p.error or 0 for p in pts],
                        color=run.color, ls="--" if baseline else "-",
                        marker="s" if baseline else "o", mfc="white" if baseline else None, capsize=3,
                        label=key[1] if baseline else run.label)
            lines.append(f"{key[1] if baseline else run.label}: {trend(pts)}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 100, not 10²
        ax.xaxis.set_minor_formatter(FuncFormatter(minor_l0_label))
        ax.set_xlabel("L0 (latents active per token, log scale)")
        _, label, better = METRICS[name]
        ax.set_ylabel(textwrap.fill(label, 40))
        drawn = [p for pts in series.values() for p in pts]
        floor_span(ax, least_span(name, [p.value for p in drawn], [p.error for p in drawn]))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(with_setting(f"{name} against L0 ({BETTER[better]}; up and left is better)", runs),
                     fontsize=11)
        yield (f"frontier_{name}.png", fig,
               f"{label[0].upper()}{label[1:]} against L0, error bars one standard error. " + "; ".join(lines) + ".")


def study_figures(runs: list[Run], everything: list[Run] = ()) -> Figures:
    """Every figure with data for a study's chosen runs; `everything` (all its runs, and the
    baselines', every setting and seed) feeds the frontier."""
    yield from frontier_figures(runs, list(everything) or runs)
    yield from core_metric_figures(runs)
    yield from training_curve_figures(runs)
    yield from final_loss_figures(runs)
    yield from eval_figures(runs)
    yield from frequency_figures(runs)


# ----------------------------------------------------------------------------------------------
# Writing figures and figures/README.md.

def plot_all(runs_dir: Path, out: Path, study: str | None = None, picks: Iterable[Path] = ()) -> dict[Path, str]:
    """Write every figure with data for the selected runs, and out/README.md; returns each PNG
    with its caption."""
    index = run_index(runs_dir)
    studies = choose_runs(index, runs_dir, study, picks)
    out.mkdir(parents=True, exist_ok=True)
    readme = out / "README.md"
    if readme.exists():  # figures written last time go, so none outlives the data it came from
        for name in re.findall(r"^- `([^`]+\.png)`", readme.read_text(), flags=re.M):
            (out / name).unlink(missing_ok=True)
    lines = [f"# Figures\n\nWritten by `python plot.py` from `{runs_dir}` on {time.strftime('%Y-%m-%d %H:%M')}: "
             "the latest finished run of each plugin unless picked with `--run`. A failed run is drawn "
             "as a hatched slot or an × marker, never as a zero; a figure is written only where its data exists.\n"]
    written = {}
    for name, runs in studies.items():
        folder = out / name if len(studies) > 1 else out
        folder.mkdir(parents=True, exist_ok=True)
        if len({r.setting for r in runs}) > 1:
            console.print(f"[yellow]warning:[/yellow] study {name} mixes run settings; compare its runs with care")
        lines.append(f"## {name}\n\nRuns:\n")
        lines += [f"- {r.label} (`{r.plugin}`): `{r.folder}` ({r.setting})"
                  + (f" — **failed**: {r.info.get('error', 'no reason recorded')}" if r.failed else "") for r in runs]
        lines.append("\nFigures:\n")
        for file, fig, caption in study_figures(runs, frontier_runs(index, name)):
            path = folder / file
            save(fig, path)
            written[path] = caption
            lines.append(f"- `{path.relative_to(out)}` — {caption}")
        lines.append("")
    readme.write_text("\n".join(lines) + "\n")
    return written


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def sweep_figures(runs_dir: Path, out: Path, study: str, plugin: str) -> dict[Path, str]:
    """A sweep's frontier figures: every run of study/plugin under runs_dir against the baselines
    on the same activations, written to out with their captions (out/README.md)."""
    index = run_index(runs_dir)
    chosen = choose_runs(index, runs_dir, study, ())[study]
    runs = [r for r in chosen if r.plugin == plugin or r.study == "baseline"]
    everything = frontier_runs(index, study)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for file, fig, caption in frontier_figures(runs, everything):
        save(fig, out / file)
        written[out / file] = caption
    (out / "README.md").write_text("# Frontier figures\n\n" + "".join(f"- `{p.name}` — {c}\n" for p, c in written.items()))
    return written


# ----------------------------------------------------------------------------------------------
# The comparison table (`python experiment.py compare`).

TABLE = ["explained_variance", "mse", "l0", "l1", "kl_div_score", "ce_loss_score", "l2_ratio", "final_loss"]
ARROW = {"higher": "↑", "lower": "↓", "one": "→1"}


def best_rows(values: list[float | None], better: str) -> set[int]:
    score = {"higher": lambda v: -v, "lower": lambda v: v, "one": lambda v: abs(v - 1)}[better]
    best = min((score(v) for v in values if v is not None), default=None)
    return {i for i, v in enumerate(values) if v is not None and score(v) == best}


def compare_table(runs_dir: Path, study: str | None = None) -> Table:
    """Runs × key metrics: each plugin's latest run, the best value per column in bold green,
    and in brackets the change against the parent plugin's latest completed run on the same
    activations."""
    index = run_index(runs_dir)
    studies = choose_runs(index, runs_dir, study, ())
    runs = [r for rs in studies.values() for r in rs]
    mixed = " Runs differ in setting (preset, model, layer, size or tokens): compare with care." \
        if len({r.setting for r in runs}) > 1 else ""
    table = Table(title=f"Latest run of each plugin under {runs_dir}",
                  caption="↑ higher is better, ↓ lower is better, →1 closest to 1 is better; best in bold green; "
                          f"(±Δ) against the parent plugin's latest completed run on the same activations.{mixed}")
    if len(studies) > 1:
        table.add_column("study")
    table.add_column("run")
    values = {name: [None if r.failed else metric(r.info, name) for r in runs] for name in GROUND_TRUTH + TABLE}
    columns = [name for name in GROUND_TRUTH if any(v is not None for v in values[name])] + TABLE
    for name in columns:
        table.add_column(f"{name} {ARROW[METRICS[name][2]]}", justify="right")
    table.add_column(f"{'MCC' if columns[0] == 'mcc' else 'CE-loss score'} against the baselines at its L0")
    best = {name: best_rows(values[name], METRICS[name][2]) for name in columns}
    for i, run in enumerate(runs):
        parent = newest(index, run.parent, same_data_as=run.info) if run.parent else None
        if run.failed:
            label = Text(f"{run.label}\nfailed: {textwrap.shorten(str(run.info.get('error', '')), 60)}", style="red")
        else:
            label = Text(run.label)
        cells = []
        for name in columns:
            value = values[name][i]
            if value is None:
                cells.append(Text("failed" if run.failed else "—", style="red" if run.failed else "dim"))
                continue
            cell = Text(f"{value:.4g}", style="bold green" if i in best[name] else "")
            before = metric(parent, name) if parent else None
            if before is not None:
                cell.append(f" ({value - before:+.3g})", style="dim")
            cells.append(cell)
        verdict = "" if run.failed or run.study == "baseline" else matched(run.info.get("verdict", {}))
        table.add_row(*([run.study] if len(studies) > 1 else []), label, *cells, verdict)
    return table


# ----------------------------------------------------------------------------------------------
# The CLI.

app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@app.command(cls=OneLineUsageCommand)
def main(
    runs: Path = typer.Option(ROOT / "runs", help="Searched at any depth for run folders (those holding "
                              "final_info.json), e.g. <study>/<plugin>/<timestamp>/."),
    out: Path = typer.Option(ROOT / "figures", help="Where the PNGs and README.md go."),
    study: str = typer.Option(None, help="Plot only this study."),
    run: list[Path] = typer.Option([], "--run", help="Use this run folder for its plugin instead of the "
                                   "latest (repeatable)."),
) -> None:
    """Write the notebooks' figures for every study's runs (each only where its data exists)."""
    with one_line_errors():
        written = plot_all(runs, out, study, run)
    console.print(f"{len(written)} figures written to {out}; captions in {out / 'README.md'}")


if __name__ == "__main__":
    app()
