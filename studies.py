"""Many runs: a study (its baselines, then each run in order) or a sweep (a grid of settings ×
seeds), one run re-scored, and the notebook rebuilt from the run folders.

A run already completed with the same config and plugin code is reused, an interrupted one
resumed from its checkpoint, so the same command again finishes what is left. Given cluster.py's
runner (`--workers`, `--ray`), each run not reused is a Ray task; analyses.py builds on these too.
"""

from __future__ import annotations

from common import ROOT, HarnessError, console  # first: its import guards

import dataclasses
import hashlib
import itertools
import json
import re
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

import evals
import plot
from experiment import (ANALYSES_FOLDER, PRESETS, Plugin, RunConfig, build_config, checked_model, execute, find_plugin,
                        finish, judged, parent_info, parse_hyperparams, plugin_files, saved_config, saved_sae, setting)
import frontier
from frontier import SWEEPABLE
from kernels import configure_kernels, resolve_device
from notebook import append_notes, notes_entry, result_lines, shown_path, study_notes, sweep_notes
from runs import (CHECKPOINT, Held, atomic_write, checkpoint_source, claimed, headline, left_in, locked, read_json,
                  run_index)


@dataclass
class Job:
    cfg: RunConfig
    plugin: Plugin
    run_dir: Path  # where a new run goes; a previous one is found by its config
    label: str  # what distinguishes it in the progress lines and the summary


def job_config(plugin: Plugin, preset: str, settings: dict[str, str], overrides: dict[str, Any]) -> RunConfig:
    """A run's config as `run` builds it; `settings` are key=value strings of run-config fields
    (SWEEPABLE) or the plugin's hyperparameters, typed and checked here."""
    fields, flags = typing.get_type_hints(RunConfig), {}
    for key, raw in ((k, v) for k, v in settings.items() if k in SWEEPABLE):
        try:
            flags[key] = fields[key](raw)
        except ValueError:
            raise HarnessError(f"--grid {key}={raw}: expected {fields[key].__name__}") from None
    cfg = build_config(preset, f"{plugin.study}/{plugin.name}", **{**overrides, **flags})
    cfg.hyperparams = dataclasses.asdict(parse_hyperparams(
        plugin, [f"{k}={v}" for k, v in settings.items() if k not in SWEEPABLE]))
    evals.check_requirements(cfg.evals, cfg)
    return cfg


def comparable(config: dict) -> str:
    """A config as saved, for equality (neither the device it ran on nor the name of the preset its
    values came from changes what it is); a field added since a run was saved counts at its default
    there (`dtype`: runs before it were fp32)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    return json.dumps({k: v for k, v in {**defaults, **config}.items() if k not in ("device", "preset")},
                      sort_keys=True, default=list)


def earlier_runs(runs_root: Path) -> dict[str, list[Path]]:
    """Every run folder under runs_root, finished or not, by its config: read once per study or sweep."""
    found: dict[str, list[Path]] = {}
    for config_path in sorted(runs_root.rglob("config.json")) if runs_root.is_dir() else []:
        found.setdefault(comparable(read_json(config_path)), []).append(config_path.parent)
    return found


def previous_run(job: Job, earlier: dict[str, list[Path]]) -> tuple[Path | None, str]:
    """(folder, "reused") for a completed run of this config and plugin source among the earlier
    runs, (folder, "resumed") for one of them interrupted in training or evaluation or whose
    evaluation failed, its checkpoint of this code (it continues from there), else (None, "trained")."""
    source, interrupted = job.plugin.source_hash(), None
    for folder in earlier.get(comparable(dataclasses.asdict(job.cfg)), []):
        if (folder / "final_info.json").exists():
            info = read_json(folder / "final_info.json")
            if info.get("status") == "completed" and info["provenance"]["plugin_source_sha256"] == source:
                return folder, "reused"
        if (folder / CHECKPOINT).exists() and resumable(folder, source):
            interrupted = folder
    return (interrupted, "resumed") if interrupted else (None, "trained")


def is_config_of(cfg: RunConfig):
    """Whether a saved config (config.json) is this one's, as `comparable` reads them."""
    return lambda saved: comparable(saved) == comparable(dataclasses.asdict(cfg))


