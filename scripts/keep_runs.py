"""Keep runs/ in git without its weights, and put it back: runs/ is ignored by git (a run's weights
are megabytes), so a machine that is reset loses every run, and the embedded-4m studies take many
hours of this CPU. `save` copies into kept/ what the verdicts, the studies' reuse and the notebook
read: each completed run's records (config, final_info, train log, per-context evaluation rows,
feature metrics, artifacts, SAELens config), the sweeps' manifests, the notebooks and analyses
written under runs/. `restore` copies it back. A kept run has no weights: `study`, `sweep` and
`analyse` reuse it and judge against it; `eval`, `dashboard` and an analysis that reads a decoder
say it holds no trained SAE.

    python scripts/keep_runs.py save       # runs/ -> kept/ (then commit kept/)
    python scripts/keep_runs.py restore    # kept/ -> runs/, never over a file runs/ has
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, one_line_errors  # noqa: E402 (first of the harness: its import guards)

import filecmp  # noqa: E402
import shutil  # noqa: E402

import typer  # noqa: E402

from runs import read_json  # noqa: E402

WEIGHTS = {"sae_weights.safetensors", "plugin_state.safetensors", "checkpoint.pt"}  # megabytes a run
KEPT = ROOT / "kept"
app = typer.Typer(add_completion=False, no_args_is_help=True)


def kept_files(runs: Path) -> list[Path]:
    """The files under runs/ worth keeping: not weights, locks, half-written files or dashboards, and
    nothing of a run folder (one with a config.json) whose run has not completed."""
    unfinished = {c.parent for c in runs.rglob("config.json") if not completed(c.parent)}
    return sorted(p for p in runs.rglob("*") if p.is_file() and p.name not in WEIGHTS
                  and not p.name.endswith((".lock", ".partial")) and "dashboard" not in p.relative_to(runs).parts
                  and not unfinished.intersection(p.parents))


def completed(folder: Path) -> bool:
    return (folder / "final_info.json").exists() and read_json(folder / "final_info.json").get("status") == "completed"


def copy_missing(files: list[Path], source: Path, target: Path, overwrite: bool) -> tuple[int, list[Path]]:
    """(files copied, files left as they were because the target holds other bytes)."""
    copied, differing = 0, []
    for path in files:
        to = target / path.relative_to(source)
        if to.exists() and filecmp.cmp(path, to, shallow=False):
            continue
        if to.exists() and not overwrite:
            differing.append(to)
            continue
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, to)
        copied += 1
    return copied, differing


@app.command()
def save(runs: Path = ROOT / "runs", kept: Path = KEPT) -> None:
    """Copy runs/'s records into kept/ (updating what changed there)."""
    with one_line_errors():
        files = kept_files(runs)
        copied, _ = copy_missing(files, runs, kept, overwrite=True)
        mib = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file()) / 2**20
        print(f"{copied} of {len(files)} files copied into {kept} ({mib:.1f} MiB in all); commit it to keep them")


@app.command()
def restore(runs: Path = ROOT / "runs", kept: Path = KEPT) -> None:
    """Copy kept/ into runs/, leaving every file runs/ already has."""
    with one_line_errors():
        copied, differing = copy_missing(sorted(p for p in kept.rglob("*") if p.is_file()), kept, runs, overwrite=False)
        print(f"{copied} files restored into {runs}" + (f"; {len(differing)} left as runs/ has them, "
                                                       f"e.g. {differing[0]}" if differing else ""))


if __name__ == "__main__":
    app()
