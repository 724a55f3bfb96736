"""Study-level analyses: the comparisons each seed notebook asks for beyond its runs' own metrics,
each one command that writes one figure and one notebook paragraph.

    python experiment.py analyse topk_ortho                      # every analysis of the study
    python experiment.py analyse contrastive jl_error --preset tiny --tokens 2048

    study           analysis           what it shows
    topk_ortho      topk_threshold     the top-k pair fraction ablation, fixed τ (run 1) and adaptive τ (run 2)
    adaptive_ortho  alpha              the α ablation of run 1
                    condition_numbers  σ_max/σ_min of each feature group's decoder rows, per run
                    unlearning         sae_bench's WMDP-bio unlearning score: baseline, run 1, fixed ortho (run 10)
    zscore_ortho    reactivation       revived latents against the others: max |cos| to the rest, firing rate
    contrastive     sparsity           log10 firing-frequency histograms on held-out text, per run
                    jl_error           the JL projection's cosine error on decoder-row pairs, per run
    freq_order      ordering           Spearman ρ of held-out firing frequency with latent index, baseline and runs
    topk_ortho, contrastive, freq_order
                    absorption         sae_bench's first-letter absorption, against ReLU + L1 and TopK at matched L0
    zscore_ortho    sparse_probing     sae_probes' top-1 probing accuracy, against ReLU + L1 and TopK at matched L0

The runs come from the study and sweep machinery (studies.study_jobs, sweep_jobs, run_jobs): a
run completed with the same config and plugin source is reused and an interrupted one resumed, so
an analysis after `study` trains only what it adds (a sweep's other values). A sweep analysis's
runs go to RUNS/sweeps/analysis_<study>_<name>-<key of the runs>/<plugin>/ with a
manifest. The figure goes to FIGURES/<study>/analysis_<name>.png; the paragraph (the runs, the
numbers, the figure and its caption read from the data) is appended to the notebook unless it
already holds it word for word, and kept at RUNS/<study>/analyses/<name>.md, where `notes` finds
it when it rebuilds the notebook.

Read top to bottom: the measurements (pure functions of tensors), reading runs, the sweep
analyses, the per-run analyses, and the driver the CLI calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from common import ROOT, HarnessError, console  # first: its import guards

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

import evals  # noqa: E402
import experiment  # noqa: E402
import frontier  # noqa: E402
import plot  # noqa: E402
import studies  # noqa: E402
from notebook import append_notes  # noqa: E402
from runs import NoWeights, Run, headline, read_json, read_run, run_index, same_instrument  # noqa: E402

BASELINE = "run_0_baseline"  # the study command's default baseline, so its runs are reused

# ----------------------------------------------------------------------------------------------
# The measurements: pure functions of a trained SAE's tensors.


@torch.no_grad()
def max_abs_cosine(decoder: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """(d_sae,): m_i = max_{j≠i} |d_i·d_j| / (‖d_i‖‖d_j‖) for the decoder rows d_i, computed in
    blocks of `chunk` rows (never d_sae × d_sae at once)."""
    unit = F.normalize(decoder.detach().double(), dim=1)
    found = []
    for start in range(0, len(unit), chunk):
        cos = (unit[start:start + chunk] @ unit.T).abs()
        rows = torch.arange(len(cos))
        cos[rows, rows + start] = 0.0  # a row with itself
        found.append(cos.amax(1))
    return torch.cat(found).numpy()


@torch.no_grad()
def mean_abs_cosine(decoder: torch.Tensor, chunk: int = 1024) -> float:
    """Mean |cos(d_i, d_j)| over every pair i < j of decoder rows: the whole dictionary's overlap,
    computed in blocks of `chunk` rows."""
    unit = F.normalize(decoder.detach().double(), dim=1)
    total = 0.0
    for start in range(0, len(unit), chunk):
        cos = (unit[start:start + chunk] @ unit.T).abs()
        total += cos.sum().item() - cos.diagonal(start).sum().item()  # less each row with itself
    return total / (len(unit) * (len(unit) - 1))


def random_mean_abs_cosine(d_in: int) -> float:
    """E|cos| of two independent uniformly random directions in d_in dimensions:
    Γ(d/2) / (√π Γ((d+1)/2)), about √(2/(π d)) for large d."""
    return math.exp(math.lgamma(d_in / 2) - math.lgamma((d_in + 1) / 2)) / math.sqrt(math.pi)


def random_unit_rows(n: int, d_in: int, seed: int) -> torch.Tensor:
    """(n, d_in) independent uniformly random unit rows, seeded."""
    return F.normalize(torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


REFERENCE_DRAWS = 5  # dictionaries drawn per reference: their spread is the reference's noise


def reference_kappas(sizes: np.ndarray, rows_for: Callable[[int, int], torch.Tensor],
                     draws: int = REFERENCE_DRAWS) -> np.ndarray:
    """(draws,) mean group κ of `draws` dictionaries whose groups have these sizes, the rows of
    draw k given by rows_for(n, k): random unit rows, or another SAE's rows in random groups."""
    means = []
    for k in range(draws):
        groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes))
        kappas = group_condition_numbers(rows_for(int(sizes.sum()), k), groups, len(sizes))
        means.append(float(np.mean([x for x in kappas if x is not None])))
    return np.asarray(means)


@torch.no_grad()
def group_condition_numbers(decoder: torch.Tensor, groups: torch.Tensor, n_groups: int) -> list[float | None]:
    """κ_g = σ_max(D_g) / σ_min(D_g) for each group g, D_g its latents' decoder rows (n_g × d_in;
    min(n_g, d_in) singular values); None for an empty group, inf for a rank-deficient one."""
    kappas: list[float | None] = []
    for g in range(n_groups):
        rows = decoder.detach()[groups == g].double()
        s = torch.linalg.svdvals(rows) if len(rows) else None
        kappas.append(None if s is None else (s[0] / s[-1]).item() if s[-1] > 0 else math.inf)
    return kappas


@torch.no_grad()
def jl_cosine_errors(sae, rows: int = 2048, w: torch.Tensor | None = None) -> np.ndarray:
    """|cos(P d_i, P d_j) − cos(d_i, d_j)| for every pair i < j of decoder rows d_i (up to `rows` of
    them, evenly spaced), P the plugin's own JL projection (`sae.project`): (n(n−1)/2,). `w`: other
    rows (d_in wide) to project instead of the decoder's, e.g. random ones for a reference."""
    w = (sae.decoder_weight() if w is None else w).detach()
    w = w[torch.linspace(0, len(w) - 1, min(rows, len(w))).round().long()]
    exact = F.normalize(w.double(), dim=1)
    projected = F.normalize(sae.project(w.to(sae.decoder_weight().dtype)).double(), dim=1)
    upper = torch.triu_indices(len(w), len(w), offset=1)
    return ((projected @ projected.T) - (exact @ exact.T))[upper[0], upper[1]].abs().numpy()