def resumable(folder: Path, source: str) -> bool:
    """Whether an interrupted run's checkpoint was trained by this plugin code (or predates keeping
    its hash: resumed with a warning); said in a line where it is passed over."""
    try:
        saved = checkpoint_source(folder)
    except Exception as exc:  # unreadable, or its pickled plugin state names a module gone since
        console.print(f"[yellow]{folder / CHECKPOINT} cannot be read ({type(exc).__name__}: {exc}); "
                      f"its run is trained again")
        return False
    if saved not in (source, None):
        console.print(f"[yellow]{folder / CHECKPOINT} was trained by other code of its plugin; its run is trained again")
    return saved in (source, None)


def run_jobs(jobs: list[Job], notes: Path, runs_root: Path, on_done=None, remote=None) -> list[dict]:
    """Each job's run, reused, resumed or trained, with a line as each finishes; a run that fails
    for its own reasons (a non-finite loss) is reported and the rest go on. The runs go one after
    another in this process or, given `remote` (cluster.py's run_on_ray, bound to its cluster),
    each run not reused goes there. Rows come back in the jobs' order."""
    earlier = earlier_runs(runs_root)
    plans = [(i, job, *previous_run(job, earlier)) for i, job in enumerate(jobs)]  # (i, job, folder, how)
    plans = [(i, job, folder or job.run_dir, how) for i, job, folder, how in plans]
    loaded_models: dict = {}  # the runs here share their model: it is loaded once

    def run_here(i: int, job: Job, folder: Path, how: str, wait: bool = True) -> tuple[int, str, Path, dict, float]:
        started = time.perf_counter()
        try:
            if how == "reused":
                info = read_json(folder / "final_info.json")
            else:
                with claimed(folder, wait):  # what is there once held decides: another process may have ended it
                    how, info = left_in(folder, job.plugin.source_hash(), is_config_of(job.cfg))
                    if how in ("trained", "resumed"):
                        info = execute(job.cfg, job.plugin, folder, notes, resume=how == "resumed",
                                       loaded_models=loaded_models)
        except Held:
            raise
        except HarnessError as exc:
            info, how = {"status": "failed", "error": str(exc)}, "failed"
        return i, how, folder, info, time.perf_counter() - started

    def in_turn():
        """Each plan in order, but one another process holds (the same sweep asked twice at once)
        is put off until the rest are done, then waited for: the two processes share the work."""
        held = []
        for plan in plans:
            try:
                yield run_here(*plan, wait=False)
            except Held:
                console.print(f"another process is training or evaluating {plan[2]}: this one goes on and comes back to it")
                held.append(plan)
        yield from (run_here(*plan) for plan in held)

    if remote is not None:
        finished = itertools.chain((run_here(*plan) for plan in plans if plan[3] == "reused"),
                                   remote([p for p in plans if p[3] != "reused"], notes))
    else:
        finished = in_turn()
    done: dict[int, dict] = {}
    for i, how, folder, info, wall_s in finished:
        done[i] = dict(plugin=jobs[i].plugin.name, label=jobs[i].label, how=how, folder=str(folder), info=info,
                       wall_s=wall_s)
        lead = "MCC" if headline(info, "MCC") is not None else "CE-loss score"  # a synthetic run's, a model's
        l0, score = headline(info, "L0"), headline(info, lead)
        console.print(f"[{len(done)}/{len(jobs)}] {jobs[i].label}: {how}" + (f", L0 {l0:.1f}, {lead} "
                      f"{score:.3f}" if l0 is not None and score is not None else f": {info.get('error', '')}") +
                      f" ({wall_s:.0f} s)")
        if how in ("trained", "resumed") and isinstance(info.get("warnings"), list):
            for warning in info["warnings"]:  # only here: a run prints none, a Ray worker's console is hidden
                console.print(f"  [yellow]warning:[/yellow] {warning}")
        if on_done is not None:
            on_done([done[k] for k in sorted(done)])
    return [done[k] for k in sorted(done)]


