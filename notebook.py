"""The lab notebook (notes.md): a run's entry, in the seed notebooks' shape, and a study's summary.

    ## Run 7: <the plugin docstring's first line>
    Study: ... · Plugin: ... · Setting: what the run changed · Run folder: runs/...
    Results:
    - CE-loss score: 0.7501 ± 0.012 (+0.012 vs run_6_layer_norm)        headline metrics (HEADLINE)
    Against run_0_topk (k, 4 runs) at this L0: ce_loss_score better (+0.02 ± 0.01); ...
    Warning: ...
    Description: <the plugin docstring>

Entries are appended under a lock (append_notes); `python experiment.py notes` rebuilds the whole
notebook from the run folders (studies.rebuild_notebook).
"""

from __future__ import annotations

from common import ROOT, HarnessError, console  # first: its import guards

import fcntl
import itertools
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from frontier import OUTSIDE, SWEEPABLE, footing_of, matched
from runs import ALL_HEADLINES, HEADLINE_SE, headline, read_json_lines, run_convergence


def shown_path(path: Path | str) -> str:
    """A path as the notebook shows it: relative to the repository where it lies inside it."""
    return os.path.relpath(path, ROOT) if Path(path).is_relative_to(ROOT) else str(path)


def notes_entry(plugin, run_dir: Path, info: dict, parent: dict | None, setting: str) -> str:
    """The run's notebook entry, in the seed notebooks' shape, for a person: headline metrics with
    their change against the parent run (its final_info), the verdicts, warnings; the full dict
    stays in final_info. `plugin` is the run's experiment.Plugin; `setting` what it changed."""
    shown = shown_path(run_dir)
    warnings = "".join(f"Warning: {w}\n" for w in info.get("warnings", []))
    return (f"## Run {plugin.run_number}: {plugin.title}\n"
            f"Study: {plugin.study} · Plugin: {plugin.name} · Setting: {setting} · Run folder: {shown}\n"
            f"Results:\n{result_lines(info, parent, plugin.parent, run_dir)}"
            f"{verdict_lines(info.get('verdict', {}))}{warnings}"
            f"Description: {plugin.description}\n\n")


def changed_setting(config: dict, preset: dict, defaults: dict) -> str:
    """What a run (its saved config) set away from its preset and its plugin's hyperparameter
    defaults ('k=16, seed 43'), or 'the preset's'; a sweep's runs differ only here."""
    changed = [f"{k}={config[k]}" for k in SWEEPABLE if k in config and config[k] != preset.get(k)]
    same = lambda a, b: json.dumps(a, default=list) == json.dumps(b, default=list)  # a tuple default, saved a list
    changed += [f"{k}={v}" for k, v in config.get("hyperparams", {}).items() if not same(defaults.get(k, v), v)]
    changed += [f"seed {config['seed']}"] if config.get("seed", 42) != 42 else []
    return ", ".join(changed) or "the preset's"


