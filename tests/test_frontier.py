"""frontier.py, the matched verdict: a baseline frontier with known values gives the interpolated
value in log L0, Δ and its uncertainty, the better/tied/worse word, the standard error across seeds,
the refusal to extrapolate with the knob to add (penalty and k sweeps), and a bootstrap that is
deterministic for a seed and shrinks with more batches; a run judged against every baseline in the
run index, the words the notebook shows, and the sanity guards (a run's warnings) on made-up run
folders. No model, no training: runs in a second."""

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, imported_modules
from safetensors.torch import save_file

import experiment
import frontier
import runs
from common import HarnessError
from frontier import OUTSIDE, bootstrap_se, build_frontiers, interpolate, matched, pool_seeds, suggest_knob, verdict


def record(l0, knob, seed=0, knob_name="sparsity_penalty", uncertainties=None, **metrics):
    return {"l0": l0, "metrics": metrics, "knob": (knob_name, knob), "seed": seed,
            "uncertainties": uncertainties or {}}


def two_point_frontier(u_lo=None, u_hi=None):
    """L0 10 -> 0.5 and L0 100 -> 0.9: halfway in log L0 (L0 √1000) the baseline is 0.7."""
    return build_frontiers([
        record(10, 1.0, explained_variance=0.5, uncertainties={"explained_variance": u_lo} if u_lo else None),
        record(100, 0.1, explained_variance=0.9, uncertainties={"explained_variance": u_hi} if u_hi else None),
    ])["explained_variance"]


# ---- interpolation ------------------------------------------------------------------------------

def test_the_baseline_is_interpolated_linearly_in_log_l0():
    f = two_point_frontier()
    assert interpolate(f, math.sqrt(1000))["value"] == pytest.approx(0.7)
    assert interpolate(f, 10 ** 1.25)["value"] == pytest.approx(0.6)  # a quarter of the way in log L0
    assert interpolate(f, math.sqrt(1000))["between"] == [1.0, 0.1]


def test_on_a_sweep_point_the_baseline_is_that_point():
    f = two_point_frontier(0.01, 0.03)
    on_point = interpolate(f, 10)
    assert {k: on_point[k] for k in ("value", "uncertainty", "between", "reason")} == {
        "value": 0.5, "uncertainty": 0.01, "between": [1.0], "reason": None}
    assert [(p["l0"], w) for p, w in on_point["weights"]] == [(10, 1.0)]
    assert interpolate(f, 100)["value"] == 0.9


def test_the_baseline_uncertainty_is_interpolated_like_its_value():
    assert interpolate(two_point_frontier(0.02, 0.04), math.sqrt(1000))["uncertainty"] == pytest.approx(0.03)
    assert interpolate(two_point_frontier(0.02, None), math.sqrt(1000))["uncertainty"] is None


def test_interpolation_uses_the_two_nearest_points_that_bracket_the_l0():
    f = build_frontiers([record(1, 3.0, mse=9.0), record(10, 1.0, mse=5.0), record(100, 0.1, mse=1.0),
                         record(1000, 0.01, mse=-99.0)])["mse"]
    assert interpolate(f, math.sqrt(1000))["value"] == pytest.approx(3.0)
    assert interpolate(f, math.sqrt(1000))["between"] == [1.0, 0.1]


def test_interpolation_refuses_to_extrapolate_and_says_why():
    f = two_point_frontier()
    for l0 in (9.99, 100.01):
        got = interpolate(f, l0)
        assert got["value"] is None and got["uncertainty"] is None
        assert "outside the baseline sweep's L0 range 10–100" in got["reason"]


# ---- seeds --------------------------------------------------------------------------------------

def test_seeds_of_one_knob_value_give_their_mean_and_standard_error():
    f = build_frontiers([record(90, 0.1, seed=s, explained_variance=v) for s, v in ((1, 0.6), (2, 0.7), (3, 0.8))]
                        + [record(10, 1.0, explained_variance=0.5)])["explained_variance"]
    point = f["points"][1]
    assert point["l0"] == 90 and point["value"] == pytest.approx(0.7) and point["seeds"] == [1, 2, 3]
    assert point["uncertainty"] == pytest.approx(0.1 / math.sqrt(3))  # sample std 0.1 over √3
    assert f["points"][0]["uncertainty"] is None  # one seed and no uncertainty of its own


def test_a_lone_seed_keeps_its_own_uncertainty_and_the_run_pools_like_the_baseline():
    assert pool_seeds([record(50, 0.1, explained_variance=0.7, uncertainties={"explained_variance": 0.02})]) \
        ["uncertainties"] == {"explained_variance": 0.02}
    run = pool_seeds([record(40, 0.1, seed=1, ce_loss_score=0.9), record(60, 0.1, seed=2, ce_loss_score=0.8)])
    assert run["l0"] == 50 and run["metrics"]["ce_loss_score"] == pytest.approx(0.85)
    assert run["uncertainties"]["ce_loss_score"] == pytest.approx(0.05)


# ---- the verdict --------------------------------------------------------------------------------

MID = math.sqrt(1000)  # baseline 0.7 with uncertainty 0.03 there; the run's own is 0.04 -> Δ ± 0.05


