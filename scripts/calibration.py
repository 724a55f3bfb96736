"""The verdict's calibration, measured: a baseline swept at two seeds; the same plugin at two other
seeds judged against that sweep as if it were a new idea (an A/A test: it must come out "tied");
and a change known to be worse (a third of the learning rate) judged the same way (it must come
out "worse"). Runs are trained with `sweep`'s machinery (reused when done): the baseline's into
runs/sweeps/, the judged ones into runs-calibration/, apart, so that they never join the
baseline's frontier (a second learning rate there would leave it with two knobs, and no frontier).
The verdicts are frontier.verdict's, as a study's run gets them.

    python scripts/calibration.py --preset synth --plugin run_0_topk --knob k --values 8,16,32 --at 16

Prints a line per metric and writes the verdicts as JSON (--out). docs/studies.md keeps the results.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, one_line_errors  # noqa: E402 (first of the harness: its import guards)

import json  # noqa: E402

import typer  # noqa: E402

import evals  # noqa: E402
import frontier  # noqa: E402
import studies  # noqa: E402
from experiment import NOTES, RUNS, build_config, find_plugin  # noqa: E402
from runs import load_context_rows  # noqa: E402

BASELINE_SEED, RUN_SEED = 42, 44  # the sweep's seeds are 42, 43; the judged runs' 44, 45
JUDGED_RUNS = ROOT / "runs-calibration"


def records(plugin, grid: list[str], seed: int, preset: str, knob: str, runs_root: Path) -> list[dict]:
    overrides = dict(tokens=None, seed=seed, device="auto", evals=None)
    rows, _ = studies.sweep_runs(plugin, grid, 2, preset, overrides, runs_root, NOTES)
    studies.exit_if_any_failed(rows)
    return [frontier._record(row["info"], knob, Path(row["folder"])) for row in rows]


def main(plugin: str = typer.Option(..., help="The baseline plugin."), preset: str = "synth",
         knob: str = typer.Option(..., help="Its sparsity knob."), values: str = typer.Option(..., help="v1,v2,..."),
         at: str = typer.Option(..., help="The knob value of the judged runs."),
         out: Path | None = typer.Option(None, help="Also write the verdicts here (JSON).")) -> None:
    with one_line_errors():
        found = find_plugin(plugin)
        sweep = frontier.build_frontiers(records(found, [f"{knob}={values}"], BASELINE_SEED, preset, knob, RUNS))
        lr = build_config(preset, f"{found.study}/{found.name}").lr / 3
        judged = {"the same plugin (A/A)": records(found, [f"{knob}={at}"], RUN_SEED, preset, knob, JUDGED_RUNS),
                  f"lr ÷ 3 ({lr:.3g})": records(found, [f"{knob}={at}", f"lr={lr:.6g}"], RUN_SEED, preset, knob,
                                                JUDGED_RUNS)}
        verdicts = {name: frontier.verdict(frontier.pool_seeds(runs), sweep, rows_of=load_context_rows,
                                           score_of=evals.score_of) for name, runs in judged.items()}
        for name, by_metric in verdicts.items():
            for metric, entry in by_metric.items():
                delta, noise = entry["delta"], entry["uncertainty"]
                shown = "-" if delta is None else f"{delta:+.4f}" + ("" if noise is None else (
                    f" ± {noise:.4f}, beyond {entry['standard_errors_needed']:.2g} of them to count"))
                print(f"{name}: {metric} {entry['word']} ({shown}; {frontier.footing_of(entry)})")
        if out:
            out.write_text(json.dumps(verdicts, indent=2, default=str))


if __name__ == "__main__":
    typer.run(main)