def result_lines(info: dict, parent: dict | None, parent_name: str | None, run_dir: Path) -> str:
    """'- CE-loss score: 0.7501 (+0.012 vs run_1_initial)' per headline metric, then the evals."""
    lines = [f"- training steps: {info['training_steps']}"]
    for label, _ in ALL_HEADLINES:  # those the run has: a synthetic run's ground truth, a language model's scores
        value, before = headline(info, label), headline(parent, label)
        if value is not None:
            se = info.get("metrics", {}).get("bootstrap_se", {}).get(HEADLINE_SE.get(label))
            share = label.startswith("dead latents")  # a fraction, shown as a percentage
            delta = "" if before is None else (f" ({100 * (value - before):+.3g} points vs {parent_name})" if share
                                               else f" ({value - before:+.3g} vs {parent_name})")
            known = isinstance(se, float) and math.isfinite(se)  # a score of -inf has no spread
            shown, spread = f"{value:.1%}" if share else f"{value:.4g}", f" ± {se:.2g}" if known else ""
            lines.append(f"- {label}: {shown}{spread}{delta}")
    log = read_json_lines(run_dir / "train_log.jsonl")
    lines.append(f"- dead latents at the end of training (not fired in the last tenth of its tokens, at most 1M): "
                 f"{log[-1]['dead_fraction']:.1%}")
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
    """'Against run_0_topk (k, 4 runs) at this L0: ce_loss_score better (+0.012 ± 0.004); ...
    [2 seeds v 2+2, paired over 32 evaluation contexts, converged]'"""
    lines = []
    for name, v in found.items():
        if "not_judged" in v:
            lines.append(f"Against {name}: not judged ({v['not_judged']})\n")
            continue
        runs = f"{v['knob']}, {v['points']} run{'s' if v['points'] != 1 else ''}"
        entries = list(v["metrics"].values())
        if all(entry["word"] == OUTSIDE for entry in entries):  # one sentence, with the knob to add
            lines.append(f"Against {name} ({runs}): {OUTSIDE}: {entries[0]['suggest']['text']}\n")
            continue
        words = []
        for metric, entry in v["metrics"].items():
            delta = "" if entry.get("delta") is None else f" ({entry['delta']:+.3g}" + (
                f" ± {entry['uncertainty']:.2g})" if entry.get("uncertainty") is not None else ")")
            words.append(f"{metric} {entry['word']}{delta}")
        footing = next((f for entry in entries if (f := footing_of(entry))), "")
        fill = next((e["suggest"]["text"] for e in entries if (e.get("suggest") or {}).get("side") == "between"), "")
        lines.append(f"Against {name} ({runs}) at this L0: " + "; ".join(words) + (f" [{footing}]" if footing else "")
                     + (f"; to decide it, {fill}" if fill else "") + "\n")
    return "".join(lines)


def study_header(title: str, description: str) -> str:
    """A study's heading in the notebook, as the seed notebooks open."""
    return f"# Title: {title}\n# Experiment description: {description.strip()}\n\n"


def check_notes(notes: Path) -> None:
    """Refuse, before any work, a notebook that cannot be appended to."""
    if notes.is_dir():
        raise HarnessError(f"--notes {notes} is a folder; give a file such as notes.md")
    folder = notes.parent
    while not folder.exists():
        folder = folder.parent
    if not os.access(folder if not notes.exists() else notes, os.W_OK) or not folder.is_dir():
        raise HarnessError(f"--notes {notes} cannot be written; give a writable file")