# Each baseline's sweep on a preset where it was chosen by measurement, which `study` runs first on
# that preset: on synth its points bracket the true L0 and the studies' runs (notes.md has the
# frontier); on embedded-4m they are placed from one measured point each (notes.md, "The embedded
# budget, measured") around the studies' L0s, and `cover` widens them where a run falls outside.
BASELINE_SWEEPS = {"synth": {"run_0_baseline": "sparsity_penalty=1,2,3", "run_0_topk": "k=8,16,32",
                             "run_0_batchtopk": "k=8,16,32", "run_0_matryoshka": "k=8,16,32",
                             "run_0_jumprelu": "l0_coefficient=0.3,1,3", "run_0_gated": "sparsity_penalty=1,2,4"},
                   "embedded-4m": {"run_0_baseline": "sparsity_penalty=0.2,0.4,0.8", "run_0_topk": "k=32,64,128",
                                   "run_0_batchtopk": "k=32,64,128", "run_0_matryoshka": "k=32,64,128",
                                   "run_0_jumprelu": "l0_coefficient=0.01,0.03,0.1",
                                   "run_0_gated": "sparsity_penalty=0.5,1,2"}}
BASELINE_SEEDS = 2  # a sweep's seeds at the least: one seed has no spread for a verdict to stand on


def study(name: str, baselines: list[str], preset: str, overrides: dict[str, Any], runs_root: Path, notes: Path,
          figures: Path, remote=None, seeds: int = 1, cover_cap: int = 1) -> list[dict]:
    """`python experiment.py study NAME`: the preset's baseline sweeps (BASELINE_SWEEPS, at two
    seeds or more), its baselines, then its runs in order, each at `seeds` seeds; each baseline's
    sweep widened until it covers every run or has `cover_cap` knob values (`cover`; the CLI's
    default widens, 1 never does); then its figures, the compare table and its summary in the
    notebook, unless that is already the study's newest summary there, word for word."""
    if cover_cap < 0:
        raise HarnessError(f"--cover-cap must be 0 or more, got {cover_cap}")
    jobs = study_jobs(name, baselines, preset, overrides, runs_root, seeds)
    if runs_root == ROOT / "runs":  # where keep_runs.py restores to
        say_what_kept_holds(runs_root)
    for plugin, grid in baseline_sweeps(jobs[0].cfg).items():
        console.print(f"the baselines' sweep on {preset}: {plugin} {grid}")
        sweep(find_plugin(f"baseline/{plugin}"), [grid], max(seeds, BASELINE_SEEDS), preset, overrides, runs_root,
              notes, remote)
    rows = rejudge(run_jobs(jobs, notes, runs_root, remote=remote), runs_root)
    widened = cover(rows, preset, overrides, seeds, runs_root, notes, remote, cover_cap)  # noted run by run
    written = plot.plot_all(runs_root, figures / name, name)
    summary, noted = study_notes(name, rows, written), notes.read_text(encoding="utf-8") if notes.exists() else ""
    if summary not in noted[noted.rfind(f"## Study summary: {name}\n"):]:  # not this study's newest summary
        append_notes(notes, jobs[-1].plugin.study_header, summary)
    Console(width=220).print(plot.compare_table(runs_root, name))
    return rows + widened


def say_what_kept_holds(runs_root: Path, kept: Path = ROOT / "kept") -> None:
    """A line where kept/ (scripts/keep_runs.py) holds completed runs that runs_root lacks: a new
    clone has the baselines' records there, hours of this CPU, reused once restored."""
    lacking = [p for p in kept.rglob("final_info.json.gz")  # kept gzipped
               if not (runs_root / p.relative_to(kept).with_suffix("")).exists()]
    if lacking:
        console.print(f"[yellow]note:[/yellow] {shown_path(kept)} holds {len(lacking)} runs that {shown_path(runs_root)} "
                      "lacks; `python scripts/keep_runs.py restore` first reuses them instead of training them again")


def baseline_sweeps(cfg: RunConfig) -> dict[str, str]:
    """BASELINE_SWEEPS of the preset whose every value the run's config has (but its evaluations,
    which do not move the baselines), whatever preset it was built from: `--preset embedded --tokens
    4000000` is embedded-4m's budget; embedded-4m at `--tokens 250000` is not, and has none."""
    for name, sweeps in BASELINE_SWEEPS.items():
        if all(getattr(cfg, key) == value for key, value in PRESETS[name].items() if key != "evals"):
            return sweeps
    return {}


