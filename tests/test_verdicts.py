"""A verdict with its true noise: convergence read from the train log, a paired bootstrap over the
evaluation contexts the run and the baseline share, the seeds' spread (with Student's t, a borrowed
spread counted once), the chord's error on a bent frontier, one seed provisional, a run pooled
with its other seeds, and the baselines widened until they cover a study's runs; on
made-up runs (no model, no training). The calibration on tiny (an A/A test and a known-worse
change, lr ÷ 3) trains five runs: e2e."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import frontier
import studies
from frontier import build_frontiers, footing_of, matched, paired_se, seed_spread, verdict
from runs import CONVERGED_WITHIN, convergence


def log(values, l0=50.0, steps=100, every=10):
    """A train log whose reconstruction loss at step s is values(s)."""
    return [{"step": s, "l2_loss": values(s), "total_loss": values(s), "l0": l0}
            for s in [*range(0, steps, every), steps - 1]]


# ---- convergence ----------------------------------------------------------------------------------

def test_a_loss_still_falling_over_the_last_fifth_is_not_converged_and_a_flat_one_is():
    falling = convergence(log(lambda s: 10.0 - 0.02 * s))  # rows 80, 90, 99: 8.4 -> 8.02 around 8.2
    assert falling["l2_loss"] == pytest.approx(-0.02 * 19 / 8.2) and falling["converged"] is True
    steep = convergence(log(lambda s: 10.0 - 0.08 * s))
    assert steep["l2_loss"] < -CONVERGED_WITHIN and steep["converged"] is False
    assert steep["steps"] == [80, 99] and steep["rows"] == 3 and steep["threshold"] == CONVERGED_WITHIN


def test_one_outlier_batch_in_the_last_fifth_does_not_make_a_flat_run_look_moving():
    rows = log(lambda s: 2.0)
    rows[-2]["l2_loss"] = 400.0  # a batch of Gemma's huge-norm tokens
    assert convergence(rows)["l2_loss"] == 0 and convergence(rows)["converged"] is True


def test_a_scheduled_term_weight_that_raises_the_total_loss_does_not_make_a_settled_sae_look_moving():
    rows = log(lambda s: 2.0)
    for row in rows:
        row["total_loss"] = 2.0 + 0.05 * row["step"]  # a contrastive weight ramped up to the end
    assert convergence(rows)["converged"] is True


def test_convergence_is_unknown_with_too_few_rows_or_an_l0_of_zero():
    assert convergence(log(lambda s: 1.0, steps=8, every=10))["converged"] is None
    dead = convergence(log(lambda s: 1.0, l0=0.0))
    assert dead["l0"] is None and dead["converged"] is None


# ---- the paired bootstrap -------------------------------------------------------------------------

def ratio(rows):
    return rows[:, 0].sum() / rows[:, 1].sum()


def contexts(values, n_tokens=100):
    return np.stack([np.asarray(values) * n_tokens, np.full(len(values), n_tokens)], 1)


def test_pairing_removes_the_noise_the_run_and_the_baseline_share_through_their_contexts():
    hard = np.random.default_rng(0).normal(0, 0.1, 32)  # how hard each context is, for every SAE
    run, base = contexts(0.8 + hard), contexts(0.7 + hard + np.random.default_rng(1).normal(0, 0.005, 32))
    paired = paired_se(ratio, [(1.0, [run]), (-1.0, [base])])
    unpaired = math.hypot(frontier.bootstrap_se(run, ratio), frontier.bootstrap_se(base, ratio))
    assert paired < unpaired / 5
    assert paired_se(ratio, [(1.0, [run]), (-1.0, [run])]) == 0  # a run against itself: no noise at all
    assert paired == paired_se(ratio, [(1.0, [run]), (-1.0, [base])])  # seeded


def test_the_interpolated_baseline_is_resampled_through_the_same_weights():
    hard = np.random.default_rng(2).normal(0, 0.1, 32)
    a, b, run = contexts(0.6 + hard), contexts(0.8 + hard), contexts(0.7 + hard)
    assert paired_se(ratio, [(1.0, [run]), (-0.5, [a]), (-0.5, [b])]) == pytest.approx(0, abs=1e-12)
    assert paired_se(ratio, [(1.0, [run]), (-0.5, [a]), (-0.5, [contexts(0.8 - hard)])]) > 0.005


# ---- seeds, pairing and convergence in the verdict --------------------------------------------------

def judged_record(l0, knob, seed, value, hard, moved=0.01):
    """A record whose folder is its own name, with its per-context rows kept in ROWS."""
    folder = f"{knob}-{seed}-{value}"
    ROWS[folder] = {"ce_loss_score": contexts(value + hard)}
    return {"l0": l0, "metrics": {"ce_loss_score": value}, "knob": ("sparsity_penalty", knob), "seed": seed,
            "uncertainties": {}, "folder": folder,
            "convergence": {"converged": abs(moved) <= CONVERGED_WITHIN, "l2_loss": moved, "threshold": 0.1}}


ROWS: dict = {}
HARD = np.random.default_rng(3).normal(0, 0.05, 32)


def two_seed_baseline(moved=0.01):
    return build_frontiers([judged_record(10, 1.0, s, v, HARD, moved) for s, v in ((1, 0.50), (2, 0.52))]
                           + [judged_record(100, 0.1, s, v, HARD) for s, v in ((1, 0.90), (2, 0.88))])


def judge(run_records, frontiers):
    return verdict(frontier.pool_seeds(run_records), frontiers, rows_of=ROWS.get,
                   score_of=lambda name: ratio)["ce_loss_score"]


def test_a_verdict_of_two_seeds_pairs_its_contexts_and_adds_both_sides_seed_spread():
    got = judge([judged_record(math.sqrt(1000), 0.3, s, v, HARD) for s, v in ((5, 0.78), (6, 0.80))],
                two_seed_baseline())
    assert got["pairing"] == "paired over 32 evaluation contexts"
    assert set(got["uncertainty_parts"]) == {"contexts", "run_seeds", "baseline_seeds"}
    assert got["uncertainty_parts"]["run_seeds"] == pytest.approx(np.std([0.78, 0.80], ddof=1) / math.sqrt(2))
    spread = np.std([0.50, 0.52], ddof=1)  # either point's seeds (0.50, 0.52 and 0.90, 0.88): pooled, the same
    assert got["uncertainty_parts"]["baseline_seeds"] == pytest.approx(spread * math.sqrt(2 * 0.5 ** 2 / 2))
    assert got["uncertainty"] == pytest.approx(math.sqrt(sum(u * u for u in got["uncertainty_parts"].values())))
    assert got["word"] == "better" and got["seeds"] == {"run": [5, 6], "baseline": {"1.0": [1, 2], "0.1": [1, 2]}}
    assert footing_of(got) == "2 seeds v 2+2, paired over 32 evaluation contexts, converged"


def test_one_seed_borrows_the_baselines_seed_spread_and_is_provisional():
    got = judge([judged_record(math.sqrt(1000), 0.3, 5, 0.70, HARD)], two_seed_baseline())
    assert got["uncertainty_parts"]["run_seeds"] == pytest.approx(0.01 * math.sqrt(2))  # the baseline's spread
    assert got["word"] == "tied (one seed: provisional)"
    assert matched({"run_0_baseline": {"metrics": {"ce_loss_score": got}}}) == (
        "run_0_baseline: tied (one seed: provisional) (1 seed v 2+2, paired over 32 evaluation contexts, converged)")


def test_the_notebook_line_ends_with_what_the_verdict_stands_on():
    from notebook import verdict_lines

    got = judge([judged_record(math.sqrt(1000), 0.3, s, v, HARD) for s, v in ((5, 0.78), (6, 0.80))],
                two_seed_baseline())
    found = {"run_0_baseline": {"knob": "sparsity_penalty", "points": 4, "metrics": {"ce_loss_score": got}}}
    line = verdict_lines(found)
    assert line.startswith("Against run_0_baseline (sparsity_penalty, 4 runs) at this L0: ce_loss_score better (+")
    assert line.endswith(" [2 seeds v 2+2, paired over 32 evaluation contexts, converged]\n")


def test_a_baseline_point_still_moving_makes_the_verdict_not_converged_whatever_the_delta():
    got = judge([judged_record(math.sqrt(1000), 0.3, s, 0.95, HARD) for s in (5, 6)], two_seed_baseline(moved=-0.3))
    assert got["word"] == "not converged" and got["delta"] > 0.2
    assert got["convergence"] == {"run": True, "baseline": False, "threshold": CONVERGED_WITHIN}
    assert "baseline still moving beyond 10% over the last fifth" in footing_of(got)


def test_without_every_folders_contexts_the_verdict_says_it_is_unpaired():
    record = {**judged_record(math.sqrt(1000), 0.3, 5, 0.7, HARD), "folder": "nowhere"}
    assert judge([record], two_seed_baseline())["pairing"].startswith("unpaired: a run or baseline point has no per")


def test_a_synthetic_verdict_is_paired_by_its_shared_samples_and_its_noise_is_the_seeds_spread():
    def synth(l0, knob, seed, mcc):
        return {**judged_record(l0, knob, seed, mcc, HARD), "metrics": {"mcc": mcc}, "folder": None}
    baseline = build_frontiers([synth(10, 1.0, s, v) for s, v in ((1, 0.50), (2, 0.52))]
                               + [synth(100, 0.1, s, v) for s, v in ((1, 0.90), (2, 0.88))])
    got = verdict(frontier.pool_seeds([synth(math.sqrt(1000), 0.3, s, v) for s, v in ((5, 0.70), (6, 0.74))]),
                  baseline)["mcc"]
    assert got["pairing"] == "paired: the same ground-truth samples for every run"
    assert set(got["uncertainty_parts"]) == {"run_seeds", "baseline_seeds"}
    assert got["uncertainty_parts"]["run_seeds"] == pytest.approx(np.std([0.70, 0.74], ddof=1) / math.sqrt(2))
    assert got["word"] == "tied"
    alone = verdict(frontier.pool_seeds([synth(math.sqrt(1000), 0.3, 5, 0.80)]), build_frontiers(
        [synth(10, 1.0, 1, 0.5), synth(100, 0.1, 1, 0.9)]))["mcc"]
    assert alone["uncertainty"] is None and alone["word"] == "better (no uncertainty; one seed: provisional)"


def test_a_difference_measured_on_few_seeds_must_clear_students_t_not_two_standard_errors():
    """The A/A test on synth that called TopK's F1 worse than its own: Δ of 2.7 standard errors, the
    errors measured on two seeds a side (1 degree of freedom for the run, 3 pooled for the baseline)."""
    def synth(l0, seed, value):
        return {**judged_record(l0, l0, seed, value, HARD), "metrics": {"mcc": value}, "folder": None}
    baseline = build_frontiers([synth(8, 42, 0.4608), synth(8, 43, 0.4548), synth(16, 42, 0.5257),
                                synth(16, 43, 0.5228), synth(32, 42, 0.4124), synth(32, 43, 0.4128)])
    got = verdict(frontier.pool_seeds([synth(16, 44, 0.5170), synth(16, 45, 0.5099)]), baseline)["mcc"]
    assert 2 < abs(got["delta"]) / got["uncertainty"] < got["standard_errors_needed"]
    assert got["word"] == "tied" and 3 < got["standard_errors_needed"] < 13
    assert frontier.standard_errors_needed({"contexts": 0.01}, {}) == frontier.Z_BETTER  # a bootstrap's: known
    assert frontier.standard_errors_needed({"a": 0.01, "b": 0.01}, {"a": 1000, "b": 1000}) == frontier.Z_BETTER


def test_the_seed_spread_is_pooled_over_the_points_that_have_several_seeds():
    assert seed_spread([[1.0, 3.0], [5.0], [2.0, 2.0, 5.0]]) == {"sd": pytest.approx(math.sqrt((2 + 6) / 3)), "dof": 3}
    assert seed_spread([[1.0], [2.0]]) == {"sd": None, "dof": 0}


def test_a_runs_other_seeds_are_its_runs_of_the_same_code_and_config_on_the_same_activations():
    def info(seed, source="abc", lr=0.001, cache="acts", evals=("core",)):
        return {"status": "completed", "run": {"study": "s", "plugin": "run_1_x"}, "activation_cache": cache,
                "provenance": {"seed": seed, "plugin_source_sha256": source,
                               "config": {"seed": seed, "lr": lr, "device": "cpu", "evals": evals}}}
    mine = info(42)
    index = [(Path(str(i)), {}, other) for i, other in enumerate(
        [info(43), info(44, source="changed"), info(45, lr=0.01), info(46, cache="other"), info(42), info(47),
         info(48, evals=("core", "absorption"))])]  # evaluated with more: trained alike
    assert [other["provenance"]["seed"] for _, other in frontier.seeds_of(mine, index, Path("4"))] == [43, 47, 48]


# ---- coverage ------------------------------------------------------------------------------------------

def outside_row(l0, value, side, study="s", metric="ce_loss_score", swept=(16, 64)):
    """A run's row whose verdict against run_0_topk, judged on its sweep's knob values `swept`, is outside."""
    suggest = {"knob": "k", "value": value, "side": side, "text": "add"}
    return {"label": f"L0 {l0}", "info": {"run": {"study": study}, "activation_cache": "acts",
                                          "metrics": {"sparsity": {"l0": l0}},
                                          "verdict": {"run_0_topk": {"knob": "k", "swept": list(swept), "metrics": {
                                              metric: {"word": frontier.OUTSIDE, "suggest": suggest}}}}}}


def test_widening_asks_for_the_knob_of_the_furthest_run_on_each_side_up_to_the_cap():
    """On whatever metrics the runs are judged: a synthetic run's MCC as a language-model run's CE-loss score."""
    rows = [outside_row(400, 500, "above"), outside_row(600, 750, "above"), outside_row(4, 3, "below", metric="mcc"),
            outside_row(2, 99, "above", study="baseline")]  # a baseline's own row is not the study's to cover
    assert studies.widening(rows, cap=6) == {"run_0_topk": ("k", [3, 750])}
    assert studies.widening(rows, cap=3) == {"run_0_topk": ("k", [3])}
    assert studies.widening(rows, cap=1) == {}
    rows[1] = outside_row(600, 750, "above", swept=(16, 64, 750))  # judged on a sweep that has it already
    assert studies.widening(rows, cap=6) == {"run_0_topk": ("k", [3])}


def test_a_verdict_names_the_knob_values_its_baseline_sweep_was_judged_on():
    run = {"status": "completed", "activation_cache": "acts", "metrics": {"sparsity": {"l0": 40}},
           "provenance": {"seed": 1, "config": {"sparsity_penalty": 0.2, "hyperparams": {}}}}
    sweep = [(Path(f"k{k}"), {"study": "baseline", "plugin": "run_0_topk"},
              {"status": "completed", "activation_cache": "acts", "metrics": {"sparsity": {"l0": k}},
               "provenance": {"seed": 1, "config": {"hyperparams": {"k": k, **extra}}}})
             for k, extra in ((16, {}), (64, {}), (750, {"aux_loss_coefficient": 0.0}))]  # the last: a stray
    found = frontier.verdicts(run, sweep, "run_1_mine", lambda plugin: "k",
                              defaults_of=lambda plugin: {"k": 32, "aux_loss_coefficient": 1 / 32})
    assert found["run_0_topk"]["swept"] == [16, 64]


def test_a_study_on_a_preset_with_measured_baseline_sweeps_runs_those_first_at_two_seeds_or_more(tmp_path,
                                                                                                 monkeypatch):
    called = []
    monkeypatch.setattr(studies, "sweep", lambda plugin, grid, seeds, preset, *rest: called.append(
        (plugin.name, grid, seeds, preset)))

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop
    monkeypatch.setattr(studies, "run_jobs", stop)  # the study's own runs: not this test's business
    overrides = dict(tokens=None, dict_size=None, seed=42, device="cpu", evals=None)
    for preset, tokens, seeds, swept, measured_on in (
            ("synth", None, 1, 2, "synth"), ("synth", None, 3, 3, "synth"), ("tiny", None, 1, None, None),
            ("embedded", 4_000_000, 1, 2, "embedded-4m"),  # the same values under another name
            ("embedded-4m", 250_000, 1, None, None)):  # not the budget its sweeps were placed for
        called.clear()
        with pytest.raises(Stop):
            studies.study("topk_ortho", ["run_0_baseline"], preset, {**overrides, "tokens": tokens}, tmp_path / "runs",
                          tmp_path / "notes.md", tmp_path / "figures", seeds=seeds)
        grids = studies.BASELINE_SWEEPS.get(measured_on, {})
        assert called == [(plugin, [grid], swept, preset) for plugin, grid in grids.items()]
    assert len(studies.BASELINE_SWEEPS["synth"]) == len(studies.BASELINE_SWEEPS["embedded-4m"]) == 6 and called == []


def test_the_sweeps_manifest_keeps_the_seed_spread_measured_on_it(tmp_path):
    def row(penalty, seed, ce):
        return {"label": "x", "how": "trained", "folder": "f", "info": {
            "status": "completed", "metrics": {"sparsity": {"l0": 10},
                                               "model_performance_preservation": {"ce_loss_score": ce}},
            "provenance": {"seed": seed, "config": {"seed": seed, "sparsity_penalty": penalty, "hyperparams": {}}}}}
    rows = [row(0.1, 1, 0.7), row(0.1, 2, 0.72), row(0.2, 1, 0.6)]
    studies.write_manifest(tmp_path, {"plugin": "baseline/run_0_baseline"}, rows, studies.seed_spread(rows))
    kept = json.loads((tmp_path / "manifest.json").read_text())["seed_spread"]["ce_loss_score"]
    assert kept["sd"] == pytest.approx(np.std([0.7, 0.72], ddof=1)) and kept["dof"] == 1


# ---- calibration on tiny: the same plugin at other seeds is tied with itself, lr ÷ 3 is worse --------

# TopK at k 16: its L0 is exactly 16 on every seed, so each run meets the baseline on its sweep point;
# at lr 3e-3 (and at a third of it) over 192 steps its loss has settled (within CONVERGED_WITHIN over
# the last fifth); at a tenth of it the loss still falls by 11% there: "not converged", not "worse".
CALIBRATION = dict(tokens=49152, lr=3e-3)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """Records of run_0_topk (k 16) on tiny: the baseline at seeds 42, 43; the same plugin at seeds
    44, 45; and at seed 44 with a third of the learning rate."""
    from helpers import tiny_run

    root = tmp_path_factory.mktemp("calibration")

    def trained(name, seed, **overrides):
        out = root / name / str(seed)
        info = tiny_run("baseline/run_0_topk", out, root / "notes.md", hyperparams={"k": 16}, seed=seed,
                        **{**CALIBRATION, **overrides})
        return frontier._record(info, "k", out)
    return ([trained("baseline", s) for s in (42, 43)], [trained("same", s) for s in (44, 45)],
            [trained("slow", 44, lr=CALIBRATION["lr"] / 3)])


def judged_on_tiny(run_records, baseline_records):
    import evals
    from runs import load_context_rows

    return verdict(frontier.pool_seeds(run_records), build_frontiers(baseline_records), rows_of=load_context_rows,
                   score_of=evals.score_of)


@pytest.mark.e2e
def test_the_same_plugin_at_other_seeds_judged_against_itself_is_tied(calibration):
    baseline, same, _ = calibration
    got = judged_on_tiny(same, baseline)
    assert {entry["convergence"]["run"] for entry in got.values()} == {True}, [r["convergence"] for r in same]
    assert {name: entry["word"] for name, entry in got.items()} == {name: "tied" for name in got}, got
    assert {entry["pairing"] for entry in got.values()} == {"paired over 16 evaluation contexts"}


@pytest.mark.e2e
def test_a_third_of_the_learning_rate_is_called_worse(calibration):
    baseline, _, slow = calibration
    got = judged_on_tiny(slow, baseline)
    assert got["explained_variance"]["convergence"]["run"] is True  # worse for its learning rate, not unfinished
    for name in ("explained_variance", "kl_div_score"):  # tiny's random model leaves the CE-loss score too noisy
        assert got[name]["word"] == "worse (one seed: provisional)", got[name]


# ---- the rules' own errors: few seeds unpaired, a borrowed spread, a bent frontier -----------------

def plain(l0, seed, value, se=None, converged=True):
    """A record without per-context rows: the verdict is unpaired."""
    return {"l0": l0, "metrics": {"ce_loss_score": value}, "knob": ("k", l0), "seed": seed,
            "uncertainties": {"ce_loss_score": se} if se else {}, "convergence": {"converged": converged}}


def test_an_unpaired_difference_measured_on_two_seeds_a_side_must_clear_students_t():
    baseline = build_frontiers([plain(16, s, v) for s, v in enumerate((0.90, 0.92))]
                               + [plain(64, s, v) for s, v in enumerate((0.95, 0.97))])
    got = verdict(frontier.pool_seeds([plain(32, 0, 0.955), plain(32, 1, 0.965)]), baseline)["ce_loss_score"]
    assert got["pairing"].startswith("unpaired") and 2 < got["delta"] / got["uncertainty"] < 2.5
    assert got["standard_errors_needed"] > 4 and got["word"] == "tied"  # Student's t at the seeds' few dof, not 2


def test_a_seed_spread_borrowed_from_the_baseline_counts_its_degrees_of_freedom_once():
    got = judge([judged_record(math.sqrt(1000), 0.3, 5, 0.70, HARD)], two_seed_baseline())
    from scipy.stats import t

    pooled_over_two_points = 2  # one degree of freedom at each swept point
    assert got["standard_errors_needed"] == pytest.approx(t.ppf(0.975, pooled_over_two_points), rel=0.05)


def bent(l0):
    """Concave in log L0, as the CE-loss score is."""
    return 1 - l0 ** -0.5


def test_a_bent_frontier_widens_the_verdict_by_the_chords_error():
    baseline = build_frontiers([plain(l0, 0, bent(l0), se=0.002) for l0 in (16, 64, 256)])
    got = verdict(frontier.pool_seeds([plain(32, 0, bent(32), se=0.002)]), baseline)["ce_loss_score"]
    assert got["delta"] > 0.01  # the chord lies under the curve: the run sits exactly on it
    assert got["uncertainty_parts"]["interpolation"] == pytest.approx(0.0078, abs=1e-4)
    assert got["word"] == "tied (one seed: provisional)"
    assert (got["suggest"]["value"], got["suggest"]["side"]) == (32, "between")  # the knob that would decide it
    on_a_point = verdict(frontier.pool_seeds([plain(64, 0, bent(64), se=0.002)]), baseline)["ce_loss_score"]
    assert "interpolation" not in on_a_point["uncertainty_parts"] and on_a_point["suggest"] is None
    noisy = verdict(frontier.pool_seeds([plain(32, 0, bent(32), se=0.02)]), baseline)["ce_loss_score"]
    assert noisy["word"].startswith("tied") and noisy["suggest"] is None  # the run's own noise decides: no gap to fill
    unmeasured = verdict(frontier.pool_seeds([plain(32, 0, bent(32))]), build_frontiers(
        [plain(l0, 0, bent(l0)) for l0 in (16, 64, 256)]))["ce_loss_score"]  # one seed a side, no bootstrap
    assert unmeasured["uncertainty"] is None and "(no uncertainty" in unmeasured["word"]


def test_a_tie_the_chord_decides_names_the_knob_to_add_in_the_notebook_and_study_adds_it():
    from notebook import verdict_lines

    baseline = build_frontiers([plain(l0, 0, bent(l0), se=0.002) for l0 in (16, 64, 256)])
    got = verdict(frontier.pool_seeds([plain(32, 0, bent(32), se=0.002)]), baseline)["ce_loss_score"]
    line = verdict_lines({"run_0_topk": {"knob": "k", "points": 3, "metrics": {"ce_loss_score": got}}})
    assert line.rstrip().endswith("; to decide it, add k=32 (the sweep bends between k=16 and 64: its chord may be "
                                  "off by 0.0078 at this L0)")
    tied = {"label": "L0 32", "info": {"run": {"study": "s"}, "metrics": {"sparsity": {"l0": 32}}, "verdict": {
        "run_0_topk": {"knob": "k", "swept": [16, 64, 256], "metrics": {"ce_loss_score": got}}}}}
    rows = [tied, outside_row(600, 750, "above", swept=(16, 64, 256))]
    assert studies.widening(rows, cap=5) == {"run_0_topk": ("k", [750, 32])}  # the sweep's ends first
    assert studies.widening(rows, cap=4) == {"run_0_topk": ("k", [750])}
    assert studies.widening(rows, cap=4, tried={("run_0_topk", "750")}) == {"run_0_topk": ("k", [32])}  # it failed


def test_a_gap_whose_middle_rounds_onto_or_past_an_end_asks_for_nothing():
    def fill(a, b):
        return frontier.fill_knob("k", {"between": [a, b]}, {"interpolation": 0.01})
    assert fill(125, 128) is None and fill(1, 2) is None and fill(0.0101, 0.0104) is None and fill(0, 8) is None
    assert fill(2, 4)["value"] == 3 and fill(16, 64)["value"] == 32 and fill(0.3, 1.0)["value"] == 0.55


def test_a_single_unpooled_record_still_moving_is_not_converged():
    baseline = build_frontiers([plain(16, 0, 0.90, se=0.001), plain(64, 0, 0.95, se=0.001)])
    assert verdict(plain(32, 0, 0.99, se=0.001, converged=False), baseline)["ce_loss_score"]["word"] == "not converged"


def test_two_seeds_of_which_one_lacks_the_metric_are_one_seed_provisional():
    baseline = build_frontiers([plain(16, 0, 0.90, se=0.001), plain(64, 0, 0.95, se=0.001)])
    run = frontier.pool_seeds([plain(32, 0, 0.99, se=0.001), plain(32, 1, float("nan"))])
    assert verdict(run, baseline)["ce_loss_score"]["word"].endswith("(one seed: provisional)")


def test_a_seed_lacking_the_metric_is_neither_counted_in_the_footing_nor_read_for_pairing():
    lacking = {**judged_record(math.sqrt(1000), 0.3, 6, 0.8, HARD, moved=0.5), "metrics": {"ce_loss_score": None},
               "folder": "a-seed-without-rows"}  # still moving, too: not this metric's seed
    got = judge([judged_record(math.sqrt(1000), 0.3, 5, 0.70, HARD), lacking], two_seed_baseline())
    assert got["seeds"]["run"] == [5] and got["pairing"] == "paired over 32 evaluation contexts"
    assert footing_of(got) == "1 seed v 2+2, paired over 32 evaluation contexts, converged"
    points = [judged_record(10, 1.0, 1, 0.50, HARD), {**judged_record(10, 1.0, 2, 0.5, HARD), "folder": "none",
                                                      "metrics": {"ce_loss_score": None}},
              *(judged_record(100, 0.1, s, v, HARD) for s, v in ((1, 0.90), (2, 0.88)))]
    got = judge([judged_record(math.sqrt(1000), 0.3, 5, 0.70, HARD)], build_frontiers(points))
    assert got["seeds"]["baseline"] == {"1.0": [1], "0.1": [1, 2]} and got["pairing"].startswith("paired")


def test_the_chords_error_takes_the_larger_of_the_parabolas_through_either_neighbour_so_it_does_not_jump():
    points = build_frontiers([plain(l0, 0, bent(l0), se=0.002) for l0 in (4, 16, 64, 256)])["ce_loss_score"]["points"]
    mid = 32.0  # halfway between 16 and 64 in log L0, where the nearer neighbour changes sides
    below, above = (frontier.interpolate({"points": points}, mid * f)["chord_error"] for f in (0.999, 1.001))
    assert below == pytest.approx(above, rel=0.01)
    one_side = frontier.interpolate({"points": points[1:]}, mid)["chord_error"]  # 16, 64 and 256 only
    other_side = frontier.interpolate({"points": points[:3]}, mid)["chord_error"]  # 4, 16 and 64 only
    assert one_side != pytest.approx(other_side, rel=0.05)
    assert frontier.interpolate({"points": points}, mid)["chord_error"] == pytest.approx(max(one_side, other_side))


def test_per_context_rows_without_the_metric_make_the_verdict_unpaired_not_a_crash():
    record = {**judged_record(math.sqrt(1000), 0.3, 5, 0.7, HARD), "folder": "rows-of-another-metric"}
    ROWS["rows-of-another-metric"] = {"kl_div_score": contexts(0.7 + HARD)}
    assert judge([record], two_seed_baseline())["pairing"] == (
        "unpaired: a run or baseline point has no per-context rows of ce_loss_score (saved before they were kept)")