def append_notes(notes: Path, header: str, entry: str) -> None:
    """Append under an exclusive lock; the study's header (study_header) goes in before its
    first entry."""
    notes.parent.mkdir(parents=True, exist_ok=True)
    with open(notes, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        text = entry if header.splitlines()[0] + "\n" in fh.read() else header + entry
        fh.seek(0, os.SEEK_END)
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def study_notes(study: str, rows: list[dict], figures: dict[Path, str]) -> str:
    """The study's summary for notes.md: its runs with their verdicts at matched L0, and each
    figure with its data-driven caption."""
    judged_on = "MCC" if any(headline(row["info"], "MCC") is not None for row in rows) else "CE-loss score"
    shown = ("L0", judged_on, *(("F1",) if judged_on == "MCC" else ()), "explained variance (whole set)")
    lines = [f"## Study summary: {study}", "", f"| run | {' | '.join(shown)} | against the baselines at its L0 "
             f"({judged_on}) | run folder |", "|---" * (len(shown) + 3) + "|"]
    for row in rows:
        cells = [headline(row["info"], label) for label in shown]
        baseline = row["info"].get("run", {}).get("study") == "baseline"
        against = "(a baseline)" if baseline else matched(row["info"].get("verdict", {}))
        lines.append(f"| {row['label']} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in cells)
                     + f" | {against} | {shown_path(row['folder'])} |")
    lines += coverage_lines(rows) + study_reading(rows, "mcc" if judged_on == "MCC" else "ce_loss_score", judged_on)
    read = {path: caption for path, caption in figures.items()  # the figures whose captions read the data
            if path.name.startswith("frontier_") or path.stem.endswith("_evolution")}
    lines += ["", "Figures:", ""] + [f"- `{shown_path(path)}`: {caption}" for path, caption in read.items()] if read else []
    return "\n".join(lines + ["", ""])


PROVISIONAL = " (one seed: provisional)"


def study_reading(rows: list[dict], metric: str, label: str) -> list[str]:
    """The study's verdicts and steps in words, generated from them: per baseline, the runs by verdict
    with Δ ± its standard error; then each run against the run it builds on, where that is in the
    study, Δ of the judged metric and of L0 against the noise of a difference of two runs: √2 × its
    verdict's `run_seeds` part (the seed-to-seed standard deviation, measured or borrowed from the
    baselines' seeds, over √seeds: one seed's is the deviation itself)."""
    runs = {row["info"]["run"]["plugin"]: row["info"] for row in rows
            if row["info"].get("run", {}).get("study") not in (None, "baseline")}
    by_baseline: dict[str, dict[str, list[str]]] = {}
    provisional = False
    for name, info in runs.items():
        for baseline, found in info.get("verdict", {}).items():
            entry = found.get("metrics", {}).get(metric)
            word = "not judged" if "not_judged" in found else f"no {label}" if entry is None else entry["word"]
            provisional |= word.endswith(PROVISIONAL)
            word = "outside its sweep" if word == OUTSIDE else word.removesuffix(PROVISIONAL)
            delta = (entry or {}).get("delta")
            shown = "" if delta is None else f" ({delta:+.3f}" + (
                f" ± {entry['uncertainty']:.3f})" if entry.get("uncertainty") is not None else ")")
            by_baseline.setdefault(baseline, {}).setdefault(word, []).append(name + shown)
    if not by_baseline:
        return []
    lines = ["", f"What the verdicts say ({label} at the run's L0, Δ ± its standard error"
             + ("; one seed: provisional" if provisional else "") + "):", ""]
    lines += [f"- against {baseline}: " + "; ".join(f"{word} for {', '.join(names)}" for word, names in words.items())
              for baseline, words in sorted(by_baseline.items())]
    steps = [step_line(name, info, runs[info["run"]["parent"]], metric, label)
             for name, info in runs.items() if info["run"].get("parent") in runs]
    return lines + (["", f"Along the study (each run against the run it builds on; noise: √2 × the run's "
                         f"seed-to-seed standard deviation of {label}, measured or the baselines'):", "", *steps]
                     if steps else [])


def step_line(name: str, info: dict, parent: dict, metric: str, label: str) -> str:
    """'- run_2 against run_1: MCC +0.001, L0 +0.058 (+0.3%); MCC within noise (2 × 0.003)'."""
    value, before = headline(info, label), headline(parent, label)
    l0, l0_before = (headline(i, "L0") for i in (info, parent))
    if None in (value, before, l0, l0_before):
        return f"- {name} against {info['run']['parent']}: not compared (a headline metric is missing)"
    seeds = [e["uncertainty_parts"]["run_seeds"] for found in info.get("verdict", {}).values()
             if (e := found.get("metrics", {}).get(metric)) and e.get("uncertainty_parts", {}).get("run_seeds")]
    moved = f"{label} {value - before:+.3f}, L0 {l0 - l0_before:+.3g}" + (
        f" ({(l0 - l0_before) / l0_before:+.1%})" if l0_before else "")
    if not seeds:
        return f"- {name} against {info['run']['parent']}: {moved}; noise unknown (no seed spread in its verdicts)"
    noise = math.sqrt(2) * seeds[0]
    said = "beyond" if abs(value - before) > 2 * noise else "within"
    return f"- {name} against {info['run']['parent']}: {moved}; {label} {said} noise (2 × {noise:.3f})"


def sweep_notes(title: str, rows: list[dict]) -> str:
    """A sweep's summary for notes.md: per setting, its seeds pooled (mean ± the seed-to-seed
    standard deviation) for L0 and the headline scores, and each seed's convergence (how far its
    reconstruction loss and L0 moved over the last fifth of training, runs.convergence)."""
    synthetic = any(headline(row["info"], "MCC") is not None for row in rows)
    shown = ("L0", *(("MCC", "F1", "precision", "recall") if synthetic else ("CE-loss score", "KL score")),
             "explained variance (whole set)")
    settings: dict[str, list[dict]] = {}
    for row in rows:
        if row["info"].get("status") == "completed":
            settings.setdefault(row["label"].rsplit("seed=", 1)[0].rstrip(",") or "-", []).append(row)
    lines = [f"## Sweep summary: {title}", "", f"| setting | seeds | {' | '.join(shown)} | converged (reconstruction "
             "loss, L0 moved over the last fifth) |", "|---" * (len(shown) + 3) + "|"]
    for setting, runs in settings.items():
        infos = [row["info"] for row in runs]
        cells = [_mean_sd([v for info in infos if (v := headline(info, label)) is not None]) for label in shown]
        moved = [run_convergence(row.get("folder"), row["info"]) or {} for row in runs]
        lines.append(f"| {setting} | {len(infos)} | {' | '.join(cells)} | " + "; ".join(
            f"{ {True: 'yes', False: 'no'}.get(c.get('converged'), '?')} ({_percent(c.get('l2_loss'))}, "
            f"{_percent(c.get('l0'))})" for c in moved) + " |")
    return "\n".join(lines + ["", ""])


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.4g}" + (f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else "")