@pytest.mark.parametrize("value, word", [(0.85, "better"), (0.75, "tied"), (0.65, "tied"), (0.55, "worse")])
def test_the_word_needs_delta_beyond_two_uncertainties(value, word):
    run = record(MID, 0.3, explained_variance=value, uncertainties={"explained_variance": 0.04})
    got = verdict(run, {"explained_variance": two_point_frontier(0.03, 0.03)})["explained_variance"]
    assert got["baseline"] == pytest.approx(0.7) and got["delta"] == pytest.approx(value - 0.7)
    assert got["uncertainty"] == pytest.approx(0.05)  # 0.03 and 0.04 in quadrature
    assert got["uncertainty_parts"] == {"run": 0.04, "baseline": pytest.approx(0.03)}
    assert got["word"] == f"{word} (one seed: provisional)"
    assert got["pairing"] == "unpaired: no scoring of per-context rows was given"


def test_delta_stays_raw_and_the_word_follows_the_metric_direction():
    f = build_frontiers([record(10, 1.0, mse=0.5, uncertainties={"mse": 0.01}),
                         record(100, 0.1, mse=0.9, uncertainties={"mse": 0.01})])
    got = verdict(record(MID, 0.3, mse=0.85), f)["mse"]  # higher MSE than the baseline: worse
    assert got["delta"] == pytest.approx(0.15) and got["word"].startswith("worse ") and got["higher_is_better"] is False
    assert verdict(record(MID, 0.3, mse=0.85), f, {"mse": True})["mse"]["word"].startswith("better ")


def test_without_any_uncertainty_only_an_exact_tie_is_tied_and_the_word_says_so():
    f = {"explained_variance": two_point_frontier()}
    word = lambda v: verdict(record(10, 0.3, explained_variance=v), f)["explained_variance"]["word"]  # noqa: E731
    assert word(0.5) == "tied (no uncertainty; one seed: provisional)"
    assert word(0.5001) == "better (no uncertainty; one seed: provisional)"
    assert word(0.4999) == "worse (no uncertainty; one seed: provisional)"


def test_outside_the_sweep_there_is_no_delta_but_a_knob_to_add():
    got = verdict(record(5, 3.0, explained_variance=0.4), {"explained_variance": two_point_frontier()})
    entry = got["explained_variance"]
    assert entry["word"] == OUTSIDE == "outside the baseline sweep: widen it"
    assert entry["baseline"] is None and entry["delta"] is None and entry["uncertainty"] is None
    assert entry["suggest"]["knob"] == "sparsity_penalty" and entry["suggest"]["value"] is not None


def test_a_metric_missing_from_the_run_or_the_baseline_is_said_so():
    frontiers = build_frontiers([record(10, 1.0, ce_loss_score=0.5, kl_div_score=None),
                                 record(100, 0.1, ce_loss_score=0.9, kl_div_score=None)])
    got = verdict(record(MID, 0.3, ce_loss_score=None), frontiers)
    assert got["ce_loss_score"]["word"] == "no value" and got["kl_div_score"]["word"] == "no baseline"
    assert frontiers["kl_div_score"]["excluded"] == ["sparsity_penalty=1.0: no kl_div_score",
                                                     "sparsity_penalty=0.1: no kl_div_score"]


def test_a_metric_without_a_direction_is_refused():
    f = build_frontiers([record(10, 1.0, l2_ratio=0.5), record(100, 0.1, l2_ratio=0.9)])
    with pytest.raises(HarnessError, match="l2_ratio"):
        verdict(record(MID, 0.3, l2_ratio=0.7), f)


def test_the_verdict_is_plain_json():
    f = {"explained_variance": two_point_frontier(np.float32(0.03), 0.03)}
    got = {"inside": verdict(record(np.float64(MID), 0.3, explained_variance=np.float32(0.8)), f),
           "outside": verdict(record(1000, 0.01, explained_variance=0.95), f)}
    assert json.loads(json.dumps(got, allow_nan=False)) == json.loads(json.dumps(got))
    assert isinstance(got["inside"]["explained_variance"]["delta"], float)


# ---- the knob to add when the run is outside the sweep ------------------------------------------

def test_a_penalty_sweep_suggests_a_larger_penalty_below_it_and_a_smaller_one_above():
    f = two_point_frontier()  # penalty 1.0 -> L0 10, penalty 0.1 -> L0 100: L0 ∝ 1/penalty
    below = suggest_knob(f, 4)  # aims a quarter past the run: L0 3.2 -> penalty 10/3.2 = 3.125
    assert below["value"] == 3.1
    assert below["text"] == "add sparsity_penalty=3.1 (the run's L0 4 is below the sweep's 10–100)"
    assert suggest_knob(f, 400)["value"] == 0.02  # aims at L0 500 -> 0.1 × 100/500


def test_a_k_sweep_suggests_a_whole_k_near_the_runs_l0():
    f = build_frontiers([record(16, 16, knob_name="k", ce_loss_score=0.8),
                         record(64, 64, knob_name="k", ce_loss_score=0.9)])["ce_loss_score"]
    assert suggest_knob(f, 200) == {"knob": "k", "value": 250, "side": "above",
                                    "text": "add k=250 (the run's L0 200 is above the sweep's 16–64)"}
    assert suggest_knob(f, 8)["value"] == 6  # aims at L0 6.4
    assert suggest_knob(f, 1000)["value"] == 1200  # 1250 to 2 significant digits