def sweep(plugin: Plugin, grid: list[str], seeds: int, preset: str, overrides: dict[str, Any], runs_root: Path,
          notes: Path, remote=None) -> tuple[list[dict], Path]:
    """`python experiment.py sweep`: the grid × seeds into runs/sweeps/<plugin>-<hash of the runs>/
    (in_their_folder), its manifest kept as runs finish, its frontier figures and, where anything was
    trained, its summary in the notebook: (rows, the sweep folder)."""
    rows, sweep_dir = sweep_runs(plugin, grid, seeds, preset, overrides, runs_root, notes, remote)
    if any(row["how"] != "failed" for row in rows):
        written = plot.sweep_figures(runs_root, sweep_dir / "figures", plugin.study, plugin.name)
        console.print(f"{len(written)} frontier figures in {sweep_dir / 'figures'}")
    if any(row["how"] not in ("reused", "failed") for row in rows):  # a sweep run again that trained nothing notes nothing
        title = (f"{plugin.name} on {preset}, {' × '.join(grid)} × {seeds} seed{'s' if seeds > 1 else ''} "
                 f"({shown_path(sweep_dir)})")
        append_notes(notes, plugin.study_header, sweep_notes(title, rows))
    return rows, sweep_dir


def sweep_runs(plugin: Plugin, grid: list[str], seeds: int, preset: str, overrides: dict[str, Any],
               runs_root: Path, notes: Path, remote=None) -> tuple[list[dict], Path]:
    """The grid × seeds trained (or reused) into their sweep folder, whose manifest keeps what was
    asked, what finished and, once all have, the seed-to-seed spread measured there."""
    if not grid:
        raise HarnessError("--grid key=v1,v2 is required (e.g. --grid sparsity_penalty=0.05,0.1,0.2)")
    asked = dict(plugin=f"{plugin.study}/{plugin.name}", plugin_source_sha256=plugin.source_hash(), preset=preset,
                 grid=grid, seeds=seeds, **overrides)
    jobs, sweep_dir = in_their_folder(sweep_jobs(plugin, preset, grid, seeds, dict(overrides), Path()),
                                      runs_root / "sweeps" / plugin.name)
    write_manifest(sweep_dir, asked, [])
    rows = run_jobs(jobs, notes, runs_root, remote=remote, on_done=lambda done: write_manifest(sweep_dir, asked, done))
    write_manifest(sweep_dir, asked, rows, seed_spread(rows))
    return rows, sweep_dir


def in_their_folder(jobs: list[Job], prefix: Path) -> tuple[list[Job], Path]:
    """The jobs (their run_dir relative) moved into the sweep folder <prefix>-<key>, the key a hash of
    what the runs are, their configs and their plugins' code, not of how they were asked for: the
    same runs asked two ways share a folder, runs of edited code never land in an earlier one's."""
    runs = sorted(f"{job.plugin.source_hash()} {comparable(dataclasses.asdict(job.cfg))}" for job in jobs)
    folder = prefix.with_name(f"{prefix.name}-{hashlib.sha256(json.dumps(runs).encode()).hexdigest()[:8]}")
    return [dataclasses.replace(job, run_dir=folder / job.run_dir) for job in jobs], folder


def seed_spread(rows: list[dict]) -> dict[str, dict]:
    """Per metric, the seed-to-seed standard deviation of these runs, pooled over their settings
    (frontier.seed_spread): what a verdict adds for training noise, measured on this sweep."""
    completed = [row["info"] for row in rows if row["info"].get("status") == "completed"]
    groups: dict[str, list[dict]] = {}
    for info in completed:
        config = {k: v for k, v in info["provenance"]["config"].items() if k not in ("seed", "device")}
        groups.setdefault(json.dumps(config, sort_keys=True, default=str), []).append(
            frontier.record_from_final_info(info, "seed"))  # any knob: only the record's metrics count here
    pooled = [frontier.pool_seeds(group)["seed_values"] for group in groups.values()]
    names = sorted({name for values in pooled for name in values})
    return {name: frontier.seed_spread([values.get(name, []) for values in pooled]) for name in names}