def log_frequency_histogram(density: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts of log10(firing frequency) in the bins `edges` over the latents that fired, and the
    number of latents that never fired (log10 0 = −∞: counted apart, never binned)."""
    fired = density > 0
    counts, _ = np.histogram(np.log10(density[fired]), bins=edges)
    return counts, int((~fired).sum())


# ----------------------------------------------------------------------------------------------
# Reading runs: run folders through runs.read_run, SAEs through experiment.saved_sae.

@dataclass
class Setting:
    """What an analysis runs on: the runs it asks for are trained at this preset and overrides
    (as `study` passes them) under `runs`, noted in `notes`."""

    study: str
    preset: str
    overrides: dict[str, Any]
    runs: Path
    notes: Path
    only: tuple[str, ...] = ()  # the per-run analyses' plugins (default: the whole study)
    values: tuple[str, ...] = ()  # a sweep analysis's values (default: its own)
    trained: dict = field(default_factory=dict)  # the study's runs, once run
    models: dict = field(default_factory=dict)  # the model, loaded once for every re-scoring here


class Finding(NamedTuple):
    figure: Figure
    caption: str  # one line that reads the data
    body: str  # the paragraph between its heading and its figure line
    data: dict  # the numbers, by plugin (and swept value): for tests and callers


def shown_path(path: Path | str) -> str:
    path = Path(path)
    return os.path.relpath(path, ROOT) if path.resolve().is_relative_to(ROOT) else str(path)


def completed(rows: list[dict]) -> tuple[list[Run], list[str]]:
    """run_jobs' rows as plot Runs (coloured by run number), and a line for each that failed."""
    runs = plot.paint([read_run(Path(r["folder"])) for r in rows if r["info"].get("status") == "completed"])
    failed = [f"{r['label']} failed: {r['info'].get('error', 'no reason recorded')}"
              for r in rows if r["info"].get("status") != "completed"]
    return runs, failed


def study_runs(s: Setting) -> tuple[list[Run], list[str]]:
    """The baseline and the study's runs (or those named in `only`), each reused, resumed or
    trained by run_jobs; once per Setting."""
    if not s.trained:
        jobs = studies.study_jobs(s.study, [BASELINE], s.preset, dict(s.overrides), s.runs)
        wanted = {(p.study, p.name) for p in map(experiment.find_plugin, s.only)}
        strays = sorted(f"{study}/{name}" for study, name in wanted if study != s.study)
        if strays:
            raise HarnessError(f"--only {', '.join(strays)}: not runs of study {s.study}")
        jobs = [j for j in jobs if not wanted or j.plugin.name == BASELINE or (j.plugin.study, j.plugin.name) in wanted]
        s.trained["rows"] = completed(studies.run_jobs(jobs, s.notes, s.runs))
    return s.trained["rows"]


def trained_sae(run: Run) -> tuple[experiment.SAE, experiment.RunConfig]:
    """The plugin's SAE of a finished run, exactly as evaluated, on the CPU, and its config."""
    cfg, plugin = experiment.saved_config(run.folder, "analyse")
    return experiment.saved_sae(run.folder, cfg, plugin, torch.device("cpu")).inner, cfg


def artifact(run: Run, name: str) -> np.ndarray | None:
    from safetensors.numpy import load_file

    path = run.folder / "artifacts.safetensors"
    return load_file(path).get(name) if path.exists() else None


def runs_with_artifact(s: Setting, name: str) -> tuple[list[tuple[Run, np.ndarray, Any]], list[str]]:
    """(run, its artifact `name`, its SAE as evaluated) for each of the study's runs that saved it,
    and the runs that failed; refused in one line where none did."""
    runs, failed = study_runs(s)
    found = [(run, value, trained_sae(run)[0]) for run in runs if (value := artifact(run, name)) is not None]
    if not found:
        raise HarnessError(f"no run of {s.study} saved a {name} artifact; nothing to measure")
    return found, failed


def firing_frequency(run: Run) -> np.ndarray | None:
    """Each latent's firing frequency on the run's held-out text: the core eval's feature_density
    (fraction of its sparsity batches' tokens, special tokens excluded), which sums to its L0."""
    density = read_json(run.folder / "feature_metrics.json").get("feature_density")
    return None if density is None else np.asarray(density, dtype=np.float64)


def with_seeds(run: Run, index: list) -> list[Run]:
    """The run and every other seed of it that was trained (frontier.seeds_of in `index`, run_index's),
    this one first."""
    return [run, *(read_run(folder) for folder, _ in frontier.seeds_of(run.info, index, run.folder))]


def seed_of(run: Run) -> int:
    return run.info["provenance"]["seed"]  # as frontier.seeds_of reads it


def at_every_seed(runs: list[Run], s: Setting, measure: Callable[[Run], Any]) -> dict[str, list[tuple[Run, Any]]]:
    """{run label: [(the run at a seed, measure(it))]} for every seed of each run that was trained
    (with_seeds), the run's own first; a seed `measure` gives None for (it lacks an artifact or a
    core evaluation) is left out, and so is a run whose own seed it gives None for."""
    index, found = run_index(s.runs), {}
    for run in runs:
        if (own := measure(run)) is not None:
            others = [(other, m) for other in with_seeds(run, index)[1:] if (m := measure(other)) is not None]
            found[run.label] = [(run, own), *others]
    return found


def seed_noise(readings: dict[str, list[tuple[int, dict[str, float | None]]]],
               over: str = "the runs") -> tuple[str, str | None]:
    """(a table of each reading at every seed, "Noise: ..." the seed-to-seed standard deviation of
    each reading pooled over `over` (frontier.seed_spread), or None where no run has two seeds of a
    finite value of any)."""
    names = list(next(iter(readings.values()))[0][1])
    rows = [[label, str(seed), *(fmt(reading[name]) for name in names)]
            for label, seeds in readings.items() for seed, reading in seeds]
    spreads = {name: frontier.seed_spread([[r[name] for _, r in seeds if r[name] is not None and math.isfinite(r[name])]
                                           for seeds in readings.values()]) for name in names}
    measured = [f"{name} {fmt(spread['sd'])} ({spread['dof']} dof)" for name, spread in spreads.items()
                if spread["sd"] is not None]
    stated = f"Noise: the seed-to-seed standard deviation pooled over {over}: " + "; ".join(measured) + "."
    return table(["run", "seed", *names], rows), stated if measured else None


ONE_SEED = "Noise: one seed per run, so the seed-to-seed spread is not measured here."


def with_every_seed(body: str, seeds: str, stated: str, failed: list[str]) -> str:
    """A per-run analysis's body: its table, then each seed's readings, its reference and noise, and
    the runs not analysed."""
    return body + f"\n\nAt every seed:\n\n{seeds}\n\n{stated}" + "".join(f"\n\nNot analysed: {line}" for line in failed)


def plain_log(axis) -> None:
    """A log axis labelled 0.1, 1, 10 (not 10⁻¹, 10⁰, 10¹)."""
    for set_formatter in (axis.set_major_formatter, axis.set_minor_formatter):
        set_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; a | inside a cell (|cos|) is escaped, not a column break."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(row) for row in rows])


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


# ----------------------------------------------------------------------------------------------
# Sweep analyses: plugins × one hyperparameter's values, the baseline as the reference.

class Panel(NamedTuple):
    short: str  # column name in the notebook's table
    label: str  # y axis
    path: tuple[str, ...]  # where final_info.json holds the value
    se_path: tuple[str, ...] | None = None  # where it holds the value's standard error


def core_panel(name: str, short: str) -> Panel:
    where, label, _ = plot.METRICS[name]
    se = ("metrics", "bootstrap_se", plot.SE_KEY[name]) if name in plot.SE_KEY else None
    return Panel(short, label, where, se)


CORE_PANELS = (core_panel("l0", "L0"), core_panel("ce_loss_score", "CE-loss score"),
               core_panel("explained_variance", "explained variance"))


def value_at(info: dict, path: tuple[str, ...] | None) -> float | None:
    node: Any = info
    for key in path or ():
        node = node.get(key) if isinstance(node, dict) else None
    return plot.number(node) if path else None


def sweep_points(s: Setting, name: str, plugins: tuple[str, ...], key: str,
                 values: tuple[str, ...]) -> tuple[dict[str, list[tuple[float, Run]]], Run | None, list[str]]:
    """Each plugin's runs at key=value for every value (sweep_jobs), and the baseline at the same
    setting, through one run_jobs: ({plugin: [(value, run)]}, the baseline run, failures)."""
    baseline = experiment.find_plugin(BASELINE)
    jobs = [studies.Job(studies.job_config(baseline, s.preset, {}, dict(s.overrides)), baseline,
                           s.runs / baseline.study / baseline.name / studies.stamped(s.overrides["seed"]), BASELINE)]
    swept, xs, found = [], [math.nan], [experiment.find_plugin(p) for p in plugins]
    for plugin in found:
        swept += studies.sweep_jobs(plugin, s.preset, [f"{key}={','.join(values)}"], 1, dict(s.overrides),
                                    Path(plugin.name))
        xs += [float(v) for v in values]
    swept, sweep_dir = studies.in_their_folder(swept, s.runs / "sweeps" / f"analysis_{s.study}_{name}")
    rows = studies.run_jobs(jobs + swept, s.notes, s.runs)
    asked = dict(analysis=f"{s.study}/{name}", plugins={p: f.source_hash() for p, f in zip(plugins, found)},
                 grid=f"{key}={','.join(values)}", preset=s.preset, **s.overrides)
    studies.write_manifest(sweep_dir, asked, rows)
    _, failed = completed(rows)
    series: dict[str, list[tuple[float, Run]]] = {}
    for x, row in zip(xs[1:], rows[1:]):
        if row["info"].get("status") == "completed":
            run = read_run(Path(row["folder"]))
            run.color = plot.PALETTE[run.number % len(plot.PALETTE)]
            series.setdefault(run.plugin, []).append((x, run))
    base = completed(rows[:1])[0]
    return series, base[0] if base else None, failed


def sweep_figure(series: dict[str, list[tuple[float, Run]]], baseline: Run | None, key: str,
                 panels: tuple[Panel, ...], title: str) -> Figure:
    """One panel per metric against the swept value (log scale), one line per plugin with its
    standard errors, the baseline at the same setting as a dashed line."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.2), squeeze=False)
    everything = [run for points in series.values() for _, run in points]
    swept = sorted({x for points in series.values() for x, _ in points})
    for ax, panel in zip(axes[0], panels):
        drawn, errors = [], []
        for i, points in enumerate(series.values()):  # marker and line style apart: equal runs overlap
            ys = [value_at(run.info, panel.path) for _, run in points]
            es = [value_at(run.info, panel.se_path) for _, run in points]
            ax.errorbar([x for x, _ in points], [math.nan if y is None else y for y in ys],
                        yerr=[e or 0.0 for e in es], color=points[0][1].color, marker="osD^"[i % 4], capsize=3,
                        ls=("-", ":", "-.")[i % 3], mfc="white" if i else None, label=swept_label(points[0][1]))
            drawn += [y for y in ys if y is not None and math.isfinite(y)]
            errors += es
        if baseline is not None and (reference := value_at(baseline.info, panel.path)) is not None:
            ax.axhline(reference, color=baseline.color, ls="--", label=f"{baseline.label} (same setting)")
        ax.set_xscale("log")
        ax.set_xticks(swept, [f"{x:g}" for x in swept])
        ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel(textwrap.fill(panel.label, 34))
        ax.grid(alpha=0.3, which="both")
        plot.floor_span(ax, plot.least_span(panel.short, drawn, errors))  # noise stays flat
    handles, labels = axes[0][0].get_legend_handles_labels()  # the first panel has the baseline's line
    axes[0][-1].legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(plot.with_setting(title, everything), fontsize=11)
    fig.tight_layout()
    return fig


def swept_label(run: Run) -> str:
    """'Run 1 (run_1_basic_ortho)': its title may name one value of the knob being swept."""
    return f"Run {run.number} ({run.plugin})"


def ends(points: list[tuple[float, Run]], panel: Panel) -> str:
    """'0.85 ± 0.01 at 0.0005 → 0.86 ± 0.01 at 0.005': a panel's value at the first and last swept
    value that have one."""
    found = [(x, y, value_at(run.info, panel.se_path)) for x, run in points
             if (y := value_at(run.info, panel.path)) is not None]
    if not found:
        return "no value"
    first_and_last = found if len(found) == 1 else found[::len(found) - 1]
    return " → ".join(f"{plot.meaningful(y, e)} at {x:g}" for x, y, e in first_and_last)


def sweep_analysis(s: Setting, name: str, plugins: tuple[str, ...], key: str, values: tuple[str, ...],
                   panels: tuple[Panel, ...], title: str, measure: Callable[[Run], dict] | None = None,
                   stated: Callable[[list[Run]], str] = lambda runs: "") -> Finding:
    """plugins × key=values (or --values), each metric of `panels` against the value: the figure,
    a caption reading each plugin's ends per metric and stating the references (`stated(the runs
    measured)`'s beside the baseline's) and the noise, and a table of every run. `measure`: what a
    panel or a reference reads that final_info lacks, measured on each run (the baseline's and
    other seeds' too) and merged into its info here."""
    values = tuple(sorted(s.values or values, key=float))
    series, baseline, failed = sweep_points(s, name, plugins, key, values)
    if not series:
        raise HarnessError(f"no run of the {name} sweep completed: " + "; ".join(failed))
    for run in [run for points in series.values() for _, run in points] + [baseline] * (baseline is not None):
        run.info.update(measure(run) if measure else {})
    figure = sweep_figure(series, baseline, key, panels, title)
    readings = [f"{panel.short}: " + "; ".join(f"{swept_label(points[0][1])} {ends(points, panel)}"
                                               for points in series.values()) for panel in panels]
    caption = (f"{', '.join(p.short for p in panels)} against {key} ({', '.join(values)}), one line per run, "
               "error bars one bootstrap standard error, the baseline dashed. " + ". ".join(readings) + ".")
    header = ["run", key, *(p.short for p in panels), "run folder"]
    lines = [[swept_label(run), f"{x:g}", *(fmt(value_at(run.info, p.path), 4) for p in panels), shown_path(run.folder)]
             for points in series.values() for x, run in points]
    if baseline is not None:
        lines.append([f"{baseline.label} (reference)", "-", *(fmt(value_at(baseline.info, p.path), 4) for p in panels),
                      shown_path(baseline.folder)])
    seeds, noise, seeded = swept_noise(s, series, panels, measure)
    own = stated([run for points in series.values() for _, run in points] + seeded)
    reference = f" Reference: {own + '; ' if own else ''}the baseline at the same setting is the dashed line. {noise}"
    body = table(header, lines) + seeds + "\n\n" + reference.strip() + "".join(f"\n\nNot analysed: {line}" for line in failed)
    data = {(run.plugin, x): {p.short: value_at(run.info, p.path) for p in panels}
            for points in series.values() for x, run in points}
    return Finding(figure, caption + reference, body, data)


def swept_noise(s: Setting, series: dict[str, list[tuple[float, Run]]], panels: tuple[Panel, ...],
                measure: Callable[[Run], dict] | None) -> tuple[str, str, list[Run]]:
    """(each swept value's panels at every seed trained, "Noise: ...", the other seeds' runs, measured):
    the sweep trains one seed per value; a value with other seeds (the study's own run, at the
    notebook's value, at `study --seeds 2`) gives the seed-to-seed spread."""
    index, readings, single, seeded = run_index(s.runs), {}, 0, []
    for points in series.values():
        for x, run in points:
            if len(seeds := with_seeds(run, index)) == 1:
                single += 1
                continue
            for other in seeds[1:]:
                other.info.update(measure(other) if measure else {})
            seeded += seeds[1:]
            readings[f"{swept_label(run)} at {x:g}"] = [(seed_of(r), {p.short: value_at(r.info, p.path) for p in panels})
                                                        for r in seeds]
    bootstrap = "The core metrics carry their bootstrap standard errors."
    table_of_seeds, noise = seed_noise(readings, "the values trained at more than one seed") if readings else ("", None)
    if noise is None:
        return "", f"Noise: one seed per value, so the seed-to-seed spread is not measured here. {bootstrap}", seeded
    return (f"\n\nThe values trained at more than one seed:\n\n{table_of_seeds}",
            f"{noise}{' The other values have one seed each.' * bool(single)} {bootstrap}", seeded)


def stated_range(values: list[float], digits: int = 4) -> str:
    """'x' for one value, 'x–y' for their least and greatest."""
    low, high = fmt(min(values), digits), fmt(max(values), digits)
    return low if low == high else f"{low}–{high}"


def topk_threshold(s: Setting) -> Finding:
    """Top-k threshold ablation with fixed τ (run 1) and adaptive τ (run 2) at each value: the
    fraction of latent pairs the orthogonality loss selects each batch (`topk_percent`, notebook
    0.1%), swept; both τ modes at the same setting, so the fixed-vs-adaptive comparison is read at
    every value. The overlap is the whole dictionary's (mean |cos| over every pair of decoder
    rows, the baseline's beside it), not the selected pairs' (a set that changes with the fraction:
    its mean falls by selection alone), beside random directions' in the same d_in."""
    overlap = Panel("dictionary mean |cos|", "mean |cos| over every pair of decoder rows",
                    ("dictionary_overlap", "mean_abs_cos"))

    def dictionary_overlap(run: Run) -> dict:
        sae, _ = trained_sae(run)
        return {"dictionary_overlap": {"mean_abs_cos": mean_abs_cosine(sae.decoder_weight()), "d_in": sae.cfg.d_in,
                                       "random_directions": random_mean_abs_cosine(sae.cfg.d_in)}}

    def random_overlap(runs: list[Run]) -> str:
        (d_in, random), = {(r.info["dictionary_overlap"]["d_in"], r.info["dictionary_overlap"]["random_directions"])
                           for r in runs}  # one model, one layer
        return f"random directions in d_in = {d_in} dimensions have mean |cos| {random:.4f}"

    return sweep_analysis(s, "topk_threshold", ("topk_ortho/run_1_topk_pairs", "topk_ortho/run_2_adaptive_tau"),
                          "topk_percent", ("0.0005", "0.001", "0.002", "0.005"), (*CORE_PANELS, overlap),
                          "Top-k threshold ablation, fixed and adaptive τ", measure=dictionary_overlap,
                          stated=random_overlap)


def alpha_ablation(s: Setting) -> Finding:
    """α ablation: the weight of run 1's between-group orthogonality loss (notebook α = 0.1, the
    controlled-sharing knob: smaller α, more sharing), swept over decades around it, with the
    condition numbers of the groups' decoder subspaces it is meant to improve, beside κ of random
    unit rows in groups of each run's sizes (a group's size against d_in sets much of its κ)."""
    kappa = Panel("mean group κ", "mean condition number σ_max/σ_min of the groups' decoder rows",
                  ("subspace_condition_numbers", "mean"))

    def random_group_kappa(run: Run) -> dict:
        if (groups := artifact(run, "feature_group")) is None:
            return {}
        d_in = trained_sae(run)[0].cfg.d_in
        return {"random_group_kappa": float(reference_kappas(np.bincount(groups), lambda rows, k: random_unit_rows(
            rows, d_in, seed=k)).mean())}

    def random_kappas(runs: list[Run]) -> str:
        found = [r.info["random_group_kappa"] for r in runs if "random_group_kappa" in r.info]
        return "" if not found else (f"random unit rows in groups of each run's sizes have mean κ "
                                     f"{stated_range(found)} (mean over {REFERENCE_DRAWS} draws)")

    return sweep_analysis(s, "alpha", ("adaptive_ortho/run_1_basic_ortho",), "alpha", ("0.01", "0.1", "1", "10"),
                          (*CORE_PANELS, kappa), "α ablation of the adaptive orthogonality loss",
                          measure=random_group_kappa, stated=random_kappas)


# ----------------------------------------------------------------------------------------------
# Per-run analyses: every run of the study (or --only), each measured on its saved SAE and its
# held-out evaluation.

def condition_numbers(s: Setting) -> Finding:
    """Condition numbers of the feature subspaces: for each run's feature groups (its
    `feature_group` artifact), κ_g = σ_max/σ_min of group g's decoder rows of the SAE as evaluated;
    1 is an orthonormal subspace, large κ a group whose directions nearly coincide. κ depends on a
    group's size against d_in (a group of more rows than d_in has σ_min near 0 whatever its
    training), so each run's mean κ stands beside two references with the same group sizes: random
    unit rows, and the baseline's decoder rows dealt into groups at random; each reference is the
    mean over REFERENCE_DRAWS draws, its spread across draws the noise. Each run's mean κ is read
    at every seed of it that was trained too: their spread is the run's own noise."""
    found, failed = runs_with_artifact(s, "feature_group")
    base = next((run for run in study_runs(s)[0] if run.plugin == BASELINE), None)
    base_rows = trained_sae(base)[0].decoder_weight().detach().double() if base is not None else None
    measured, index = {}, run_index(s.runs)
    for run, groups, sae in found:
        n, sizes = sae.hp.n_groups, np.bincount(groups, minlength=sae.hp.n_groups)
        d_in = sae.cfg.d_in
        random_ref = reference_kappas(sizes, lambda rows, k: random_unit_rows(rows, d_in, seed=k))
        base_ref = None if base_rows is None else reference_kappas(sizes, lambda rows, k: base_rows[
            torch.randperm(len(base_rows), generator=torch.Generator().manual_seed(k))[:rows]])
        kappas = group_condition_numbers(sae.decoder_weight(), torch.as_tensor(groups), n)
        others = [mean_kappa(group_condition_numbers(trained_sae(other)[0].decoder_weight(), torch.as_tensor(g), n))
                  for other in with_seeds(run, index)[1:] if (g := artifact(other, "feature_group")) is not None]
        measured[run.label] = (run, kappas, sizes, random_ref, base_ref, [mean_kappa(kappas), *others])
    fig = condition_figure(measured)
    rows, readings = [], []
    for run, kappas, sizes, random_ref, base_ref, seed_means in measured.values():
        present, mean = [k for k in kappas if k is not None], mean_kappa(kappas)
        refs = [f"{r.mean():.4g} ± {r.std():.2g}" if r is not None else "-" for r in (random_ref, base_ref)]
        seeds = f" ({len(seed_means)} seeds: {', '.join(fmt(m, 4) for m in seed_means)})" * (len(seed_means) > 1)
        rows.append([run.label, str(len(present)), fmt(mean, 4) + seeds, *refs, fmt(max(present, default=None), 4),
                     fmt(min(present, default=None), 4), " ".join(map(str, sizes.tolist())), shown_path(run.folder)])
        readings.append(f"{run.label} mean {fmt(mean)} (random rows {refs[0]}, baseline rows {refs[1]})")
    caption = ("Each feature group's condition number σ_max/σ_min of its decoder rows (dots), the mean per run "
               "(bar), beside the mean κ of random unit rows (open circle) and of the baseline's rows (cross) in "
               f"groups of the same sizes, mean ± spread over {REFERENCE_DRAWS} draws: " + "; ".join(readings) + ".")
    body = table(["run", "groups", "mean κ (first seed; each seed's)", "random unit rows: mean κ ± sd",
                  "baseline rows: mean κ ± sd", "max κ", "min κ", "group sizes", "run folder (first seed)"], rows)
    body += "".join(f"\n\nNot analysed: {line}" for line in failed)
    return Finding(fig, caption, body, {run.plugin: dict(kappas=kappas, folder=run.folder, random=random_ref,
                                                          baseline=base_ref, seed_means=seed_means)
                                        for run, kappas, _, random_ref, base_ref, seed_means in measured.values()})


def mean_kappa(kappas: list[float | None]) -> float | None:
    """The mean κ of the groups that have one (an empty group has none)."""
    present = [k for k in kappas if k is not None]
    return float(np.mean(present)) if present else None


def condition_figure(measured: dict[str, tuple]) -> Figure:
    """Per run, its groups' κ (dots), their mean (bar) and the two references' means."""
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(measured) + 3), 4.8))
    for i, (run, kappas, _, random_ref, base_ref, _) in enumerate(measured.values()):
        finite = [k for k in kappas if k is not None and math.isfinite(k)]
        ax.scatter(i + np.linspace(-0.2, 0.2, len(finite)), finite, color=run.color, s=22, alpha=0.8)
        if (mean := mean_kappa(kappas)) is not None and math.isfinite(mean):
            ax.plot([i - 0.3, i + 0.3], [mean, mean], color="black", lw=2)
        for ref, marker, label in ((random_ref, "o", "random unit rows"), (base_ref, "x", "baseline rows")):
            if ref is not None and math.isfinite(ref.mean()):
                ax.errorbar([i + 0.35], [ref.mean()], yerr=[ref.std()], color="black", marker=marker, mfc="white",
                            capsize=3, label=f"{label}, same group sizes" if i == 0 else None)
    ax.set_xticks(range(len(measured)), list(measured), rotation=30, ha="right")
    ax.set_yscale("log")
    plain_log(ax.yaxis)
    ax.set_ylabel("condition number σ_max/σ_min (log)")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(plot.with_setting("Condition numbers of the feature groups' decoder subspaces",
                                   [m[0] for m in measured.values()]), fontsize=11)
    return fig


@functools.cache
def random_max_cosine(d_sae: int, d_in: int) -> np.ndarray:
    """max_abs_cosine of d_sae random unit rows in d_in dimensions (seed 0): the reference, once a shape."""
    return max_abs_cosine(random_unit_rows(d_sae, d_in, seed=0))


def revival(run: Run) -> dict | None:
    """A run's revived latents (its `revived_at` artifact) and its decoder rows' max |cos| with the
    rest: of each revived row at its last revival (`revived_max_cos`) and of every row at the end;
    each latent's firing frequency on the held-out text; random unit rows of the same shape's max
    |cos|. None for a run that revives nothing or has no core evaluation."""
    if (revived_at := artifact(run, "revived_at")) is None or (rate := firing_frequency(run)) is None:
        return None
    sae, revived = trained_sae(run)[0], revived_at >= 0
    return dict(run=run, revived=revived, before=artifact(run, "revived_max_cos")[revived],
                after=max_abs_cosine(sae.decoder_weight()), rate=rate,
                random=random_max_cosine(sae.cfg.d_sae, sae.cfg.d_in))


def revival_readings(m: dict) -> dict[str, float | None]:
    """The medians, means and shares the reactivation table reads from a revival(run)."""
    revived, after, rate = m["revived"], m["after"], m["rate"]
    some = bool(revived.any())  # else the revived columns have no value
    return {"revived": float(revived.sum()),
            "median max |cos|, revived, at revival": float(np.median(m["before"])) if some else None,
            "median max |cos|, revived, at the end": float(np.median(after[revived])) if some else None,
            "median max |cos|, others, at the end": float(np.median(after[~revived])),
            "mean firing frequency, revived": float(rate[revived].mean()) if some else None,
            "mean firing frequency, others": float(rate[~revived].mean()),
            "share never fired, revived": float((rate[revived] == 0).mean()) if some else None,
            "share never fired, others": float((rate[~revived] == 0).mean())}


def reactivation(s: Setting) -> Finding:
    """Reactivation impact on feature diversity: the latents a run revived (its `revived_at`
    artifact) against the others, by each decoder row's max |cos| with the rest (diversity: lower
    is more distinct) at its last revival, the new direction just written (`revived_max_cos`), and
    at the end, and by firing frequency on the held-out text. Reference: the max |cos| of random
    unit rows of the same shape (d_sae × d_in), median and 10th-90th percentiles over its rows, the
    spread a row's max |cos| has with no training at all. Noise: each reading at every seed of each
    run that was trained, its seed-to-seed spread pooled over the runs."""
    runs, failed = study_runs(s)
    seeds = at_every_seed(runs, s, revival)
    if not seeds:
        raise HarnessError(f"no run of {s.study} saved a revived_at artifact and a core evaluation; nothing to measure")
    measured = {label: found[0][1] for label, found in seeds.items()}  # each run's own seed
    rows, readings = [], []
    for label, m in measured.items():
        cells = revival_readings(m)
        low, mid, high = np.percentile(m["random"], [10, 50, 90])
        rows.append([label, *(fmt(c) for c in cells.values()), f"{mid:.3g} ({low:.3g}-{high:.3g})",
                     shown_path(m["run"].folder)])
        readings.append(f"{label} at seed {seed_of(m['run'])}: {int(cells['revived'])} revived, median max |cos| "
                        f"{fmt(cells['median max |cos|, revived, at revival'])} at revival → "
                        f"{fmt(cells['median max |cos|, revived, at the end'])} at the end (others "
                        f"{fmt(cells['median max |cos|, others, at the end'])}; random unit rows {mid:.3g}, "
                        f"10th-90th pct {low:.3g}-{high:.3g}), mean firing frequency "
                        f"{fmt(cells['mean firing frequency, revived'])} (others "
                        f"{fmt(cells['mean firing frequency, others'])})")
    table_of_seeds, noise = seed_noise({label: [(seed_of(r), revival_readings(m)) for r, m in found]
                                        for label, found in seeds.items()})
    caption = ("Revived latents against the others: max |cos| of each decoder row with the rest at revival (the "
               "new direction) and at the end, beside random unit rows of the same shape, and firing frequency on "
               "the held-out text. " + "; ".join(readings) + ". " + (noise or ONE_SEED))
    body = table(["run", *revival_readings(next(iter(measured.values()))),
                  "random unit rows: median max |cos| (10th-90th pct)", "run folder (first seed)"], rows)
    data = {m["run"].plugin: {"folder": m["run"].folder, **{k: m[k] for k in ("revived", "before", "after", "rate",
                                                                                 "random")}}
            for m in measured.values()}
    return Finding(reactivation_figure(measured), caption, with_every_seed(body, table_of_seeds, noise or ONE_SEED,
                                                                           failed), data)


def reactivation_figure(measured: dict[str, dict]) -> Figure:
    """Per run, boxes of max |cos| (revived before, revived after, others) and of log10 firing
    frequency of the latents that fired (revived, others)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 1.6 * len(measured) + 3), 8.5))
    groups = (("revived, at revival", "#d62728"), ("revived, at the end", "#ff7f0e"),
              ("others, at the end", "#7f7f7f"))
    for i, m in enumerate(measured.values()):
        revived, rate = m["revived"], m["rate"]
        boxes = [m["before"], m["after"][revived], m["after"][~revived]]
        top.hlines(np.median(m["random"]), i - 0.45, i + 0.45, colors="black", linestyles=":",
                   label="random unit rows, median" if i == 0 else None)
        for j, (values, (_, color)) in enumerate(zip(boxes, groups)):
            if len(values):
                top.boxplot([values], positions=[i + (j - 1) * 0.27], widths=0.22, showfliers=False, patch_artist=True,
                            boxprops=dict(facecolor=color, alpha=0.6), medianprops=dict(color="black"))
        for j, chosen in enumerate((revived, ~revived)):
            fired = rate[chosen][rate[chosen] > 0]
            if len(fired):
                bottom.boxplot([np.log10(fired)], positions=[i + (j - 0.5) * 0.35], widths=0.3, showfliers=False,
                               patch_artist=True, boxprops=dict(facecolor=groups[1 + j][1], alpha=0.6),
                               medianprops=dict(color="black"))
            if chosen.any():
                bottom.annotate(f"{int((rate[chosen] == 0).sum())} never fired", (i + (j - 0.5) * 0.35, 0.98),
                                xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=7)
    for ax in (top, bottom):
        ax.set_xticks(range(len(measured)), list(measured), rotation=20, ha="right")
        ax.set_xlim(-0.6, len(measured) - 0.4)
        ax.grid(axis="y", alpha=0.3)
    top.set_ylabel("max |cos| of the decoder row with the rest")
    top.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for _, c in groups]
               + [plt.Line2D([], [], color="black", ls=":")],
               labels=[g for g, _ in groups] + ["random unit rows, median"], fontsize=8, loc="upper left",
               bbox_to_anchor=(1.01, 1.0))
    bottom.set_ylabel("log10 firing frequency on held-out text\n(latents that fired; revived | others)")
    runs = [m["run"] for m in measured.values()]
    top.set_title(plot.with_setting("Reactivation and feature diversity: revived latents against the others", runs),
                  fontsize=11)
    fig.tight_layout()
    return fig


def sparsity_distributions(s: Setting) -> Finding:
    """Final activation-sparsity distributions: each run's histogram of log10 firing frequency of
    its latents on the held-out text (the core eval's feature_density, which sums to the run's L0),
    the latents that never fired counted beside it. Reference: the baseline, which has no
    contrastive mechanism, at the same setting. Noise: the never-fired count and the median
    frequency at every seed of each run that was trained, their spread pooled over the runs."""
    runs, failed = study_runs(s)
    seeds = at_every_seed(runs, s, firing_frequency)
    if not seeds:
        raise HarnessError(f"no run of {s.study} has a core evaluation's feature_metrics.json; run it with core")
    densities = {label: found[0] for label, found in seeds.items()}  # each run's own seed
    least = min((d[d > 0].min() for _, d in densities.values() if (d > 0).any()), default=1e-4)
    edges = np.linspace(math.floor(np.log10(least)), 0.0, 8 * -math.floor(np.log10(least)) + 1)  # 8 bins a decade
    rows, readings, data = [], [], {}
    for label, (run, density) in densities.items():
        counts, silent = log_frequency_histogram(density, edges)
        fired = density[density > 0]
        q10, q50, q90 = np.percentile(fired, [10, 50, 90]) if len(fired) else (None,) * 3
        rows.append([label, str(len(fired)), str(silent), fmt(q50), fmt(q10), fmt(q90), fmt(float(density.sum()), 4),
                     shown_path(run.folder)])
        readings.append(f"{label} at seed {seed_of(run)} median {fmt(q50)} of the latents that fired, {silent} never fired")
        data[run.plugin] = dict(counts=counts, silent=silent, density=density, folder=run.folder, run=run)
    table_of_seeds, noise = seed_noise({label: [(seed_of(r), sparsity_readings(d)) for r, d in found]
                                        for label, found in seeds.items()})
    stated = ("Reference: the baseline (no contrastive mechanism) at the same setting. " if BASELINE in data else
              "Reference: none here (the baseline was not analysed). ") + (noise or ONE_SEED)
    caption = ("Histogram of each latent's log10 firing frequency on the held-out text, one line per run "
               f"(8 bins a decade from 1e{edges[0]:.0f}): " + "; ".join(readings) + f". {stated}")
    body = table(["run", "latents fired", "never fired", "median frequency", "10th pct", "90th pct",
                  "Σ frequency (= L0)", "run folder (first seed)"], rows)
    figure = sparsity_figure(data, edges)
    data = {plugin: {k: v for k, v in m.items() if k != "run"} for plugin, m in data.items()} | {"edges": edges}
    return Finding(figure, caption, with_every_seed(body, table_of_seeds, stated, failed), data)


def sparsity_figure(data: dict[str, dict], edges: np.ndarray) -> Figure:
    """Each run's histogram of log10 firing frequency (its counts in `edges`), one line a run."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for m in data.values():
        ax.stairs(m["counts"], edges, color=m["run"].color, lw=1.8, label=f"{m['run'].label} ({m['silent']} never fired)")
    ax.set_xlabel("log10 firing frequency (fraction of held-out tokens)")
    ax.set_ylabel("latents")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(plot.with_setting("Activation-sparsity distributions on held-out text",
                                   [m["run"] for m in data.values()]), fontsize=11)
    return fig


def sparsity_readings(density: np.ndarray) -> dict[str, float | None]:
    """A run's never-fired count and the median firing frequency of the latents that fired."""
    fired = density[density > 0]
    return {"never fired": float((density == 0).sum()), "median frequency": float(np.median(fired)) if len(fired) else None}


def frequency_order(s: Setting) -> Finding:
    """Frequency ordering on held-out text: Spearman ρ between each latent's index and its firing
    frequency on the core eval's held-out tokens (feature_density; −1 = most frequent first), for
    the baseline, which has no ordering mechanism, and each run, every seed of each trained (their
    mean, and each); beside it the ρ the run tracked in training (its EMA of firing rates,
    `frequency_index_spearman`)."""
    from scipy.stats import spearmanr

    def rho(density: np.ndarray) -> float:
        return float(spearmanr(density, np.arange(len(density))).statistic) if density.std() > 0 else math.nan

    runs, failed = study_runs(s)
    every_seed = at_every_seed(runs, s, firing_frequency)
    if not every_seed:
        raise HarnessError(f"no run of {s.study} has a core evaluation's feature_metrics.json; run it with core")
    measured = {found[0][0].plugin: found[0] for found in every_seed.values()}  # each run's own seed
    rows, data = [], {}
    for found in every_seed.values():
        (run, density), plugin = found[0], found[0][0].plugin
        seeds = [rho(d) for _, d in found]
        tracked = plot.number(run.info.get("frequency_index_spearman"))
        finite = [r for r in seeds if math.isfinite(r)]  # a run whose latents all fire alike has no ρ
        data[plugin] = dict(rho=float(np.mean(finite)) if finite else math.nan, seeds=seeds, tracked=tracked,
                            silent=int((density == 0).sum()), folder=run.folder)
        rows.append([run.label, fmt(data[plugin]["rho"]) + f" ({', '.join(map(fmt, seeds))})" * (len(seeds) > 1),
                     str(len(seeds)), fmt(tracked), str(data[plugin]["silent"]), shown_path(run.folder)])
    n = len(next(iter(measured.values()))[1])
    null = 1 / math.sqrt(n - 1)  # ρ's standard deviation between an index and an unrelated order
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [measured[p][0].label for p in data]
    ax.bar(range(len(data)), [d["rho"] for d in data.values()], color=[measured[p][0].color for p in data])
    ax.axhspan(-2 * null, 2 * null, color="0.85", label=f"unrelated order: ±2/√(n−1) = ±{2 * null:.3f}")
    ax.set_xticks(range(len(data)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Spearman ρ(held-out frequency, index)")
    ax.set_ylim(-1.05, 1.05)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(plot.with_setting("Frequency ordering on held-out text", [r for r, _ in measured.values()]),
                 fontsize=11)
    spread = frontier.seed_spread([[r for r in d["seeds"] if math.isfinite(r)] for plugin, d in data.items()
                                   if plugin != BASELINE])  # the ordered runs' ρ near −1 spreads less than 0's
    reference = (f"Reference: an index unrelated to frequency reads ρ 0 ± {null:.3f} (one standard deviation, "
                 f"{n} latents); the baseline, with no ordering mechanism, reads "
                 f"{fmt(data[BASELINE]['rho']) if BASELINE in data else '-'}. Noise: "
                 + ("one seed per run." if spread["sd"] is None else
                    f"the seed-to-seed standard deviation of ρ pooled over the study's runs, {fmt(spread['sd'])} "
                    f"({spread['dof']} dof)."))
    caption = ("Spearman ρ between latent index and firing frequency on the held-out text, per run: "
               + "; ".join(f"{measured[p][0].label} {fmt(d['rho'])}" for p, d in data.items()) + ". " + reference)
    body = table(["run", "ρ held-out (seeds' mean (each))", "seeds", "ρ tracked in training (first seed)",
                  "never fired (first seed)", "run folder (first seed)"], rows)
    return Finding(fig, caption, body + "\n\n" + reference + "".join(f"\n\nNot analysed: {line}" for line in failed),
                   data)


def jl_measured(run: Run) -> dict | None:
    """A run's JL projection errors on its decoder rows and on random unit rows of the same count
    through the same projection, its final contrast threshold, k and d_in; None without a projection."""
    sae, cfg = trained_sae(run)
    if not hasattr(sae, "project"):
        return None
    threshold = sae.contrast_threshold(cfg.steps - 1) if hasattr(sae, "contrast_threshold") else None
    errors = jl_cosine_errors(sae)
    rows = random_unit_rows(min(2048, sae.cfg.d_sae), sae.cfg.d_in, seed=0)
    return dict(run=run, errors=errors, random=jl_cosine_errors(sae, w=rows), threshold=threshold,
                k=sae.jl.shape[1], d_in=sae.cfg.d_in,
                over=None if threshold is None else float((errors > threshold).mean()))


def jl_readings(m: dict) -> dict[str, float | None]:
    """The mean and 95th percentile of a jl_measured(run)'s errors, and the share beyond its threshold."""
    return {"mean error": float(m["errors"].mean()), "95th pct": float(np.percentile(m["errors"], 95)),
            "fraction of pairs erring beyond the threshold": m["over"]}


def jl_error(s: Setting) -> Finding:
    """JL approximation quality: for each run with a JL projection, the error of the projected
    cosine against the exact one, |cos(P d_i, P d_j) − cos(d_i, d_j)|, over all pairs of decoder
    rows of the SAE as evaluated (up to 2048 rows), against the run's final contrast threshold (a
    threshold below the projection's own error measures its noise). Reference: the same projection
    on random unit rows of the same count (what it errs with no training). Noise: each reading at
    every seed of each run that was trained (each seed draws its own projection)."""
    runs, failed = study_runs(s)
    seeds = at_every_seed(runs, s, jl_measured)
    if not seeds:
        raise HarnessError(f"no run of {s.study} has a JL projection (`project`); nothing to measure")
    measured = {label: found[0][1] for label, found in seeds.items()}  # each run's own seed
    rows, readings = [], []
    for label, m in measured.items():
        errors, random = m["errors"], m["random"]
        stats = [errors.mean(), np.percentile(errors, 95), errors.max(), m["threshold"], m["over"], random.mean(),
                 np.percentile(random, 95)]
        rows.append([label, str(m["k"]), str(len(errors)), *(fmt(v) for v in stats), shown_path(m["run"].folder)])
        readings.append(f"{label} at seed {seed_of(m['run'])} mean {fmt(stats[0])}, 95th pct {fmt(stats[1])} (random "
                        f"unit rows {fmt(stats[5])}, {fmt(stats[6])}), final threshold {fmt(m['threshold'])}"
                        + ("" if m["over"] is None else f" ({m['over']:.1%} of pairs err by more)"))
    table_of_seeds, noise = seed_noise({label: [(seed_of(r), jl_readings(m)) for r, m in found]
                                        for label, found in seeds.items()})
    stated = f"Reference: the same projection on as many random unit rows (dotted). {noise or ONE_SEED}"
    caption = "Cumulative distribution of the JL projection's cosine error per run: " + "; ".join(readings) + f". {stated}"
    body = table(["run", "JL dim", "pairs", "mean error", "95th pct", "max", "final threshold",
                  "fraction of pairs erring beyond it", "random rows: mean error", "random rows: 95th pct",
                  "run folder (first seed)"], rows)
    data = {m["run"].plugin: dict(errors=m["errors"], random=m["random"], threshold=m["threshold"],
                                  folder=m["run"].folder) for m in measured.values()}
    return Finding(jl_figure(measured), caption, with_every_seed(body, table_of_seeds, stated, failed), data)


def jl_figure(measured: dict[str, dict]) -> Figure:
    """Per run, the cumulative distribution of its errors (solid), random rows' (dotted), its threshold (dashed)."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for label, m in measured.items():
        ax.ecdf(m["errors"], color=m["run"].color, lw=1.8, label=f"{label} (k = {m['k']} of d_in {m['d_in']})")
        ax.ecdf(m["random"], color=m["run"].color, lw=1, ls=":")
        if m["threshold"] is not None:
            ax.axvline(m["threshold"], color=m["run"].color, ls="--", lw=1)
    ax.set_xlabel("|projected cosine − exact cosine| of decoder-row pairs")
    ax.set_ylabel("fraction of pairs with at most this error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title_fontsize=8,
              title="dotted: random unit rows, same projection\ndashed: final contrast threshold")
    ax.set_title(plot.with_setting("JL projection's cosine error on decoder-row pairs",
                                   [m["run"] for m in measured.values()]), fontsize=11)
    return fig


# ----------------------------------------------------------------------------------------------
# An offline evaluation against the baselines at the run's L0: sae_bench's absorption or
# sae_probes on the study's runs and on the ReLU + L1 and TopK sweeps on the same activations.

class Scored(NamedTuple):
    eval_name: str  # the harness's eval (--evals), run on a saved SAE where its final_info lacks it
    result: str  # its eval_type_id in final_info's evals
    key: str  # the number read from that result
    label: str
    higher_is_better: bool


ABSORPTION = Scored("absorption", "absorption_first_letter", "mean_absorption_fraction_score",
                    "mean absorption fraction (sae_bench, first letter)", False)
PROBING = Scored("sae_probes", "sparse_probing_sae_probes", "sae_top_1_test_accuracy",
                 "top-1 sparse probing accuracy (sae_probes)", True)
AGAINST = ("run_0_baseline", "run_0_topk")  # the L1 and the TopK family, as swept on the study's activations


def scored_info(folder: Path, info: dict, what: Scored, s: Setting) -> dict:
    """The run's final_info with `what` in it: evaluated now (studies.rescore) where it lacks it or
    holds it from another instrument (an eval seed other than runs.EVAL_SEED), and once only,
    should another process be evaluating it meanwhile."""
    def has_it(found: dict) -> bool:
        return same_instrument(found.get("evals", {}).get(what.result))
    if has_it(info):
        return info
    return studies.rescore(folder, what.eval_name, s.overrides.get("device") or "auto", s.notes, wait=True,
                           unless=has_it, loaded_models=s.models)


def swept_runs(s: Setting, like: dict) -> dict[str, list[tuple[Path, dict]]]:
    """Each AGAINST baseline's completed runs (folder, final_info), every seed, on the activations of
    the run `like` and at its matched settings, as its verdicts count them (plot.reference_baselines)."""
    index = [(folder, who, info) for folder, who, info in plot.reference_baselines(run_index(s.runs))
             if info.get("status") == "completed" and info.get("activation_cache") == like.get("activation_cache")
             and frontier.trained_alike(info, like)]
    return {name: [(folder, info) for folder, who, info in index if who["plugin"] == name] for name in AGAINST}


def baseline_curve(points: list[dict], knob: str, what: Scored) -> dict:
    """A baseline's sweep for `what`: per knob value (the newest run of each seed), its seeds' mean
    L0 and value, how many seeds and their values, sorted by L0, and the seed-to-seed spread pooled
    over its knob values (frontier.seed_spread)."""
    settings: dict[Any, dict[Any, tuple[float, float]]] = {}
    for info in points:  # oldest first: a newer run of a knob value and seed replaces an older one
        value, record = plot.find(info["evals"].get(what.result), what.key), frontier.record_from_final_info(info, knob)
        if value is not None and record["l0"]:
            settings.setdefault(record["knob"][1], {})[record["seed"]] = (record["l0"], value)
    pooled = sorted((float(np.mean([l0 for l0, _ in seeds.values()])), float(np.mean([v for _, v in seeds.values()])),
                     [v for _, v in seeds.values()], knob_value) for knob_value, seeds in settings.items())
    return dict(l0=[p[0] for p in pooled], value=[p[1] for p in pooled], seeds=[len(p[2]) for p in pooled],
                seed_values=[p[2] for p in pooled], knob=[p[3] for p in pooled],
                spread=frontier.seed_spread([[v for _, v in seeds.values()] for seeds in settings.values()]))


def against_curve(l0: float, seed_values: list[float], curve: dict) -> dict:
    """A run (its seeds' values, read at their mean L0) against a baseline's curve at its L0: the
    curve's value there (frontier.interpolate: linear in log L0 between its two knob values around
    it), Δ of the seeds' mean, the noise of that difference as the verdicts take it
    (frontier.seed_parts: each side's seed-to-seed spread, the run's own from two seeds on, else the
    baseline's, over its seeds and the interpolation's weights) and the word: higher or lower beyond
    the standard errors those spreads' degrees of freedom need (frontier.standard_errors_needed)."""
    if len(curve["l0"]) < 2:
        return dict(word="no baseline runs" if not curve["l0"] else "one knob value only")
    points = [dict(l0=x, value=v, uncertainty=None, knob_value=k, seed_values=s)
              for x, v, k, s in zip(curve["l0"], curve["value"], curve["knob"], curve["seed_values"])]
    found = frontier.interpolate({"points": points}, l0)
    if found["value"] is None:
        return dict(word="outside its sweep")
    parts, dofs = frontier.seed_parts("value", {"seed_values": {"value": seed_values}}, found,
                                      {"seed_spread": curve["spread"]})
    noise = None if None in parts.values() else math.sqrt(sum(u * u for u in parts.values()))
    delta = float(np.mean(seed_values)) - found["value"]
    needed = frontier.standard_errors_needed(parts, dofs)
    word = ("no seed spread" if noise is None else "within noise" if abs(delta) <= needed * noise
            else "higher" if delta > 0 else "lower")
    return dict(at=found["value"], delta=delta, noise=noise, needed=needed, word=word)


def seeds_mean(infos: list[dict], what: Scored) -> tuple[float | None, float | None, list, list[str]]:
    """A run's seeds (final_infos holding `what`) as (mean L0, mean value, each seed's value, what
    could not be read: a seed not scored, as too few letters read for absorption, or without an L0)."""
    results = [info["evals"][what.result] for info in infos]
    values, l0s = [plot.find(r, what.key) for r in results], [headline(info, "L0") for info in infos]
    unread = [f"seed {info['provenance']['seed']} " + (f"not scored: {r.get('not_scored', 'no value')}"
                                                       if v is None else "has no L0")
              for info, r, v, x in zip(infos, results, values, l0s) if v is None or x is None]
    return (None, None, values, unread) if unread else (float(np.mean(l0s)), float(np.mean(values)), values, [])


def against_baselines(s: Setting, what: Scored) -> Finding:
    """The study's runs evaluated with `what`, every seed of each that was trained (frontier.seeds_of),
    each run's seeds' mean against the ReLU + L1 and TopK sweeps at its L0 (every seed of theirs
    evaluated too, once): the reference is the baseline's value interpolated at the run's L0, the
    noise the baseline's seed-to-seed spread of the metric as a difference of two seed means."""
    cfg = experiment.build_config(s.preset, f"baseline/{BASELINE}", **s.overrides)
    try:
        evals.check_requirements((what.eval_name,), cfg)
    except HarnessError as exc:
        raise Unavailable(f"{what.eval_name} cannot run on {cfg.model}: {exc}") from None
    runs, failed = study_runs(s)
    runs = [run for run in runs if run.plugin != BASELINE]  # the preset's baseline is a point of its sweep
    if not runs:
        raise HarnessError(f"no run of {s.study} completed: " + "; ".join(failed))
    swept, knobs = swept_runs(s, runs[0].info), {n: experiment.find_plugin(f"baseline/{n}").sae_class.sparsity_knob
                                                  for n in AGAINST}
    if not any(len({frontier.record_from_final_info(info, knobs[name])["knob"][1] for _, info in points}) > 1
               for name, points in swept.items()):  # checked before any evaluation
        raise Unavailable(f"neither {' nor '.join(AGAINST)} is swept on these activations (--preset {s.preset}): "
                          f"run `python experiment.py study {s.study}` at this preset first")
    index = run_index(s.runs)
    seeds = {run.plugin: [scored_info(folder, info, what, s) for folder, info in
                          [(run.folder, run.info), *frontier.seeds_of(run.info, index, run.folder)]] for run in runs}
    curves = {name: baseline_curve([scored_info(folder, info, what, s) for folder, info in points], knobs[name], what)
              for name, points in swept.items()}
    rows, data = [], {}
    for run in runs:
        l0, value, values, unread = seeds_mean(seeds[run.plugin], what)
        versus = {name: against_curve(l0, values, curve) if value is not None else {}
                  for name, curve in curves.items()}
        data[run.plugin] = dict(l0=l0, value=value, seed_values=values, versus=versus, folder=run.folder)
        rows.append([run.label, str(len(values)), fmt(l0, 4),
                     (fmt(value) + f" ({', '.join(map(fmt, values))})" * (len(values) > 1)) if value is not None
                     else "; ".join(unread), *(versus_cell(v) for v in versus.values()), shown_path(run.folder)])
    body = table(["run", "seeds", "L0 (seeds' mean)", f"{what.label} (seeds' mean (each))",
                  *(f"against {name} at its L0" for name in curves), "run folder (its first seed)"], rows)
    body += "\n\n" + table(["baseline", "knob values", "L0 (seed means)", what.label, "seeds", "seed-to-seed sd"], [
        [name, ", ".join(map(str, c["knob"])), ", ".join(fmt(x, 4) for x in c["l0"]),
         ", ".join(fmt(v) for v in c["value"]), ", ".join(map(str, c["seeds"])),
         f"{fmt(c['spread']['sd'])} ({c['spread']['dof']} dof)"] for name, c in curves.items()])
    reference = (f"Reference: each baseline's {what.label} interpolated linearly in log L0 between its two swept "
                 "knob values around the run's L0 (outside its sweep: no reference). Noise: the baseline's "
                 "seed-to-seed standard deviation of the metric pooled over its knob values, over the interpolation's "
                 "weights w on its seed means (m seeds each), sd·√(Σ w²/m), and the run's own over its n seeds, "
                 "sd_run/√n (from two seeds; with one, the baseline's sd), as the verdicts combine them; a run "
                 "reads higher or lower beyond the standard errors Student's t needs at those spreads' degrees "
                 "of freedom (Welch–Satterthwaite; at least "
                 f"{frontier.Z_BETTER:g}; {'higher' if what.higher_is_better else 'lower'} is better).")
    caption = (f"{what.label} against L0: the baselines' sweeps (lines, seed means) and the study's runs (dots). "
               + "; ".join(f"{run.label} {fmt(data[run.plugin]['value'])} at L0 {fmt(data[run.plugin]['l0'], 4)}"
                           for run in runs) + ". " + reference)
    body += "\n\n" + reference + "".join(f"\n\nNot analysed: {line}" for line in failed)
    return Finding(curve_figure(runs, curves, data, what), caption, body, {**data, "curves": curves})


def versus_cell(versus: dict) -> str:
    if "at" not in versus:
        return versus.get("word", "-")
    return (f"{versus['word']} (Δ {versus['delta']:+.3f} ± {fmt(versus['noise'])}, t {versus['needed']:.2g}, "
            f"against {versus['at']:.3f})")


def curve_figure(runs: list[Run], curves: dict[str, dict], data: dict, what: Scored) -> Figure:
    """The metric against L0 (log): each baseline's sweep as a line, each run as a labelled dot."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (name, curve) in enumerate((name, curve) for name, curve in curves.items() if curve["l0"]):
        ax.plot(curve["l0"], curve["value"], color="0.4", ls=("--", ":")[i % 2], marker="s", mfc="white",
                label=f"{name} (seed means, {min(curve['seeds'])}–{max(curve['seeds'])} seeds a setting)")
    for run in runs:
        if (found := data[run.plugin])["value"] is not None and found["l0"]:
            ax.scatter([found["l0"]], [found["value"]], color=run.color, s=40, zorder=3, label=run.label)
    ax.set_xscale("log")
    plain_log(ax.xaxis)
    ax.set_xlabel("L0 (latents active per token, log)")
    ax.set_ylabel(textwrap.fill(f"{what.label} ({'higher' if what.higher_is_better else 'lower'} is better)", 40))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(plot.with_setting(f"{what.label} against the baselines at matched L0", runs), fontsize=11)
    fig.tight_layout()
    return fig


def absorption(s: Setting) -> Finding:
    """Feature absorption against the baselines at matched L0: sae_bench's first-letter absorption
    (mean absorption fraction: lower is less absorption) of each run, beside the ReLU + L1 and
    TopK sweeps on the same activations, every one evaluated where it has not been."""
    return against_baselines(s, ABSORPTION)


def sparse_probing(s: Setting) -> Finding:
    """Sparse probing against the baselines at matched L0: sae_probes' top-1 test accuracy (one
    latent as the probe, mean over its datasets) of each run, beside the ReLU + L1 and TopK sweeps
    on the same activations, every one evaluated where it has not been."""
    return against_baselines(s, PROBING)


# ----------------------------------------------------------------------------------------------
# The unlearning comparison: sae_bench's unlearning eval (WMDP-bio) on each arm's saved SAE.

ADAPTIVE_ARM = "adaptive_ortho/run_1_basic_ortho"  # the notebook's mechanism, before the stability runs
FIXED_ARM = "adaptive_ortho/run_10_fixed_ortho"
UNLEARNING_SCORE = Panel("unlearning score", "sae_bench unlearning score (1 − WMDP-bio accuracy at retain ≥ 0.99)",
                         ("evals", "unlearning", "eval_result_metrics", "unlearning", "unlearning_score"))


class Unavailable(HarnessError):
    """An analysis that cannot run here (its model, data or key is missing): refused when it is
    named, passed over with its reason when every analysis of the study runs."""


def unlearning_arms(s: Setting, eval_loaders: dict | None = None) -> Setting:
    """The arms' Setting: the baseline, the adaptive runs (--only, default run 1) and the fixed-
    orthogonality run 10, on the instruction-tuned sibling of the preset's model (sae_bench formats
    its questions for those only: google/gemma-2-2b -> google/gemma-2-2b-it). Raises Unavailable,
    in one line and before any training, where the unlearning eval cannot run."""
    model = s.overrides.get("model") or experiment.build_config(s.preset, FIXED_ARM, **s.overrides).model
    if f"{model}-it".split("/")[-1] in evals.UNLEARNING_MODELS:
        model = f"{model}-it"
    overrides = {**s.overrides, "model": model}
    cfg = experiment.build_config(s.preset, FIXED_ARM, **overrides)
    try:
        evals.check_requirements(("unlearning",), cfg, loaders=eval_loaders)
    except HarnessError as exc:
        raise Unavailable(f"the unlearning analysis trains its arms on {model} (it runs on --preset gemma-2-2b, "
                          f"as google/gemma-2-2b-it), and {exc}") from None
    return dataclasses.replace(s, overrides=overrides, only=(*(s.only or (ADAPTIVE_ARM,)), FIXED_ARM), trained={})


def unlearning(s: Setting, *, eval_loaders: dict | None = None) -> Finding:
    """Unlearning comparison (WMDP-bio): sae_bench's unlearning eval on the baseline, the adaptive
    orthogonality SAE (run 1, or --only) and the fixed-orthogonality SAE (run 10), each trained on
    the instruction-tuned model. The eval clamps latents that fire on the WMDP-bio forget corpus and
    rarely on WikiText to a negative value; its score is 1 − the lowest WMDP-bio accuracy (on the
    questions the model knew) among the interventions that keep ≥ 0.99 of the retain questions
    (MMLU subjects) right: higher is more knowledge removed at no cost to the rest."""
    arms = unlearning_arms(s, eval_loaders)
    runs, failed = study_runs(arms)
    if not runs:
        raise HarnessError("no arm of the unlearning comparison completed: " + "; ".join(failed))
    for run in runs:
        if not same_instrument(run.info.get("evals", {}).get("unlearning")):  # scored once, then reused
            run.info = studies.rescore(run.folder, "unlearning", arms.overrides.get("device") or "auto",
                                          arms.notes, eval_loaders)
    panels = (UNLEARNING_SCORE, core_panel("ce_loss_score", "CE-loss score"))
    readings = [f"{run.label} {fmt(value_at(run.info, UNLEARNING_SCORE.path))}" for run in runs]
    caption = ("sae_bench's unlearning score per arm (left) and its CE-loss score (right, ± one bootstrap "
               "standard error): " + "; ".join(readings) + ".")
    rows = [[run.label, *(fmt(value_at(run.info, p.path), 4) for p in (*panels, CORE_PANELS[0])),
             run.config.get("model", "-"), shown_path(run.folder)] for run in runs]
    body = table(["run", "unlearning score", "CE-loss score", "L0", "model", "run folder"], rows)
    used = runs[0].info["evals"]["unlearning"].get("eval_config", {})
    body += ("\n\nsae_bench's settings: " + ", ".join(f"{k} {used.get(k)}" for k in (
        "dataset_names", "retain_thresholds", "n_features_list", "multipliers", "dataset_size", "seq_len"))
        + ".")
    body += "\n\nEach intervention (latents clamped), its WMDP-bio accuracy and its accuracy on the retain questions:\n\n"
    body += table(["run", "retain threshold", "latents", "multiplier", "WMDP-bio", "retain"], [
        [run.label, fmt(row["retain_thres"], 4), str(row["n_features"]), str(row["multiplier"]),
         fmt(row["wmdp-bio"]), fmt(row["all_side_effects_mcq"])]
        for run in runs for row in run.info["evals"]["unlearning"].get("eval_result_unstructured", {})["interventions"]])
    body += "".join(f"\n\nNot analysed: {line}" for line in failed)
    data = {run.plugin: dict(unlearning_score=value_at(run.info, UNLEARNING_SCORE.path),
                             ce_loss_score=value_at(run.info, panels[1].path), folder=run.folder) for run in runs}
    figure = bars_figure(runs, panels, "Unlearning (WMDP-bio): baseline, adaptive and fixed orthogonality")
    figure.axes[0].set_ylim(0, 1.05)  # the score's whole range: a score of 0 reads as one
    return Finding(figure, caption, body, data)


def bars_figure(runs: list[Run], panels: tuple[Panel, ...], title: str) -> Figure:
    """One panel per metric, one bar per run (its colour), its value written on it, error bars
    where the metric has a standard error."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        ys = [value_at(run.info, panel.path) for run in runs]
        errors = [value_at(run.info, panel.se_path) or 0.0 for run in runs]
        ax.bar(range(len(runs)), [math.nan if y is None else y for y in ys], yerr=errors, capsize=3,
               color=[run.color for run in runs])
        for i, y in enumerate(ys):
            ax.annotate(fmt(y), (i, 0 if y is None else y), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(runs)), [run.label for run in runs], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(textwrap.fill(panel.label, 40))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(plot.with_setting(title, runs), fontsize=11)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# The driver: `python experiment.py analyse STUDY [NAME]`.

ANALYSES: dict[str, dict[str, Callable[[Setting], Finding]]] = {
    "topk_ortho": {"topk_threshold": topk_threshold, "absorption": absorption},
    "adaptive_ortho": {"alpha": alpha_ablation, "condition_numbers": condition_numbers, "unlearning": unlearning},
    "zscore_ortho": {"reactivation": reactivation, "sparse_probing": sparse_probing},
    "contrastive": {"sparsity": sparsity_distributions, "jl_error": jl_error, "absorption": absorption},
    "freq_order": {"ordering": frequency_order, "absorption": absorption},
}


def chosen(study: str, name: str | None) -> dict[str, Callable[[Setting], Finding]]:
    if study not in ANALYSES:
        raise HarnessError(f"no analyses for study '{study}'; studies with analyses: {', '.join(ANALYSES)}")
    if name is not None and name not in ANALYSES[study]:
        raise HarnessError(f"no analysis '{name}' for {study}; choose one of {', '.join(ANALYSES[study])}")
    return ANALYSES[study] if name is None else {name: ANALYSES[study][name]}


def paragraph(study: str, name: str, analysis: Callable, finding: Finding, figure: Path) -> str:
    """The notebook paragraph: heading, what the analysis measures, the table, the figure with
    its caption."""
    what = " ".join((analysis.__doc__ or "").split())
    return (f"## Analysis: {study} {name}\n\n{what}\n\n{finding.body}\n\n"
            f"Figure `{shown_path(figure)}`: {finding.caption}\n\n")


def note_once(notes: Path, study: str, text: str) -> bool:
    """Append the paragraph through notebook.append_notes unless the notebook already holds it
    word for word (the same analysis of the same runs, run again); True if appended."""
    if notes.exists() and text in notes.read_text(encoding="utf-8"):
        return False
    key = next(k for k in experiment.plugin_files() if k.split("/")[0] == study)
    append_notes(notes, experiment.find_plugin(key).study_header, text)
    return True


def run_analyses(study: str, name: str | None, s: Setting, figures: Path) -> dict[Path, Finding]:
    """Each chosen analysis of the study: its runs (reused, resumed or trained), its figure at
    FIGURES/<study>/analysis_<name>.png, its paragraph in the notebook once."""
    found = {}
    for key, analysis in chosen(study, name).items():
        try:
            finding = analysis(s)
        except (Unavailable, NoWeights) as exc:  # named, refused; among all, passed over (a run kept without its SAE too)
            if name is not None:
                raise
            console.print(f"{study} {key}: not run: {exc}")
            continue
        path = figures / study / f"analysis_{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot.save(finding.figure, path)
        text = paragraph(study, key, analysis, finding, path)
        # kept beside the runs too, so that `notes --replace` rebuilds the notebook with it
        kept = s.runs / study / experiment.ANALYSES_FOLDER / f"{key}.md"
        kept.parent.mkdir(parents=True, exist_ok=True)
        experiment.atomic_write(kept, text)
        if not note_once(s.notes, study, text):
            console.print(f"{s.notes} already holds this {study} {key} analysis of these runs; not noted again")
        found[path] = finding
    return found