def test_the_suggestion_follows_the_sweeps_own_slope_at_its_end():
    # L0 ∝ penalty^-0.5 at the low-L0 end: reaching L0 3.2 from L0 10 at penalty 1 needs penalty (10/3.2)^2
    f = build_frontiers([record(100, 0.01, mse=1.0), record(30, 0.11, mse=1.0), record(10, 1.0, mse=1.0)])["mse"]
    slope = math.log(10 / 30) / math.log(1.0 / 0.11)
    assert suggest_knob(f, 4)["value"] == float(f"{math.exp(math.log(3.2 / 10) / slope):.2g}")


def test_a_one_point_sweep_or_a_wrong_way_slope_falls_back_on_how_the_knob_acts():
    one_k = build_frontiers([record(30, 32, knob_name="k", mse=1.0)])["mse"]
    assert suggest_knob(one_k, 60)["value"] == 80  # L0 ≈ k: 32 × 75/30
    noisy = build_frontiers([record(10, 1.0, mse=1.0), record(12, 1.1, mse=1.0)])["mse"]  # L0 rose with penalty
    assert suggest_knob(noisy, 4)["value"] == 3.1  # L0 ∝ 1/penalty from penalty 1.0 at L0 10


def test_where_l0_saturates_one_suggestion_moves_the_knob_at_most_tenfold():
    # JumpReLU on synth at 1M samples: λ 3 -> L0 8.8, λ 560 -> L0 4.8 (slope -0.12); followed to L0 0.88
    # the fit asked for λ 1.5e9, where L0 was still 1.5.
    flat = build_frontiers([record(8.8, 3.0, knob_name="l0_coefficient", mse=1.0),
                            record(4.8, 560.0, knob_name="l0_coefficient", mse=1.0)])["mse"]
    assert suggest_knob(flat, 1.1)["value"] == 5600.0
    assert suggest_knob(flat, 100)["value"] == 0.21  # above: the L0 ratio, 125/8.8, is the larger limit


def test_a_sweep_with_no_positive_knob_cannot_be_extrapolated():
    f = build_frontiers([record(500, 0.0, mse=1.0), record(800, 0.0, seed=1, mse=1.0)])["mse"]
    assert suggest_knob(f, 5)["value"] is None


# ---- building frontiers from runs ---------------------------------------------------------------

def test_points_with_no_positive_l0_are_left_out_with_the_reason():
    f = build_frontiers([record(0, 5.0, mse=1.0), record(10, 1.0, mse=0.5)])["mse"]
    assert [p["knob_value"] for p in f["points"]] == [1.0]
    assert f["excluded"] == ["sparsity_penalty=5.0: L0 0.0 is missing or not positive"]


def test_a_baseline_sweep_varies_exactly_one_knob():
    with pytest.raises(HarnessError, match="one knob"):
        build_frontiers([record(10, 1.0, mse=1.0), record(20, 32, knob_name="k", mse=1.0)])
    with pytest.raises(HarnessError, match="one knob"):
        build_frontiers([])


def final_info(l0=42.0, penalty=0.2, k=None, status="completed", ce=0.9):
    return {"status": status, "run": {"study": "baseline", "plugin": "run_0_baseline"},
            "metrics": {"sparsity": {"l0": l0},
                        "model_performance_preservation": {"ce_loss_score": ce},
                        "model_behavior_preservation": {"kl_div_score": 0.8},
                        "reconstruction_quality": {"explained_variance": 1.2, "explained_variance_legacy": 0.7,
                                                   "explained_variance_whole_set": 0.6},
                        "bootstrap_se": {"ce_loss_score": 0.01, "kl_div_score": None,
                                         "explained_variance_whole_set": 0.02, "contexts": 32}},
            "provenance": {"seed": 7, "config": {"sparsity_penalty": penalty, "hyperparams": {"k": k}}}}


def test_a_record_is_read_from_final_info_with_its_bootstrap_uncertainties():
    got = frontier.record_from_final_info(final_info(), "sparsity_penalty")
    assert got == {"l0": 42.0, "knob": ("sparsity_penalty", 0.2), "seed": 7,
                   "metrics": {"ce_loss_score": 0.9, "kl_div_score": 0.8, "explained_variance": 0.6},
                   "uncertainties": {"ce_loss_score": 0.01, "explained_variance": 0.02}, "convergence": None}
    assert frontier.record_from_final_info(final_info(k=64), "k")["knob"] == ("k", 64)
    assert frontier.record_from_final_info(final_info(), "sparsity_penalty", "explained_variance_legacy") \
        ["metrics"]["explained_variance"] == 0.7


def test_only_completed_runs_with_the_knob_make_records():
    with pytest.raises(HarnessError, match="run_0_baseline is not completed"):
        frontier.record_from_final_info(final_info(status="failed"), "sparsity_penalty")
    with pytest.raises(HarnessError, match="knob 'tau'"):
        frontier.record_from_final_info(final_info(), "tau")


# ---- the bootstrap over evaluation batches ------------------------------------------------------

def test_the_bootstrap_is_deterministic_for_a_seed():
    batches = np.random.default_rng(1).normal(0.7, 0.05, size=20)
    assert bootstrap_se(batches, seed=3) == bootstrap_se(list(batches), seed=3)
    assert bootstrap_se(batches, seed=3) != bootstrap_se(batches, seed=4)