def rejudge(rows: list[dict], runs_root: Path) -> list[dict]:
    """Each completed run's verdicts again, against the runs there now (its other seeds and the
    baselines' points that finished after it), written back to its final_info.json."""
    index = run_index(runs_root)
    for row in rows:
        if row["info"].get("status") == "completed":
            plugin, folder = find_plugin(f"{row['info']['run']['study']}/{row['plugin']}"), Path(row["folder"])
            row["info"] = read_json(folder / "final_info.json")
            row["info"]["verdict"] = judged(row["info"], index, plugin, folder)
            atomic_write(folder / "final_info.json", json.dumps(row["info"], indent=2, default=str))
    return rows


def cover(rows: list[dict], preset: str, overrides: dict[str, Any], seeds: int, runs_root: Path, notes: Path,
          remote, cap: int) -> list[dict]:
    """Widen each baseline's sweep with the knob values frontier.suggest_knob gives, round after
    round, until it covers every run of `rows` or has `cap` knob values: the new baseline runs' rows
    (`rows` are judged again after each baseline's new points)."""
    added: list[dict] = []
    tried: set[tuple[str, str]] = set()  # a value whose runs failed is not asked for again
    while wanted := widening(rows, cap, tried):
        for name, (knob, values) in wanted.items():
            tried.update((name, json.dumps(v)) for v in values)
            grid = [f"{knob}={','.join(str(v) for v in values)}"]
            console.print(f"widening {name}'s sweep on these activations: {grid[0]}")
            added += sweep_runs(find_plugin(f"baseline/{name}"), grid, seeds, preset, overrides, runs_root, notes,
                                remote)[0]
            rejudge(rows, runs_root)  # now, not after the round: a study stopped mid-round keeps what it learnt
    return added


def widening(rows: list[dict], cap: int, tried: set[tuple[str, str]] = frozenset()) -> dict[str, tuple[str, list]]:
    """{baseline: (knob, values to add)}: per baseline whose sweep leaves a study run of `rows`
    outside (on any metric: the suggestion depends on L0 alone), the knob value suggested for the
    lowest-L0 run below it and for the highest above it, then those that fill a gap whose bend left
    a run tied (frontier.fill_knob), where neither swept nor `tried` yet ((baseline, JSON of the
    value)), while its sweep (the knob values its verdicts were judged on) holds fewer than `cap`."""
    ends: dict[str, dict] = {}  # baseline -> {"knob", "swept", "below": (L0, value), "above": (L0, value), "between"}
    for row in rows:
        l0 = headline(row["info"], "L0")
        if row["info"].get("run", {}).get("study") == "baseline" or l0 is None:
            continue
        for name, found in row["info"].get("verdict", {}).items():
            suggests = [m["suggest"] for m in found.get("metrics", {}).values()
                        if m.get("suggest") and m["suggest"]["value"] is not None]
            if suggests:
                end = ends.setdefault(name, {"knob": found["knob"], "swept": set(), "between": set()})
                end["swept"].update(json.dumps(value) for value in found.get("swept", []))
            for suggest in suggests:
                if suggest["side"] == "between":
                    end["between"].add(suggest["value"])
                    continue
                kept = end.get(suggest["side"])
                if kept is None or (l0 < kept[0] if suggest["side"] == "below" else l0 > kept[0]):
                    end[suggest["side"]] = (l0, suggest["value"])
    wanted = {}
    for name, end in ends.items():
        room = max(0, cap - len(end["swept"]))
        outside = sorted({end[side][1] for side in ("below", "above") if side in end})
        between = sorted(end["between"] - set(outside))
        new = [value for value in [*outside, *between]
               if json.dumps(value) not in end["swept"] and (name, json.dumps(value)) not in tried][:room]
        if new:
            wanted[name] = (end["knob"], new)
    return wanted


def exit_if_any_failed(rows: list[dict]) -> None:
    failed = [row["label"] for row in rows if row["how"] == "failed"]
    if failed:
        console.print(f"[red]error:[/red] {len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); see above")
        raise typer.Exit(1)


def summary_table(title: str, rows: list[dict]) -> Table:
    table = Table(title=title)
    synthetic = any(headline(row["info"], "MCC") is not None for row in rows)
    shown = ("L0", *(("MCC", "F1") if synthetic else ("CE-loss score", "KL score")), "explained variance (whole set)")
    for column in ("run", "how", *shown, "folder"):
        table.add_column(column)
    for row in rows:
        values = [headline(row["info"], label) for label in shown]
        table.add_row(row["label"], row["how"], *("-" if v is None else f"{v:.4g}" for v in values),
                      shown_path(row["folder"]))
    return table


