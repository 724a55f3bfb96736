"""Keep runs/ in git without its weights, and put it back: runs/ is ignored by git (a run's weights
are megabytes), so a machine that is reset loses every run, and the embedded-4m studies take many
hours of this CPU. `save` copies into kept/ what the verdicts, the studies' reuse and the notebook
read: each completed run's records (config, final_info, train log, per-context evaluation rows,
feature metrics, artifacts, SAELens config), the sweeps' manifests, the notebooks and analyses
written under runs/, and each run folder's modification time (what orders a sweep's runs; git
keeps none). `restore` copies it back. A kept run has no weights: `study` and `sweep` reuse it and
judge against it; `eval`, `dashboard`, `load_run` refuse it in one line, and `analyse` passes over
an analysis that needs its SAE, saying so.

    python scripts/keep_runs.py save       # runs/ -> kept/ (then commit kept/)
    python scripts/keep_runs.py restore    # kept/ -> runs/, never over a completed run or a file runs/ has
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, one_line_errors  # noqa: E402 (first of the harness: its import guards)

import filecmp  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import typer  # noqa: E402

from runs import CHECKPOINT, read_json  # noqa: E402

LEFT_OUT = {"sae_weights.safetensors", "plugin_state.safetensors", CHECKPOINT}  # the weights: megabytes a run
FOLDER_TIMES = "folder_times.json"  # kept/'s own: each run folder's modification time
KEPT = ROOT / "kept"
app = typer.Typer(add_completion=False, no_args_is_help=True)


def completed(folder: Path) -> bool:
    return read_json(folder / "final_info.json").get("status") == "completed"


def kept_files(runs: Path) -> list[Path]:
    """The files under runs/ worth keeping: not weights, locks, the harness's dot-named half-written
    files or dashboards, and nothing of a run folder (one with a config.json) whose run has not completed."""
    unfinished = {c.parent for c in runs.rglob("config.json") if not completed(c.parent)}
    return sorted(p for p in runs.rglob("*") if p.is_file() and p.name not in LEFT_OUT and not p.name.endswith(".lock")
                  and not any(part.startswith(".") or part == "dashboard" for part in p.relative_to(runs).parts)
                  and not unfinished.intersection(p.parents))


def copy_over(path: Path, to: Path) -> None:
    """path's bytes into `to`, whole or not at all (a restore cut short leaves no half-written file)."""
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = to.with_name(f".{to.name}.keeping")
    shutil.copy2(path, staging)
    os.replace(staging, to)


@app.command()
def save(runs: Path = ROOT / "runs", kept: Path = KEPT) -> None:
    """Copy runs/'s records into kept/ (updating what changed there)."""
    with one_line_errors():
        files = kept_files(runs)
        changed = [p for p in files if not (kept / p.relative_to(runs)).exists()
                   or not filecmp.cmp(p, kept / p.relative_to(runs), shallow=False)]
        for path in changed:
            copy_over(path, kept / path.relative_to(runs))
        times = read_json(kept / FOLDER_TIMES)
        times.update({str(p.parent.relative_to(runs)): p.parent.stat().st_mtime for p in files
                      if p.name == "final_info.json"})
        (kept / FOLDER_TIMES).write_text(json.dumps(times, indent=1, sort_keys=True))
        mib = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file()) / 2**20
        print(f"{len(changed)} of {len(files)} files copied into {kept} ({mib:.1f} MiB in all); commit it to keep them")


@app.command()
def restore(runs: Path = ROOT / "runs", kept: Path = KEPT) -> None:
    """Copy kept/ into runs/: each kept run whole where runs/ has no completed run in its folder (an
    interrupted attempt there gives way to it), every other file where runs/ has none."""
    with one_line_errors():
        times, restored, left = read_json(kept / FOLDER_TIMES), 0, []
        kept_runs = {p.parent for p in kept.rglob("final_info.json")}
        for folder in sorted(kept_runs):
            target = runs / folder.relative_to(kept)
            if completed(target):  # runs/ has this run: the kept record gives way
                left += [] if filecmp.cmp(folder / "final_info.json", target / "final_info.json", shallow=False) else [target]
                continue
            (target / CHECKPOINT).unlink(missing_ok=True)
            for path in sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name == "final_info.json"):
                copy_over(path, target / path.name)  # final_info.json last: it says the run completed
            if str(folder.relative_to(kept)) in times:
                os.utime(target, (times[str(folder.relative_to(kept))],) * 2)
            restored += 1
        for path in sorted(p for p in kept.rglob("*") if p.is_file() and p.name != FOLDER_TIMES
                           and p.parent not in kept_runs):
            if not (runs / path.relative_to(kept)).exists():
                copy_over(path, runs / path.relative_to(kept))
                restored += 1
            elif not filecmp.cmp(path, runs / path.relative_to(kept), shallow=False):
                left.append(runs / path.relative_to(kept))
        print(f"{restored} runs and files restored into {runs}" + (f"; {len(left)} left as runs/ has them "
                                                                   f"(e.g. {left[0]})" if left else ""))


if __name__ == "__main__":
    app()
