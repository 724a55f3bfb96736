"""notebook.py, the lab notebook's lines on made-up runs: a run's result lines (headline metrics
with their bootstrap error and their change against the parent, the train log's dead latents, the
extra evals' first numbers), its verdict lines, the whole entry in the seed notebooks' shape, the
study summary, and appends that write a study's header once. No model, no training."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from frontier import OUTSIDE
from notebook import (append_notes, coverage_lines, notes_entry, result_lines, study_header, study_notes,
                      study_reading,
                      sweep_notes, verdict_lines)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder holding only its train log: the last record has a quarter of the latents dead."""
    folder = tmp_path / "run"
    folder.mkdir()
    log = [{"step": 0, "total_loss": 3.0, "dead_fraction": 0.0}, {"step": 31, "total_loss": 1.5, "dead_fraction": 0.25}]
    (folder / "train_log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log))
    return folder


INFO = {
    "training_steps": 32, "final_loss": 1.5,
    "metrics": {"model_performance_preservation": {"ce_loss_score": 0.75},
                "reconstruction_quality": {"explained_variance_whole_set": 0.5},
                "sparsity": {"l0": 40.0, "dead_fraction_eval": 0.125},
                "bootstrap_se": {"ce_loss_score": 0.012, "explained_variance_whole_set": float("nan")}},
    "evals": {"absorption": {"eval_result_metrics": {"mean": {"a": 0.1, "b": True, "c": 2, "d": {"e": 3.0, "f": 4.0,
                                                                                                "g": 5.0}}}},
              "sparse_probing": {"eval_result_metrics": {}, "not_scored": "not scored: no tokenizer"}},
}
PARENT = {"final_loss": 2.0, "metrics": {"model_performance_preservation": {"ce_loss_score": 0.7},
                                         "sparsity": {"dead_fraction_eval": 0.1}}}

VERDICTS = {
    "run_0_topk": {"knob": "k", "points": 4, "metrics": {
        "ce_loss_score": {"word": "better", "delta": 0.012, "uncertainty": 0.004},
        "kl_div_score": {"word": "tied (no uncertainty)", "delta": 0.0, "uncertainty": None},
        "explained_variance": {"word": "no value", "delta": None, "uncertainty": None}}},
    "run_0_gated": {"not_judged": "its runs vary more than one setting: no frontier of one knob"},
    "run_0_jumprelu": {"knob": "l0_coefficient", "points": 1, "metrics": {
        "ce_loss_score": {"word": OUTSIDE, "suggest": {"text": "add l0_coefficient=3 (the run's L0 4 is below)"}},
        "kl_div_score": {"word": OUTSIDE, "suggest": {"text": "add l0_coefficient=3 (the run's L0 4 is below)"}}}},
}


def test_result_lines_give_each_headline_metric_its_error_and_its_change_against_the_parent(run_dir):
    assert result_lines(INFO, PARENT, "run_1_initial", run_dir) == (
        "- training steps: 32\n"
        "- CE-loss score: 0.75 ± 0.012 (+0.05 vs run_1_initial)\n"
        "- explained variance (whole set): 0.5\n"  # no parent value, and a NaN error is not shown
        "- L0: 40\n"
        "- dead latents (never fire on the evaluation text): 12.5% (+2.5 points vs run_1_initial)\n"
        "- final training loss: 1.5 (-0.5 vs run_1_initial)\n"
        "- dead latents at the end of training (not fired in the last tenth of its tokens, at most 1M): 25.0%\n"
        "- absorption: a 0.1, c 2, e 3, f 4\n"  # the first four numbers, booleans aside
        "- sparse_probing: not scored: no tokenizer\n")


def test_without_a_parent_no_change_is_shown(run_dir):
    assert " vs " not in result_lines(INFO, None, None, run_dir)


def test_verdict_lines_say_each_word_with_its_delta_one_sentence_outside_the_sweep_and_why_not_judged():
    assert verdict_lines(VERDICTS) == (
        "Against run_0_topk (k, 4 runs) at this L0: ce_loss_score better (+0.012 ± 0.004); "
        "kl_div_score tied (no uncertainty) (+0); explained_variance no value\n"
        "Against run_0_gated: not judged (its runs vary more than one setting: no frontier of one knob)\n"
        f"Against run_0_jumprelu (l0_coefficient, 1 run): {OUTSIDE}: add l0_coefficient=3 (the run's L0 4 is below)\n")
    assert verdict_lines({}) == ""


def test_an_entry_has_the_seed_notebooks_shape(run_dir):
    plugin = SimpleNamespace(run_number=2, title="Stable init", study="zscore_ortho", name="run_2_stable_init",
                             parent="run_1_initial", description="Stable init\n\nWhat it changes.")
    info = {**INFO, "verdict": VERDICTS, "warnings": ["the training loss never moved", "L0 is 0"]}
    assert notes_entry(plugin, run_dir, info, PARENT, "lr=0.001") == (
        "## Run 2: Stable init\n"
        f"Study: zscore_ortho · Plugin: run_2_stable_init · Setting: lr=0.001 · Run folder: {run_dir}\n"
        "Results:\n" + result_lines(info, PARENT, "run_1_initial", run_dir) + verdict_lines(VERDICTS)
        + "Warning: the training loss never moved\nWarning: L0 is 0\n"
        "Description: Stable init\n\nWhat it changes.\n\n")


def test_the_study_summary_lists_each_run_with_its_verdicts_and_the_figures_that_read_the_data():
    rows = [{"label": "Run 0: Baseline", "folder": "runs/baseline/run_0_baseline/1",
             "info": {**INFO, "run": {"study": "baseline"}}},
            {"label": "Run 2: Stable init", "folder": "runs/zscore_ortho/run_2_stable_init/1",
             "info": {"metrics": {"sparsity": {"l0": 12.0}}, "verdict": VERDICTS}}]
    figures = {Path("figures/z/frontier_ce_loss_score.png"): "the frontier", Path("figures/z/l0_evolution.png"): "L0",
               Path("figures/z/decoder_norms.png"): "not read from the data"}
    assert study_notes("zscore_ortho", rows, figures) == "\n".join([
        "## Study summary: zscore_ortho", "",
        "| run | L0 | CE-loss score | explained variance (whole set) | against the baselines at its L0 "
        "(CE-loss score) | run folder |",
        "|---|---|---|---|---|---|",
        "| Run 0: Baseline | 40 | 0.75 | 0.5 | (a baseline) | runs/baseline/run_0_baseline/1 |",
        "| Run 2: Stable init | 12 | - | - | run_0_topk: better; run_0_jumprelu: outside its sweep "
        "| runs/zscore_ortho/run_2_stable_init/1 |",
        "", "Coverage (a baseline covers a run whose L0 lies inside its sweep):", "",
        "- run_0_jumprelu: covers none; leaves outside Run 2: Stable init",
        "- run_0_topk: covers Run 2: Stable init",
        "", "Figures:", "",
        "- `figures/z/frontier_ce_loss_score.png`: the frontier",
        "- `figures/z/l0_evolution.png`: L0", "", ""])


def test_a_synthetic_studys_coverage_is_read_from_its_mcc_verdicts():
    rows = [{"label": f"Run {n}", "info": {"verdict": {"run_0_topk": {"metrics": {"mcc": {"word": word}}}}}}
            for n, word in ((1, "tied"), (2, OUTSIDE))]
    assert coverage_lines(rows)[-1] == "- run_0_topk: covers Run 1; leaves outside Run 2"


def test_a_study_summary_says_in_words_what_each_verdict_and_each_step_found_against_its_noise():
    def run(name, parent, mcc, l0, verdict):
        info = {"run": {"study": "mine", "plugin": name, "parent": parent}, "verdict": verdict,
                "metrics": {"ground_truth": {"mcc": mcc}, "sparsity": {"l0": l0}}}
        return {"label": f"mine/{name}", "info": info, "folder": Path(name)}

    def judged(word, delta):
        return {"metrics": {"mcc": {"word": word, "delta": delta, "uncertainty": 0.004,
                                    "uncertainty_parts": {"run_seeds": 0.003, "baseline_seeds": 0.002}}}}
    baseline = {"label": "baseline/run_0_baseline", "folder": Path("b"),
                "info": {"run": {"study": "baseline", "plugin": "run_0_baseline"},
                         "metrics": {"ground_truth": {"mcc": 0.6}, "sparsity": {"l0": 20.0}}}}
    rows = [baseline,
            run("run_1", "run_0_baseline", 0.65, 20.0, {"run_0_topk": judged("worse (one seed: provisional)", -0.04),
                                                        "run_0_gated": {"not_judged": "no frontier of one knob"}}),
            run("run_2", "run_1", 0.652, 21.0, {"run_0_topk": judged("worse (one seed: provisional)", -0.038)}),
            run("run_3", "run_2", 0.40, 400.0, {"run_0_topk": {"metrics": {"mcc": {"word": OUTSIDE}}}})]
    assert study_reading(rows, "mcc", "MCC") == [
        "", "What the verdicts say (MCC at the run's L0, Δ ± its standard error; one seed: provisional):", "",
        "- against run_0_gated: not judged for run_1",
        "- against run_0_topk: worse for run_1 (-0.040 ± 0.004), run_2 (-0.038 ± 0.004); outside its sweep for run_3",
        "", "Along the study (each run against the run it builds on; noise: √2 × the run's seed-to-seed standard "
        "deviation of MCC, measured or the baselines'):", "",
        "- run_2 against run_1: MCC +0.002, L0 +1 (+5.0%); MCC within noise (2 × 0.004)",
        "- run_3 against run_2: MCC -0.252, L0 +379 (+1804.8%); noise unknown (no seed spread in its verdicts)"]
    assert study_reading([baseline], "mcc", "MCC") == []


def test_a_sweep_summary_pools_each_settings_seeds_and_shows_each_seeds_convergence():
    def row(k, seed, mcc, moved):
        info = {"status": "completed", "metrics": {"ground_truth": {"mcc": mcc, "f1": 0.5}, "sparsity": {"l0": k}},
                "convergence": {"converged": abs(moved) <= 0.1, "l2_loss": moved, "l0": 0.0}}
        return {"label": f"k={k},seed={seed}", "info": info}
    rows = [row(8, 42, 0.50, -0.04), row(8, 43, 0.52, -0.2), row(16, 42, 0.6, 0.01),
            {"label": "k=32,seed=42", "info": {"status": "failed"}}]
    assert sweep_notes("run_0_topk on synth", rows).splitlines() == [
        "## Sweep summary: run_0_topk on synth", "",
        "| setting | seeds | L0 | MCC | F1 | precision | recall | explained variance (whole set) | converged "
        "(reconstruction loss, L0 moved over the last fifth) |", "|---|---|---|---|---|---|---|---|---|",
        "| k=8 | 2 | 8 ± 0 | 0.51 ± 0.014 | 0.5 ± 0 | - | - | - | yes (-4.0%, +0.0%); no (-20.0%, +0.0%) |",
        "| k=16 | 1 | 16 | 0.6 | 0.5 | - | - | - | yes (+1.0%, +0.0%) |", ""]


def test_appends_write_a_studys_header_once_before_its_first_entry(tmp_path):
    notes = tmp_path / "new" / "notes.md"
    first, second = study_header("Zscore", "  Two ideas.\n"), study_header("Topk", "Pairs.")
    assert first == "# Title: Zscore\n# Experiment description: Two ideas.\n\n"
    append_notes(notes, first, "entry 1\n")
    append_notes(notes, first, "entry 2\n")
    append_notes(notes, second, "entry 3\n")
    assert notes.read_text() == first + "entry 1\nentry 2\n" + second + "entry 3\n"