def test_the_bootstrap_shrinks_with_more_batches_like_a_standard_error():
    draws = np.random.default_rng(2).normal(0.7, 0.05, size=1600)
    few, many = bootstrap_se(draws[:16]), bootstrap_se(draws)
    assert many < few / 5  # √(1600/16) = 10 times smaller, up to sampling noise
    assert many == pytest.approx(np.std(draws, ddof=1) / math.sqrt(len(draws)), rel=0.15)


def test_the_bootstrap_takes_a_statistic_of_rows_and_needs_two_batches():
    # CE-loss score per batch rows (ablated, with SAE, clean): the score is a ratio of means
    rows = np.random.default_rng(3).normal([6.0, 3.2, 3.0], 0.1, size=(30, 3))
    score = lambda r: (r[:, 0].mean() - r[:, 1].mean()) / (r[:, 0].mean() - r[:, 2].mean())  # noqa: E731
    se = bootstrap_se(rows, statistic=score, resamples=200)
    assert 0 < se < 0.05
    assert bootstrap_se([0.7]) is None and bootstrap_se([]) is None


# ---- the module's place ------------------------------------------------------------------------

def test_frontier_builds_only_on_the_run_folders_reader_and_has_short_functions():
    tree = ast.parse((ROOT / "frontier.py").read_text())
    assert imported_modules(tree) <= {"__future__", "functools", "json", "math", "collections", "pathlib", "typing",
                                      "numpy", "scipy", "safetensors", "common", "runs"}
    assert not [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno >= 60]


def test_a_nearly_flat_sweep_suggests_by_the_proportional_rule_not_orders_of_magnitude_off():
    flat = frontier.build_frontiers([
        {"l0": 117.4, "metrics": {"ce_loss_score": 0.9}, "knob": ("sparsity_penalty", 0.16), "seed": 0},
        {"l0": 118.0, "metrics": {"ce_loss_score": 0.9}, "knob": ("sparsity_penalty", 0.01), "seed": 0}])
    suggestion = frontier.suggest_knob(flat["ce_loss_score"], 71.37)
    assert 0.16 < suggestion["value"] < 1.0  # L0 ∝ 1/penalty from the sweep's end, aimed past the run


# ---- a run against every baseline on its activations, and the words the notebook shows ---------

def indexed(info: dict, plugin: str, cache: str = "acts-1", study: str = "baseline") -> tuple[Path, dict, dict]:
    """An entry of the run index (runs.run_index) for a made-up run folder."""
    return Path("runs") / study / plugin, {"study": study, "plugin": plugin}, {**info, "activation_cache": cache}


def test_a_run_is_judged_against_each_baseline_swept_on_its_activations():
    run = {**final_info(l0=math.sqrt(1000), ce=0.95), "activation_cache": "acts-1"}
    run["metrics"]["bootstrap_se"] = {"ce_loss_score": 0.01}
    index = [indexed(final_info(l0=10, penalty=1.0, ce=0.5), "run_0_baseline"),
             indexed(final_info(l0=100, penalty=0.1, ce=0.9), "run_0_baseline"),
             indexed(final_info(l0=30, penalty=0.3, ce=0.1), "run_0_baseline", cache="acts-2"),  # other activations
             indexed(final_info(l0=20, penalty=0.3, status="failed"), "run_0_baseline"),
             indexed(final_info(l0=20, k=16), "run_0_topk"), indexed(final_info(l0=40, k=32), "run_0_topk"),
             indexed({**final_info(l0=20, k=16), "dict_size": 8}, "run_0_gated"),
             indexed(final_info(l0=40, penalty=0.1, k=32), "run_0_gated")]  # two settings vary

    def knob_of(plugin):
        if plugin == "run_0_topk":
            raise HarnessError("no plugin run_0_topk")
        return "sparsity_penalty"
    found = frontier.verdicts(run, index, "run_1_mine", knob_of)
    assert list(found) == ["run_0_baseline", "run_0_gated", "run_0_topk"]
    assert found["run_0_baseline"]["knob"] == "sparsity_penalty" and found["run_0_baseline"]["points"] == 2
    ce = found["run_0_baseline"]["metrics"]["ce_loss_score"]
    assert ce["baseline"] == pytest.approx(0.7) and ce["word"] == "better (one seed: provisional)"
    assert found["run_0_gated"] == {"not_judged": "its runs vary more than one setting: no frontier of one knob"}
    assert found["run_0_topk"] == {"not_judged": "no plugin run_0_topk"}
    assert "run_0_baseline" not in frontier.verdicts(run, index, "run_0_baseline", knob_of)  # not against itself


def test_a_baseline_run_trained_at_another_lr_on_the_same_activations_leaves_its_sweep_judged():
    def trained(info, lr):
        info["provenance"]["config"].update(lr=lr, dict_size=64, batch_size=8, warmup_steps=0)
        return info
    run = {**trained(final_info(l0=math.sqrt(1000), ce=0.95), 1e-3), "activation_cache": "acts-1"}
    sweep = [indexed(trained(final_info(l0=10, penalty=1.0, ce=0.5), 1e-3), "run_0_baseline"),
             indexed(trained(final_info(l0=100, penalty=0.1, ce=0.9), 1e-3), "run_0_baseline")]
    stray = indexed(trained(final_info(l0=50, penalty=0.3, ce=0.2), 3e-4), "run_0_baseline")  # e.g. a calibration
    found = frontier.verdicts(run, [*sweep, stray], "run_1_mine", lambda plugin: "sparsity_penalty")
    assert found["run_0_baseline"]["points"] == 2
    assert found["run_0_baseline"]["metrics"]["ce_loss_score"]["baseline"] == pytest.approx(0.7)
    alone = frontier.verdicts(run, [stray], "run_1_mine", lambda plugin: "sparsity_penalty")
    assert alone["run_0_baseline"] == {
        "not_judged": "none of its runs was trained at this run's dict_size, batch_size, lr, warmup_steps"}