def study_jobs(study: str, baselines: list[str], preset: str, overrides: dict[str, Any], runs_root: Path,
               seeds: int = 1) -> list[Job]:
    """The baselines', then the study's runs in run-number order, each at `seeds` seeds from --seed."""
    keys = [key for key in plugin_files() if key.split("/")[0] == study]
    if not keys:
        studies = sorted({key.split("/")[0] for key in plugin_files()})
        raise HarnessError(f"unknown study '{study}'; choose one of {', '.join(studies)}")
    plugins = [find_plugin(name) for name in baselines]
    plugins += sorted((find_plugin(key) for key in keys if find_plugin(key).name not in baselines),
                      key=lambda p: p.run_number)
    if seeds < 1:
        raise HarnessError(f"--seeds must be at least 1, got {seeds}")
    stamp, first = time.strftime("%Y%m%d-%H%M%S"), overrides["seed"]
    return [Job(job_config(p, preset, {}, {**overrides, "seed": seed}), p,
                runs_root / p.study / p.name / stamped(seed, stamp),
                f"{p.study}/{p.name}" + (f" seed {seed}" if seeds > 1 else ""))
            for p in plugins for seed in range(first, first + seeds)]


def stamped(seed: int, stamp: str | None = None) -> str:
    """A study's run folder name, <time>-seed<seed>: two studies at two seeds may start in one second."""
    return f"{stamp or time.strftime('%Y%m%d-%H%M%S')}-seed{seed}"


