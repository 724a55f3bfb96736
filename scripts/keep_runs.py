"""Keep runs/ in git without its weights, and put it back: runs/ is ignored by git (a run's weights
are megabytes), so a machine that is reset loses every run, and the embedded-4m studies take many
hours of this CPU. `save` keeps in kept/, each file gzipped (<name>.gz), what the verdicts, the
studies' reuse and the notebook read: each completed run's records (config, final_info, train log,
per-context evaluation rows, feature metrics, artifacts, SAELens config), the sweeps' manifests, the
notebooks and analyses written under runs/, and each run folder's modification time (what orders a
sweep's runs; git keeps none). `restore` puts them back. A kept run has no weights: `study` and
`sweep` reuse it and judge against it; `eval`, `dashboard`, `load_run` refuse it in one line, and
`analyse` passes over an analysis that needs its SAE, saying so.

    python scripts/keep_runs.py save       # runs/ -> kept/ (then commit kept/)
    python scripts/keep_runs.py restore    # kept/ -> runs/, never over a completed run or a file runs/ has
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, one_line_errors  # noqa: E402 (first of the harness: its import guards)

import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import typer  # noqa: E402

from runs import CHECKPOINT, read_json  # noqa: E402

# The weights (megabytes a run), and the held-out tokens only a re-scoring of those weights reads.
LEFT_OUT = {"sae_weights.safetensors", "plugin_state.safetensors", CHECKPOINT, "eval_tokens.pt"}
FOLDER_TIMES = "folder_times.json"  # kept/'s own: each run folder's modification time
KEPT = ROOT / "kept"
app = typer.Typer(add_completion=False, no_args_is_help=True)


def completed(folder: Path) -> bool:
    return read_json(folder / "final_info.json").get("status") == "completed"


def kept_files(runs: Path) -> list[Path]:
    """The files under runs/ worth keeping: not weights, locks, the harness's dot-named half-written
    files, dashboards or a sweep's figures (drawn again from its runs), and nothing of a run folder
    (one with a config.json) whose run has not completed."""
    unfinished = {c.parent for c in runs.rglob("config.json") if not completed(c.parent)}
    return sorted(p for p in runs.rglob("*") if p.is_file() and p.name not in LEFT_OUT and not p.name.endswith(".lock")
                  and not any(part.startswith(".") or part in ("dashboard", "figures") for part in p.relative_to(runs).parts)
                  and not unfinished.intersection(p.parents))


def write_whole(to: Path, data: bytes) -> None:
    """data into `to`, whole or not at all (a save or restore cut short leaves no half-written file)."""
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = to.with_name(f".{to.name}.keeping")
    staging.write_bytes(data)
    os.replace(staging, to)


def unpacked(packed: Path) -> bytes | None:
    return gzip.decompress(packed.read_bytes()) if packed.exists() else None


@app.command()
def save(runs: Path = ROOT / "runs", kept: Path = KEPT) -> None:
    """Keep runs/'s records in kept/ (updating what changed there)."""
    with one_line_errors():
        files = kept_files(runs)
        packed = {path: kept / f"{path.relative_to(runs)}.gz" for path in files}
        changed = [path for path in files if unpacked(packed[path]) != path.read_bytes()]
        for path in changed:  # mtime 0: the same bytes pack the same, so git sees no change
            write_whole(packed[path], gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))
        times = read_json(kept / FOLDER_TIMES)
        times.update({str(p.parent.relative_to(runs)): p.parent.stat().st_mtime for p in files
                      if p.name == "final_info.json"})
        write_whole(kept / FOLDER_TIMES, json.dumps(times, indent=1, sort_keys=True).encode())
        mib = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file()) / 2**20
        print(f"{len(changed)} of {len(files)} files kept anew in {kept} ({mib:.1f} MiB in all); commit it to keep them")


@app.command()
def restore(runs: Path = ROOT / "runs", kept: Path = KEPT) -> None:
    """Put kept/ back into runs/: each kept run whole where runs/ has no completed run in its folder
    (an interrupted attempt there gives way to it), every other file where runs/ has none."""
    with one_line_errors():
        times, restored, left = read_json(kept / FOLDER_TIMES), 0, []
        originals = {packed: runs / str(packed.relative_to(kept)).removesuffix(".gz") for packed in kept.rglob("*.gz")}
        run_folders = {to.parent for to in originals.values() if to.name == "final_info.json"}
        for folder in sorted(run_folders):
            if completed(folder):  # runs/ has this run: the kept record gives way
                kept_info = unpacked(kept / folder.relative_to(runs) / "final_info.json.gz")
                left += [] if kept_info == (folder / "final_info.json").read_bytes() else [folder]
                continue
            (folder / CHECKPOINT).unlink(missing_ok=True)
            its_own = [packed for packed, to in originals.items() if to.parent == folder]
            for packed in sorted(its_own, key=lambda p: p.name == "final_info.json.gz"):  # last: it says "completed"
                write_whole(originals[packed], unpacked(packed))
            if str(folder.relative_to(runs)) in times:
                os.utime(folder, (times[str(folder.relative_to(runs))],) * 2)
            restored += 1
        for packed, to in sorted(originals.items()):
            if to.parent in run_folders:
                continue
            if not to.exists():
                write_whole(to, unpacked(packed))
                restored += 1
            elif unpacked(packed) != to.read_bytes():
                left.append(to)
        print(f"{restored} runs and files restored into {runs}" + (f"; {len(left)} left as runs/ has them "
                                                                   f"(e.g. {left[0]})" if left else ""))


if __name__ == "__main__":
    app()