def test_a_baseline_run_at_another_of_its_plugins_settings_leaves_its_sweep_judged():
    def jumprelu(l0, coefficient, ce, **other):
        info = final_info(l0=l0, ce=ce)
        info["provenance"]["config"]["hyperparams"] = {"l0_coefficient": coefficient, **other}
        return indexed(info, "run_0_jumprelu")
    run = {**final_info(l0=math.sqrt(1000), ce=0.95), "activation_cache": "acts-1"}
    sweep = [jumprelu(100, 0.01, 0.9), jumprelu(10, 0.1, 0.5, target_l0=0.0)]  # the first saved before target_l0
    stray = jumprelu(32, 100.0, 0.99, target_l0=32.0)  # another objective, on the same activations
    defaults = {"l0_coefficient": 1.0, "target_l0": 0.0, "bandwidth": 0.05}
    found = frontier.verdicts(run, [*sweep, stray], "run_1_mine", lambda plugin: "l0_coefficient",
                              defaults_of=lambda plugin: defaults)
    assert found["run_0_jumprelu"].get("points") == 2, found
    assert found["run_0_jumprelu"]["knob"] == "l0_coefficient"
    assert found["run_0_jumprelu"]["metrics"]["ce_loss_score"]["baseline"] == pytest.approx(0.7)
    unfiltered = frontier.verdicts(run, [*sweep, stray], "run_1_mine", lambda plugin: "l0_coefficient")
    assert unfiltered["run_0_jumprelu"] == {"not_judged": "its runs vary more than one setting: no frontier of one knob"}
    alone = frontier.verdicts(run, [stray], "run_1_mine", lambda plugin: "l0_coefficient",
                              defaults_of=lambda plugin: defaults)
    assert alone["run_0_jumprelu"]["not_judged"].endswith("and its plugin's defaults")
    at_another_penalty = [jumprelu(20, 0.03, 0.6), jumprelu(100, 0.01, 0.9)]  # the second: sweep[0] again
    for _, _, info in at_another_penalty:  # at a setting JumpReLU does not read: its sweep, not a second seed
        info["provenance"]["config"]["sparsity_penalty"] = 7.0
    found = frontier.verdicts(run, [*sweep, *at_another_penalty], "run_1_mine", lambda plugin: "l0_coefficient",
                              defaults_of=lambda plugin: defaults)
    assert found["run_0_jumprelu"]["points"] == 3 and found["run_0_jumprelu"]["knob"] == "l0_coefficient"
    assert found["run_0_jumprelu"]["swept"] == [0.01, 0.1, 0.03]


def test_the_swept_knob_is_the_one_setting_that_varies_besides_the_seed():
    infos = [final_info(penalty=p) for p in (0.1, 0.2)]
    infos[1]["provenance"]["config"]["seed"] = 3
    assert frontier.swept_knob(infos, "k") == "sparsity_penalty"
    assert frontier.swept_knob([final_info(k=k) for k in (16, 32)], "sparsity_penalty") == "k"
    assert frontier.swept_knob([final_info(), final_info()], "k") == "k"  # nothing varies: the architecture's knob
    assert frontier.swept_knob([final_info(penalty=0.1, k=16), final_info(penalty=0.2, k=32)], "k") is None
    assert frontier.swept_knob([final_info(penalty=0.1, k=16), final_info(penalty=0.2, k=32)], "k",
                               unread=("sparsity_penalty",)) == "k"


def test_matched_says_each_baselines_word_on_one_metric():
    found = {"run_0_topk": {"metrics": {"ce_loss_score": {"word": "better"}, "kl_div_score": {"word": "worse"}}},
             "run_0_gated": {"not_judged": "its runs vary more than one setting"},
             "run_0_batchtopk": {"metrics": {"ce_loss_score": {"word": OUTSIDE}}},
             "run_0_jumprelu": {"metrics": {"ce_loss_score": {"word": "tied (no uncertainty)"}}}}
    assert matched(found) == ("run_0_topk: better; run_0_batchtopk: outside its sweep; "
                              "run_0_jumprelu: tied (no uncertainty)")
    assert matched(found, "kl_div_score") == "run_0_topk: worse"
    assert matched({}) == matched(found, "explained_variance") == "no baseline sweep on these activations"


# ---- the sanity guards: a run's warnings ----------------------------------------------------------

def logged(total, **extra):
    return {"l2_loss": 0.9 * total, "sparsity_loss": 0.1 * total, "total_loss": total, "dead_fraction": 0.0, **extra}


def flag(term: str, percent: str, steps: int) -> str:
    return (f"{term} is a median {percent}% of the gradient norm on the parameter entries it reaches ({steps} "
            "logged steps): it cannot change the model; raise its weight")