def parse_grid(grid: list[str], seeds: int, seed: int) -> list[dict[str, str]]:
    """['sparsity_penalty=0.1,0.2', 'k=16,32'] and 2 seeds -> every combination, each with its seed."""
    axes = {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise HarnessError(f"--grid '{item}' must look like key=value1,value2")
        axes[key] = [v.strip() for v in values.split(",") if v.strip()]
        if key == "seed":
            raise HarnessError(f"--grid {item}: seeds come from --seed and --seeds, not the grid")
        if len(set(axes[key])) < len(axes[key]):
            raise HarnessError(f"--grid {item} names a value twice; name each once")
    if seeds < 1:
        raise HarnessError(f"--seeds must be at least 1, got {seeds}")
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    return [{**combo, "seed": str(seed + i)} for combo in combos for i in range(seeds)]


def sweep_jobs(plugin: Plugin, preset: str, grid: list[str], seeds: int, overrides: dict[str, Any],
               within: Path) -> list[Job]:
    """Each grid point × seed as a job whose run folder is within/<key=value,...,seed=S>."""
    combos, jobs = parse_grid(grid, seeds, overrides.pop("seed")), []
    hyperparams = [f.name for f in dataclasses.fields(plugin.hyperparams_class)]
    for key in set(combos[0]) - set(SWEEPABLE) - set(hyperparams) - {"seed"}:
        raise HarnessError(f"--grid {key}: neither a run setting ({', '.join(SWEEPABLE)}) nor a hyperparameter "
                           f"of {plugin.name} ({', '.join(hyperparams) or 'it has none'})")
    for settings in combos:
        seed = int(settings.pop("seed"))
        cfg = job_config(plugin, preset, settings, {**overrides, "seed": seed})
        label = ",".join(f"{k}={v}" for k, v in settings.items()) + f",seed={seed}"
        jobs.append(Job(cfg, plugin, within / re.sub(r"[^\w.,=-]", "_", label), label.lstrip(",")))
    return jobs


def write_manifest(sweep_dir: Path, asked: dict, rows: list[dict], spread: dict | None = None) -> None:
    """What was asked last, what finished (this command's rows, and what an earlier or a concurrent
    command sharing the folder recorded of the runs this one has not reached) and the seed spread."""
    # by folder (an analysis's sweep holds several plugins' runs of one label), relative to the repository
    # where it lies inside it: a manifest kept in git (scripts/keep_runs.py) holds in another checkout
    done = {shown_path(r["folder"]): dict(run=r["label"], how=r["how"], status=r["info"].get("status"),
                                          folder=shown_path(r["folder"])) for r in rows}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with locked(sweep_dir / "manifest.json"):  # another command's write lands before this read or after this write
        before = read_json(sweep_dir / "manifest.json")
        done.update({row["folder"]: row for row in before.get("finished", []) if row["folder"] not in done})
        spread = spread if spread is not None else before.get("seed_spread")
        kept = dict(asked=asked, finished=list(done.values()), **({"seed_spread": spread} if spread is not None else {}))
        atomic_write(sweep_dir / "manifest.json", json.dumps(kept, indent=2))


def rescore(run_dir: Path, eval_names: str, device_name: str, notes: Path, eval_loaders=None,
            wait: bool = False, unless=None, loaded_models: dict | None = None) -> dict:
    """Evaluate a finished run's saved SAE again, on its own held-out tokens, without retraining;
    merge the results into its final_info.json and note the re-scoring in the notebook. A folder
    another process holds is refused or, with `wait`, waited for: its results are then read afresh,
    and where `unless(final_info)` holds (what another process evaluated meanwhile) kept as they are.
    `loaded_models` keeps the model for the next re-scoring in this process (checked_model)."""
    started = time.perf_counter()
    cfg, plugin = saved_config(run_dir, "eval")
    info_path = run_dir / "final_info.json"
    saved = read_json(info_path)
    if saved.get("status") != "completed" and saved.get("failed_at") != "evaluation":
        raise HarnessError(f"{run_dir} holds no completed run to re-score")
    names = evals.parse_evals(eval_names) if eval_names else cfg.evals  # default: the run's own
    cfg.device = device_name
    evals.check_requirements(names, cfg, loaders=eval_loaders)
    with claimed(run_dir, wait=wait):  # no study resumes the run while this writes its results
        info = read_json(info_path)  # read once held: a process waited for may have added to it
        if unless is not None and unless(info):
            return info
        unevaluated = info.get("failed_at") == "evaluation"  # trained and saved; its evaluation crashed
        device = resolve_device(device_name)
        configure_kernels(cfg, device)  # the kernels the run evaluated with (deterministic on CPU, TF32 on CUDA)
        sae, eval_tokens = saved_sae(run_dir, cfg, plugin, device), torch.load(run_dir / "eval_tokens.pt")
        model = checked_model(cfg, device, loaded=loaded_models)  # after the SAE: a kept run without it stops first
        evals.evaluate(info, sae, model, eval_tokens, cfg, device, run_dir, eval_loaders, names)
        if unevaluated:  # now it is a completed run, with the notebook entry it never got
            finish(info, run_dir, plugin, notes, cfg, device,
                   info["provenance"]["wall_time_s"] + time.perf_counter() - started)
            return info
        atomic_write(info_path, json.dumps(info, indent=2, default=str))
    append_notes(notes, plugin.study_header, f"Re-scored run {plugin.run_number} ({plugin.study}/{plugin.name}, {run_dir}) "
                                f"with {', '.join(names)}; its results now:\n{result_lines(info, None, None, run_dir)}\n")
    return info


def rebuild_notebook(runs_root: Path, study: str | None = None) -> str:
    """The lab notebook rebuilt from the run folders under runs_root: per study (baselines first)
    its header, an entry for the latest completed run of each plugin and setting (its verdicts
    against the baseline sweeps there now), its summary and its latest analyses (`analyse`)."""
    index = run_index(runs_root)
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
        by_study.setdefault(key[0], []).append((plugin, folder, {**info, "verdict": judged(info, index, plugin, folder)}))
    text = ""
    for name, runs in by_study.items():
        text += runs[0][0].study_header
        text += "".join(notes_entry(plugin, folder, info, parent_info(index, plugin, info), setting(plugin, info))
                        for plugin, folder, info in runs)
        if name != "baseline":
            text += study_notes(name, [dict(label=f"{plugin.name} ({setting(plugin, info)})", info=info, folder=folder)
                                       for plugin, folder, info in runs], {})
        text += "".join(p.read_text(encoding="utf-8") for p in sorted((runs_root / name / ANALYSES_FOLDER).glob("*.md")))
    return text