def _percent(moved: float | None) -> str:
    return "-" if moved is None else f"{moved:+.1%}"


def coverage_lines(rows: list[dict]) -> list[str]:
    """Which baselines' sweeps cover which of the study's runs (the run's L0 inside the swept
    range, on the CE-loss score or a synthetic run's MCC), and which runs each leaves outside."""
    covers: dict[str, tuple[list[str], list[str]]] = {}
    for row in rows:
        if row["info"].get("run", {}).get("study") == "baseline":
            continue
        for name, found in row["info"].get("verdict", {}).items():
            scores = found.get("metrics", {})
            word = scores.get("mcc" if "mcc" in scores else "ce_loss_score", {}).get("word")
            if word and word not in ("no baseline", "no value"):
                covers.setdefault(name, ([], []))[word == OUTSIDE].append(row["label"])
    if not covers:
        return []
    return ["", "Coverage (a baseline covers a run whose L0 lies inside its sweep):", ""] + [
        f"- {name}: covers {', '.join(inside) or 'none'}"
        + (f"; leaves outside {', '.join(outside)}" if outside else "")
        for name, (inside, outside) in sorted(covers.items())]


def print_summary(info: dict, run_dir: Path) -> None:
    """A finished run's metrics, what its export holds, and its warnings, on the console."""
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
    if export and export["architecture"] is None:
        console.print("note: no SAELens export (the plugin builds on no baseline); plugin_state.safetensors holds "
                      "the SAE that was evaluated")
    elif export and not export["exact"]:
        console.print(f"note: sae_weights.safetensors holds only the linear part of this SAE (as sae_lens's "
                      f"{export['architecture']}); plugin_state.safetensors holds the SAE that was evaluated")
    if "explained_variance" in info.get("metrics", {}).get("reconstruction_quality", {}):
        console.print("reconstruction_quality: explained_variance_whole_set is the field's (1 − ΣSSE/ΣSST over "
                      "all tokens); sae_bench's explained_variance (biased on large norms) and _legacy (per "
                      "batch) are beside it (see README)")
    for warning in info["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