def test_an_extra_term_below_a_hundredth_of_the_gradient_norm_it_reaches_at_the_median_logged_step_is_flagged():
    log = [logged(10.0, early_loss=5.0, early_loss_grad_share=0.9, quiet_loss=1e-9, quiet_loss_grad_share=0.3),
           logged(5.0, early_loss=1.0, early_loss_grad_share=0.004, quiet_loss=1e-9, quiet_loss_grad_share=0.02),
           logged(2.0, early_loss=1.0, early_loss_grad_share=0.001, quiet_loss=1e-9, quiet_loss_grad_share=0.2)]
    log[0]["unmeasured_loss"] = 0.0  # a run logged before the shares were: nothing to judge it on
    assert frontier.inert_terms(log) == [flag("early_loss", "0.4", 3)]  # a tiny loss share is no verdict
    idle = [logged(2.0, aux_loss=v, aux_loss_grad_share=share) for v, share in ((0.0, 0.0), (0.0, 0.0), (3.0, 0.2))]
    assert frontier.inert_terms(idle) == ["aux_loss is a median 0% of the gradient norm on the parameter entries it "
                                          "reaches (3 logged steps): it was zero on 2 of them (a term that acts only "
                                          "when its condition holds, as AuxK on dead latents, acted on the rest)"]
    tiny_base = [{**logged(10.0), "sparsity_loss": 1e-9, "sparsity_loss_grad_share": 0.0}]
    assert frontier.inert_terms(tiny_base) == []  # the base terms are never judged


class Probe(experiment.SAE):
    """The plain SAE with three extra terms: one that acts at step 0 only, one that weighs a
    thousand in the loss with no gradient, and one that is 0 in the loss with a large gradient."""

    def aux_losses(self, fwd):
        return {"start_loss": (fwd.step == 0) * 10 * fwd.f.abs().sum(-1).mean(),
                "heavy_loss": 1e3 + 0 * self.W_dec.sum(),
                "pushing_loss": (self.W_dec - self.W_dec.detach()).sum()}


def test_the_trainer_logs_each_term_s_gradient_share_and_the_guard_flags_the_terms_that_do_not_act():
    cfg = experiment.build_config("tiny", "baseline/run_0_baseline", tokens=31 * 64, batch_size=64)
    torch.manual_seed(0)
    sae = Probe(16, 32, experiment.Hyperparams(), cfg)
    trainer, x, log = experiment.Trainer(sae, cfg), torch.randn(64, 16), []
    for step in range(cfg.steps):
        total, out = trainer.step(x, step)
        if runs.logged_step(step, cfg):
            log.append({**{k: float(v) for k, v in {**out.terms, **out.stats}.items()}, "total_loss": float(total)})
    assert [row["start_loss_grad_share"] > 0.1 for row in log] == [True, False, False, False]  # steps 0, 10, 20, 30
    assert all(row["heavy_loss_grad_share"] == 0 and row["pushing_loss_grad_share"] > 0.5 for row in log)
    assert [w.split(" is a median")[0] for w in frontier.inert_terms(log)] == ["start_loss", "heavy_loss"]
    assert "it was zero on 3 of" in frontier.inert_terms(log)[0]  # acted at step 0 alone


class DeadLatentProbe(experiment.SAE):
    """The plain SAE with a small term pulling one latent's decoder row alone, as AuxK pulls the
    dead latents' rows; the test keeps that latent from firing, so nothing else pulls it."""

    def aux_losses(self, fwd):
        return {"revive_loss": 1e-4 * self.W_dec[0].sum()}


def test_a_term_that_alone_moves_a_few_latents_is_measured_where_it_acts_and_not_called_inert():
    cfg = experiment.build_config("tiny", "baseline/run_0_baseline", tokens=31 * 64, batch_size=64)
    torch.manual_seed(0)
    sae = DeadLatentProbe(16, 32, experiment.Hyperparams(), cfg)
    with torch.no_grad():
        sae.b_enc[0] = -1e3  # latent 0 never fires: the reconstruction does not pull its row
    trainer, x, log = experiment.Trainer(sae, cfg), torch.randn(64, 16), []
    for step in range(cfg.steps):
        _, out = trainer.step(x, step)
        if runs.logged_step(step, cfg):
            log.append({k: float(v) for k, v in {**out.terms, **out.stats}.items()})
    assert [row["revive_loss_grad_share"] for row in log] == pytest.approx([1.0] * 4)  # all of that row's update
    assert frontier.inert_terms(log) == []


def test_topks_auxk_is_all_of_its_dead_latents_update_whatever_it_adds_to_the_shared_decoder_bias():
    plugin = experiment.find_plugin("baseline/run_0_topk")
    cfg = experiment.build_config("tiny", "baseline/run_0_topk", tokens=31 * 64, batch_size=64)
    torch.manual_seed(0)
    sae = plugin.module.SAE(16, 64, plugin.hyperparams_class(k=4, dead_steps=1), cfg)
    with torch.no_grad():
        sae.b_enc[:2] = -3.0  # two latents that never make the top 4: dead after a step
    trainer, x, log = plugin.module.Trainer(sae, cfg), torch.randn(64, 16), []  # it counts the dead
    for step in range(cfg.steps):
        _, out = trainer.step(x, step)
        if runs.logged_step(step, cfg) and "auxiliary_reconstruction_loss" in out.terms:
            log.append({k: float(v) for k, v in {**out.terms, **out.stats}.items()})
    assert len(log) == 3 and all(row["auxk_dead"] >= 2 for row in log)
    assert [row["auxiliary_reconstruction_loss_grad_share"] for row in log] == pytest.approx([1.0] * 3)
    assert frontier.inert_terms(log) == []


def test_a_run_under_its_models_verdict_budget_is_warned_that_its_verdicts_are_a_first_look():
    presets = experiment.PRESETS
    embedded = {k: presets["embedded"][k] for k in ("model", "layer", "dataset", "tokens")}
    assert frontier.short_budget(embedded, presets) == (  # 250k, under embedded-4m's 4M
        "trained on 250,000 tokens, under --preset embedded-4m's 4,000,000, where the baselines were measured to "
        "settle: its verdicts are a first look, not a verdict")
    assert frontier.short_budget({**embedded, "tokens": 4_000_000}, presets) is None
    assert frontier.short_budget({**embedded, "layer": 9}, presets) is None  # no budget measured there
    assert frontier.short_budget({**presets["tiny"], "tokens": 8}, presets) is None


def saved_run(folder: Path, W_dec: torch.Tensor, seed: int = 0) -> Path:
    """A run folder with what the decoder guard reads: config.json's seed and the plugin state."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    save_file({"W_dec": W_dec.contiguous()}, folder / "plugin_state.safetensors")
    return folder


def parent_entry(folder: Path, seed=0, dict_size=8, cache="acts-1", status="completed",
                 source="parent-source") -> tuple[Path, dict, dict]:
    return folder, {"study": "s", "plugin": "run_1_parent"}, {
        "status": status, "dict_size": dict_size, "activation_cache": cache,
        "provenance": {"seed": seed, "plugin_source_sha256": source}}


def test_a_decoder_within_float_noise_of_the_parents_newest_of_its_source_on_the_same_activations_and_seed_is_flagged(
        tmp_path):
    W = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    info = {"dict_size": 8, "activation_cache": "acts-1"}
    run = saved_run(tmp_path / "run", W * (1 + 2e-7))  # float rounding's size: flagged
    close, far = saved_run(tmp_path / "close", W), saved_run(tmp_path / "far", W * 1.0001)  # 1e-4: a change
    warning = frontier.unmoved_decoder(run, "run_1_parent", info, [parent_entry(close)], "parent-source")
    assert warning.startswith("the decoder ended 2") and warning.endswith(
        "e-07 (relative) from parent run_1_parent's on the same activations and seed, within float noise (1.2e-05): "
        "the change did not reach the model")
    assert frontier.unmoved_decoder(run, "run_1_parent", info, [parent_entry(far)], "parent-source") is None
    assert frontier.unmoved_decoder(run, "run_1_parent", info, [parent_entry(close), parent_entry(far)]) is None
    for other in (dict(seed=1), dict(dict_size=16), dict(cache="acts-2"), dict(status="failed"),
                  dict(source="an-older-parent")):
        assert frontier.unmoved_decoder(run, "run_1_parent", info, [parent_entry(close, **other)],
                                        "parent-source") is None, other
    assert frontier.unmoved_decoder(run, "run_2_other", info, [parent_entry(close)]) is None
    kept = tmp_path / "kept"  # a newer parent restored without its weights (scripts/keep_runs.py) is passed over
    kept.mkdir()
    assert frontier.unmoved_decoder(run, "run_1_parent", info, [parent_entry(close), parent_entry(kept)],
                                    "parent-source") == warning


def seed_entry(seed: int, ce: float, ev: float = 0.8, l0: float = 50.0, source="parent-source"):
    folder, who, info = parent_entry(Path(f"parent-{seed}"), seed=seed, source=source)
    info["metrics"] = {"model_performance_preservation": {"ce_loss_score": ce},
                       "reconstruction_quality": {"explained_variance_whole_set": ev}, "sparsity": {"l0": l0}}
    return folder, who, info


def test_a_run_within_its_parents_seed_to_seed_spread_on_every_headline_metric_has_no_measurable_effect():
    parents = [seed_entry(0, 0.90, 0.80, 50.0), seed_entry(1, 0.92, 0.82, 52.0), seed_entry(2, 0.91, 0.81, 51.0)]
    run = {"dict_size": 8, "activation_cache": "acts-1", **{k: v for k, v in seed_entry(9, 0.915, 0.805, 50.5)[2].items()
                                                            if k == "metrics"}}
    found = frontier.no_measurable_effect(run, "run_1_parent", parents, "parent-source")
    assert found == ("no measurable effect: every headline metric is within 2 seed-to-seed standard deviations of "
                     "parent run_1_parent's 3 seeds: CE-loss score 0.915 (parent 0.91 ± 0.01), explained variance "
                     "0.805 (parent 0.81 ± 0.01), L0 50.5 (parent 51 ± 1)")
    moved = {**run, "metrics": seed_entry(9, 0.95, 0.805, 50.5)[2]["metrics"]}  # CE 4 spreads above
    assert frontier.no_measurable_effect(moved, "run_1_parent", parents, "parent-source") is None
    assert frontier.no_measurable_effect(run, "run_1_parent", parents[:1], "parent-source") is None  # one seed
    stale = [seed_entry(0, 0.9, source="old"), seed_entry(1, 0.92, source="old")]
    assert frontier.no_measurable_effect(run, "run_1_parent", stale, "parent-source") is None
    again = [*parents, seed_entry(0, 0.95), seed_entry(1, 0.951), seed_entry(2, 0.952)]  # each seed's newest counts
    assert frontier.no_measurable_effect(run, "run_1_parent", again, "parent-source") is None


def test_on_ground_truth_no_measurable_effect_reads_mcc_f1_and_l0():
    def synthetic(seed, mcc, f1=0.5, l0=20.0):
        folder, who, info = seed_entry(seed, 0.0)
        info["metrics"] = {"ground_truth": {"mcc": mcc, "f1": f1}, "sparsity": {"l0": l0}}
        return folder, who, info
    parents = [synthetic(0, 0.70, 0.50, 20.0), synthetic(1, 0.72, 0.52, 21.0)]
    run = {"dict_size": 8, "activation_cache": "acts-1", "metrics": synthetic(9, 0.71, 0.51, 20.5)[2]["metrics"]}
    assert frontier.no_measurable_effect(run, "run_1_parent", parents, "parent-source").endswith(
        "MCC 0.71 (parent 0.71 ± 0.014), F1 0.51 (parent 0.51 ± 0.014), L0 20.5 (parent 20.5 ± 0.71)")
    run["metrics"]["ground_truth"]["mcc"] = 0.80
    assert frontier.no_measurable_effect(run, "run_1_parent", parents, "parent-source") is None


def test_the_parents_setting_is_its_defaults_with_what_the_child_set_on_fields_it_has():
    parent, child = {"ortho_weight": 0.1, "k": 64}, {"ortho_weight": 0.01, "k": 64, "tau": 0.2}  # the classes' defaults
    assert frontier.parent_hyperparams(child, child, parent) == parent  # a child's own default is its change
    assert frontier.parent_hyperparams({**child, "k": 32, "tau": 0.5}, child, parent) == {"ortho_weight": 0.1, "k": 32}


def test_only_the_parents_runs_at_the_childs_setting_count_as_its_seeds():
    def at(seed, penalty, mcc, l0, b_dec_init="geometric_median"):
        folder, who, info = seed_entry(seed, 0.0)
        info["provenance"]["config"] = {"seed": seed, "sparsity_penalty": penalty, "tokens": 4000, "log_every": 10,
                                        "hyperparams": {"b_dec_init": b_dec_init}}
        info["metrics"] = {"ground_truth": {"mcc": mcc, "f1": 0.45}, "sparsity": {"l0": l0}}
        return folder, who, info
    setting = {"b_dec_init": "geometric_median"}
    # a sweep's newest run of each seed: seed 42 at L1 3, seed 43 at L1 2 (their mean and spread fit anything)
    parents = [at(43, 2.0, 0.645, 16.1), at(42, 3.0, 0.535, 9.9)]
    child = at(44, 2.0, 0.639, 13.5)[2]
    assert frontier.no_measurable_effect(child, "run_1_parent", parents, "parent-source", setting) is None  # one seed
    parents.insert(0, at(42, 2.0, 0.643, 16.0))  # older than seed 42's L1 3 run, and at the child's setting
    assert frontier.no_measurable_effect(child, "run_1_parent", parents, "parent-source", setting) is None  # it moved
    child["metrics"] = {"ground_truth": {"mcc": 0.644, "f1": 0.45}, "sparsity": {"l0": 16.05}}
    child["provenance"]["config"]["log_every"] = 1  # logging is not a setting
    assert "parent run_1_parent's 2 seeds: MCC 0.644 (parent 0.644" in frontier.no_measurable_effect(
        child, "run_1_parent", parents, "parent-source", setting)
    assert frontier.no_measurable_effect(child, "run_1_parent", parents, "parent-source",
                                         {"b_dec_init": "zeros"}) is None  # the parent never ran at that setting


def test_every_suspicious_result_becomes_a_warning(tmp_path):
    run = tmp_path / "run"
    saved_run(run, torch.ones(8, 4))
    log = [logged(10.0, whisper_loss=0.0, whisper_loss_grad_share=0.0),
           {**logged(10.0, whisper_loss=0.0, whisper_loss_grad_share=0.0), "dead_fraction": 1.0}]
    (run / "train_log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log))
    metrics = {"sparsity": {"l0": 0},
               "reconstruction_quality": {"explained_variance": -0.5, "explained_variance_legacy": 0.1}}
    info = {"metrics": metrics, "dict_size": 8, "activation_cache": "acts-1"}
    parent = tmp_path / "parent"
    saved_run(parent, torch.ones(8, 4))
    entry = parent_entry(parent)
    index = [(entry[0], entry[1], {**entry[2], "metrics": metrics})]
    assert frontier.suspicious(info, run, "run_1_parent", index) == [
        "L0 is 0: no latent fires on the evaluation text",
        "every latent is dead at the end of training",
        "the training loss never moved",
        "explained_variance is negative (-0.5): worse than predicting the mean",
        "metrics identical to the last digit to parent run_1_parent's latest run: did the change reach the model?",
        flag("whisper_loss", "0", 2).replace("it cannot change the model; raise its weight",
                                             "it was zero on every one of them: it never acted"),
        "the decoder ended 0 (relative) from parent run_1_parent's on the same activations and seed, "
        "within float noise (1.2e-05): the change did not reach the model"]
    log[1].update(total_loss=8.0, dead_fraction=0.5, whisper_loss=1.0, whisper_loss_grad_share=1.0)
    (run / "train_log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in log))
    healthy = {"metrics": {"sparsity": {"l0": 12.0}}, "dict_size": 8, "activation_cache": "acts-1"}
    assert frontier.suspicious(healthy, run, None, index) == []
