"""The study-level analyses (analyses.py, `python experiment.py analyse STUDY [NAME]`): each trains
what it needs through the study and sweep machinery, writes its figure and notes its paragraph
once, and its numbers are the ones a direct computation on the run folders gives."""

import functools
import json
import math
import random
import re

import numpy as np
import pytest
import scipy.stats
import torch
from helpers import cli, fake_load_dataset, text
from safetensors.numpy import load_file

import analyses
import evals
import experiment
import studies
import sources

TINY = ["--preset", "tiny", "--tokens", "2048"]


def second_seed(tmp_path, study: str, plugin: str) -> dict:
    """{plugin: its seed-43 run folder} for the baseline and `plugin`, trained as the analysis's
    runs (the command's seed 42) are: the analysis then reads both seeds."""
    seed_43 = analyses.Setting(study, "tiny", dict(tokens=2048, dict_size=None, seed=43, device="auto", evals=None),
                               tmp_path / "runs", tmp_path / "notes.md", (plugin,))
    return {run.plugin: run.folder for run in analyses.study_runs(seed_43)[0]}


def pooled_sd(pairs: list[tuple[float, float]]) -> float:
    """The seed-to-seed standard deviation of two seeds each, pooled: √(Σ (a − b)²/2 / n)."""
    return math.sqrt(sum((a - b) ** 2 / 2 for a, b in pairs) / len(pairs))


def analyse(tmp_path, *args: str):
    """The command on tiny into tmp_path; its Findings again through the API (every run reused)."""
    runs, notes, figures = tmp_path / "runs", tmp_path / "notes.md", tmp_path / "figures"
    result = cli("analyse", *args, *TINY, "--runs", str(runs), "--notes", str(notes), "--figures", str(figures))
    assert result.exit_code == 0, result.output
    study, name = args[0], (args[1] if len(args) > 1 and not args[1].startswith("--") else None)
    only = next((a.split("=", 1)[1] for a in args if a.startswith("--only=")), "")
    values = next((a.split("=", 1)[1] for a in args if a.startswith("--values=")), "")
    notes_before = notes.read_text()
    overrides = dict(tokens=2048, dict_size=None, seed=42, device="auto", evals=None)  # as the command's
    setting = analyses.Setting(study, "tiny", overrides, runs, notes, experiment.split(only), experiment.split(values))
    found = analyses.run_analyses(study, name, setting, figures)
    assert notes.read_text() == notes_before  # the same analysis of the same runs is noted once
    rebuilt = studies.rebuild_notebook(runs, study)  # `notes --replace` keeps the paragraphs
    for path in found:
        assert path.parent == figures / study and path.stat().st_size > 10_000
        assert notes_before.count(f"## Analysis: {study} {path.stem.removeprefix('analysis_')}\n") == 1
        kept = (runs / study / experiment.ANALYSES_FOLDER / f"{path.stem.removeprefix('analysis_')}.md").read_text()
        assert kept in notes_before and kept in rebuilt
    return result.output, {path.stem.removeprefix("analysis_"): finding for path, finding in found.items()}


# ---- the measurements, against the formulas computed another way ------------------------------

def test_max_abs_cosine_is_each_rows_largest_overlap_with_another_in_any_block_size():
    decoder = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) * torch.rand(50, 1)
    unit = decoder.numpy() / np.linalg.norm(decoder.numpy(), axis=1, keepdims=True)
    cos = np.abs(unit @ unit.T)
    np.fill_diagonal(cos, -1)
    for chunk in (7, 1024):
        np.testing.assert_allclose(analyses.max_abs_cosine(decoder, chunk), cos.max(1), rtol=1e-6)


def test_the_dictionary_s_mean_overlap_is_over_every_pair_in_any_block_size_and_random_rows_give_its_reference():
    w = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    unit = torch.nn.functional.normalize(w.double(), dim=1)
    cos = (unit @ unit.T).abs()
    brute = (cos.sum() - cos.trace()).item() / (50 * 49)
    assert all(analyses.mean_abs_cosine(w, chunk) == pytest.approx(brute, rel=1e-12) for chunk in (7, 50, 1024))
    assert analyses.random_mean_abs_cosine(2) == pytest.approx(2 / math.pi)
    rows = analyses.random_unit_rows(4000, 64, seed=1)
    assert analyses.mean_abs_cosine(rows) == pytest.approx(analyses.random_mean_abs_cosine(64), rel=0.01)


def test_group_condition_numbers_are_numpys_per_group_with_empty_and_degenerate_groups_said():
    decoder = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    decoder[11] = decoder[10] * 2  # group 3: two parallel rows
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 3, 3])
    kappas = analyses.group_condition_numbers(decoder, groups, 4)
    for g in (0, 1):
        assert kappas[g] == pytest.approx(np.linalg.cond(decoder[groups == g].double().numpy()), rel=1e-9)
    assert kappas[2] is None and (kappas[3] == math.inf or kappas[3] > 1e6)


def test_jl_cosine_errors_compare_the_plugins_projection_with_the_exact_cosine():
    found = experiment.find_plugin("contrastive/run_1_jl_ema")
    cfg = experiment.build_config("tiny", "contrastive/run_1_jl_ema")
    torch.manual_seed(0)
    sae = found.sae_class(64, 40, found.hyperparams_class(jl_dim=16, jl_check_latents=8), cfg)  # 16 of 64 dims
    w = sae.decoder_weight().detach().double().numpy()
    p = w @ sae.jl.double().numpy()
    exact = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    approx = (p / np.linalg.norm(p, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    i, j = np.triu_indices(40, 1)
    errors = analyses.jl_cosine_errors(sae)
    np.testing.assert_allclose(errors, np.abs(approx - exact)[i, j], atol=1e-6)
    assert errors.mean() > 0.05  # 16 dimensions cannot keep 64-d cosines: the error is real


def test_the_log_frequency_histogram_bins_the_fired_latents_and_counts_the_silent_apart():
    density = np.array([0.0, 1.0, 0.5, 0.01, 0.0, 0.001, 0.02])
    edges = np.linspace(-3, 0, 4)
    counts, silent = analyses.log_frequency_histogram(density, edges)
    assert silent == 2 and counts.tolist() == [1, 2, 2]  # [-3,-2) [-2,-1) [-1,0]


def test_a_baseline_s_curve_pools_its_seeds_per_knob_value_and_a_run_is_read_against_it_at_its_l0():
    def info(penalty, seed, l0, value):
        return {"status": "completed", "provenance": {"config": {"sparsity_penalty": penalty}, "seed": seed},
                "metrics": {"sparsity": {"l0": l0}},
                "evals": {"absorption_first_letter": {"eval_result_metrics": {"mean": {
                    "mean_absorption_fraction_score": value}}}}}
    points = [info(0.1, 42, 31, 0.39), info(0.1, 43, 29, 0.41), info(1, 42, 11, 0.21), info(1, 43, 9, 0.19)]
    curve = analyses.baseline_curve(points, "sparsity_penalty", analyses.ABSORPTION)
    assert curve["l0"] == [10, 30] and curve["value"] == pytest.approx([0.2, 0.4]) and curve["seeds"] == [2, 2]
    assert curve["seed_values"] == [[0.21, 0.19], [0.39, 0.41]]
    assert curve["knob"] == [1, 0.1] and curve["spread"]["dof"] == 2
    assert curve["spread"]["sd"] == pytest.approx(math.sqrt(4 * 0.01 ** 2 / 2))
    newer = analyses.baseline_curve([*points, info(1, 43, 9, 0.23)], "sparsity_penalty", analyses.ABSORPTION)
    assert newer["seeds"] == [2, 2] and newer["value"][0] == pytest.approx(0.22)  # a seed run again: its newest
    w = math.log(2) / math.log(3)  # L0 20 between 10 and 30, linear in log L0, as the verdicts interpolate
    sd, base = curve["spread"]["sd"], math.sqrt(((1 - w) ** 2 + w ** 2) / 2)  # over the weighted two seed means
    noise = sd * math.sqrt(1 + base ** 2)  # one run seed: the baseline's spread stands for the run's too
    needed = scipy.stats.t.ppf(0.975, 2)  # one spread on 2 degrees of freedom: t, not 2
    at_20 = 0.2 + 0.2 * w
    higher = analyses.against_curve(20, [at_20 + 1.01 * needed * noise], curve)
    assert higher["at"] == pytest.approx(at_20) and higher["delta"] == pytest.approx(1.01 * needed * noise)
    assert higher["noise"] == pytest.approx(noise) and higher["needed"] == pytest.approx(needed)
    assert higher["word"] == "higher"
    assert analyses.against_curve(20, [at_20 + 0.99 * needed * noise], curve)["word"] == "within noise"
    assert analyses.against_curve(20, [at_20 - 1.01 * needed * noise], curve)["word"] == "lower"
    assert analyses.against_curve(31, [0.4], curve) == {"word": "outside its sweep"}
    assert analyses.against_curve(30, [0.4], curve)["word"] == "within noise"  # an end of the sweep is inside it
    assert analyses.against_curve(30, [0.4], curve)["noise"] == pytest.approx(sd * math.sqrt(1 + 1 / 2))  # on a point
    spread = 0.05  # two run seeds at mean ± spread/√2: their own sd is `spread`, on 1 degree of freedom
    two = analyses.against_curve(20, [at_20 + 0.5 - spread / math.sqrt(2), at_20 + 0.5 + spread / math.sqrt(2)], curve)
    own, baseline = spread / math.sqrt(2), sd * base  # the standard errors of the two sides' means
    welch = (own ** 2 + baseline ** 2) ** 2 / (own ** 4 / 1 + baseline ** 4 / 2)
    assert two["delta"] == pytest.approx(0.5) and two["noise"] == pytest.approx(math.hypot(own, baseline))
    assert two["needed"] == pytest.approx(scipy.stats.t.ppf(0.975, welch)) and two["word"] == "higher"
    l0, value, values, unread = analyses.seeds_mean(points[:2], analyses.ABSORPTION)
    assert (l0, value, values, unread) == (30, pytest.approx(0.4), [0.39, 0.41], [])
    not_scored = {**points[1], "evals": {"absorption_first_letter": {"not_scored": "3 of 26 letters"}}}
    no_l0 = {**points[1], "metrics": {}}
    assert analyses.seeds_mean([points[0], not_scored], analyses.ABSORPTION)[1:] == (
        None, [0.39, None], ["seed 43 not scored: 3 of 26 letters"])
    assert analyses.seeds_mean([no_l0, points[0]], analyses.ABSORPTION)[3] == ["seed 43 has no L0"]
    one_seed = analyses.baseline_curve(points[::2], "sparsity_penalty", analyses.ABSORPTION)
    assert analyses.against_curve(20, [0.5], one_seed)["word"] == "no seed spread"
    one_value = analyses.baseline_curve(points[2:], "sparsity_penalty", analyses.ABSORPTION)
    assert analyses.against_curve(10, [0.2], one_value) == {"word": "one knob value only"}
    assert analyses.against_curve(10, [0.2], analyses.baseline_curve([], "k", analyses.ABSORPTION)) == {
        "word": "no baseline runs"}


@pytest.mark.e2e
def test_absorption_scores_each_run_and_baseline_point_once_and_reads_the_runs_against_the_sweeps(
        tmp_path, monkeypatch):
    runs, notes = tmp_path / "runs", tmp_path / "notes.md"
    overrides = dict(tokens=32768, dict_size=None, seed=42, device="cpu", evals=None)
    for plugin, grid in (("run_0_baseline", "sparsity_penalty=0.001,0.04,1"), ("run_0_topk", "k=1,200")):
        studies.sweep_runs(experiment.find_plugin(plugin), [grid], 2, "tiny", dict(overrides), runs, notes)
    scored = []

    def rescore(folder, eval_names, device, notes, eval_loaders=None, wait=False, unless=None,
                loaded_models=None):  # absorption on
        info = json.loads((folder / "final_info.json").read_text())  # tiny reads no letters: a known function
        l0, seed = info["metrics"]["sparsity"]["l0"], info["provenance"]["seed"]
        value = 0.5 - 0.1 * math.log10(l0) + 0.01 * (seed - 42) + 0.3 * (info["run"]["study"] != "baseline")
        info.setdefault("evals", {})["absorption_first_letter"] = {"eval_result_metrics": {"mean": {
            "mean_absorption_fraction_score": value}}, "eval_config": {"random_seed": evals.EVAL_SEED}}
        (folder / "final_info.json").write_text(json.dumps(info))
        scored.append((folder, eval_names, wait))
        assert loaded_models is setting.models  # one model for every re-scoring of the analysis
        return info
    monkeypatch.setattr(studies, "rescore", rescore)
    monkeypatch.setattr(evals, "check_requirements", lambda *args, **kwargs: None)
    analyses.study_runs(analyses.Setting("topk_ortho", "tiny", {**overrides, "seed": 43}, runs, notes,
                                         ("topk_ortho/run_1_topk_pairs",)))  # the run's second seed
    setting = analyses.Setting("topk_ortho", "tiny", overrides, runs, notes, ("topk_ortho/run_1_topk_pairs",))
    finding = analyses.run_analyses("topk_ortho", "absorption", setting, tmp_path / "figures")
    (found,) = finding.values()
    assert len(scored) == 2 + 10 and all(e == "absorption" and wait for _, e, wait in scored)  # its 2 seeds, (3 + 2) × 2
    again = analyses.Setting("topk_ortho", "tiny", overrides, runs, notes, ("topk_ortho/run_1_topk_pairs",))
    analyses.run_analyses("topk_ortho", "absorption", again, tmp_path / "figures")
    assert len(scored) == 12  # scored once: a second reading evaluates nothing
    other_instrument = json.loads((scored[1][0] / "final_info.json").read_text())
    other_instrument["evals"]["absorption_first_letter"]["eval_config"]["random_seed"] = 43  # its training seed's probe
    (scored[1][0] / "final_info.json").write_text(json.dumps(other_instrument))
    setting = analyses.Setting("topk_ortho", "tiny", overrides, runs, notes, ("topk_ortho/run_1_topk_pairs",))
    analyses.run_analyses("topk_ortho", "absorption", setting, tmp_path / "figures")
    assert len(scored) == 13 and scored[-1][0] == scored[1][0]  # scored again, with the one instrument
    run = found.data["run_1_topk_pairs"]
    l0s = [json.loads((folder / "final_info.json").read_text())["metrics"]["sparsity"]["l0"]
           for folder, _, _ in scored[:2]]
    assert run["l0"] == pytest.approx(np.mean(l0s)) and len(run["seed_values"]) == 2
    assert run["value"] == pytest.approx(np.mean([0.8 - 0.1 * math.log10(l0) for l0 in l0s]) + 0.005)  # seeds 42, 43
    for name, curve in found.data["curves"].items():
        settings = {}  # its runs' scores by setting, read from their folders
        for path in runs.glob(f"sweeps/{name}-*/*/final_info.json"):
            info = json.loads(path.read_text())
            settings.setdefault(path.parent.name.split(",seed=")[0], []).append(
                info["evals"]["absorption_first_letter"]["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"])
        squares = sum((a - b) ** 2 / 2 for a, b in settings.values())  # two seeds a setting: one dof each
        assert set(curve["seeds"]) == {2} and curve["spread"]["sd"] == pytest.approx(math.sqrt(squares / len(settings)))
        versus = run["versus"][name]
        if curve["l0"][0] <= run["l0"] <= curve["l0"][-1]:
            at = np.interp(math.log(run["l0"]), np.log(curve["l0"]), curve["value"])
            assert versus["word"] == "higher" and versus["at"] == pytest.approx(at)
        else:
            assert versus == {"word": "outside its sweep"}
    assert any("at" in run["versus"][name] for name in analyses.AGAINST), (run, found.data["curves"])  # chosen to cover it


def test_absorption_without_the_baselines_swept_on_these_activations_is_passed_over_before_any_evaluation(
        tmp_path, monkeypatch):
    monkeypatch.setattr(evals, "check_requirements", lambda *args, **kwargs: None)
    monkeypatch.setattr(studies, "rescore", lambda *args, **kwargs: pytest.fail("evaluated"))
    setting = analyses.Setting("topk_ortho", "tiny", dict(tokens=2048, seed=42, device="cpu"), tmp_path / "runs",
                               tmp_path / "notes.md", ("topk_ortho/run_1_topk_pairs",))
    with pytest.raises(analyses.Unavailable, match="neither run_0_baseline nor run_0_topk is swept on these "
                                                   "activations .*study topk_ortho` at this preset first"):
        analyses.absorption(setting)  # its run and the preset's baseline: one knob value


def test_absorption_where_it_cannot_run_is_passed_over_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("work started"))
    setting = analyses.Setting("freq_order", "tiny", dict(tokens=2048, seed=42, device="cpu"), tmp_path / "runs",
                               tmp_path / "notes.md")
    with pytest.raises(analyses.Unavailable, match="absorption cannot run on tiny: .*the tiny model has no tokenizer"):
        analyses.absorption(setting)


@pytest.mark.e2e
def test_a_revival_is_recorded_with_the_step_and_the_new_rows_overlap_at_revival():
    found = experiment.find_plugin("zscore_ortho/run_1_initial")
    cfg = experiment.build_config("tiny", "zscore_ortho/run_1_initial", tokens=256 * 100)  # period: 10 steps
    torch.manual_seed(0)
    sae = found.sae_class(64, 128, found.hyperparams_class(max_revive=128), cfg)
    trainer = found.trainer_class(sae, cfg)
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # latents 0-7 never fire
    before, at_revival, revive = {}, {}, trainer.revive

    def watched(x, step, period):
        before[step] = sae.W_dec.detach().clone()
        revive(x, step, period)
        at_revival[step] = sae.W_dec.detach().clone()
    trainer.revive = watched
    for step in range(11):
        trainer.step(torch.randn(256, 64, generator=torch.Generator().manual_seed(step)) * 3 + 1, step)
    record = sae.artifacts()
    revived = (record["revived_at"] >= 0).nonzero().squeeze(-1)
    assert set(range(8)) <= set(revived.tolist()) and (record["revived_at"][revived] == 10).all()
    assert list(before) == [10] and (record["revived_at"] >= 0).sum() < 128  # not every latent
    expected = analyses.max_abs_cosine(at_revival[10])[revived.numpy()]  # the new direction, not the dead row
    np.testing.assert_allclose(record["revived_max_cos"][revived].numpy(), expected, rtol=1e-5)
    assert not np.allclose(analyses.max_abs_cosine(before[10])[revived.numpy()], expected, rtol=1e-2)


# ---- each analysis on tiny, end to end ---------------------------------------------------------

@pytest.mark.e2e
def test_contrastive_sparsity_and_jl_error_read_the_held_out_evaluation_and_the_saved_sae(tmp_path):
    seed_43 = second_seed(tmp_path, "contrastive", "run_1_jl_ema")
    _, found = analyse(tmp_path, "contrastive", "--only=run_1_jl_ema")
    assert set(found) == {"sparsity", "jl_error"}
    sparsity = found["sparsity"].data
    assert {k for k in sparsity if k != "edges"} == {"run_0_baseline", "run_1_jl_ema"}
    for plugin in ("run_0_baseline", "run_1_jl_ema"):
        folder = sparsity[plugin]["folder"]
        density = np.asarray(json.loads((folder / "feature_metrics.json").read_text())["feature_density"])
        l0 = json.loads((folder / "final_info.json").read_text())["metrics"]["sparsity"]["l0"]
        assert density.sum() == pytest.approx(l0, rel=1e-5)  # a firing frequency per latent on held-out text
        counts, _ = np.histogram(np.log10(density[density > 0]), bins=sparsity["edges"])
        assert sparsity[plugin]["counts"].tolist() == counts.tolist()
        assert counts.sum() + sparsity[plugin]["silent"] == 256
    densities = {plugin: [np.asarray(json.loads((folder / "feature_metrics.json").read_text())["feature_density"])
                          for folder in (sparsity[plugin]["folder"], seed_43[plugin])] for plugin in seed_43}
    silent = [tuple((d == 0).sum() for d in pair) for pair in densities.values()]
    median = [tuple(np.median(d[d > 0]) for d in pair) for pair in densities.values()]
    body = found["sparsity"].body
    assert "Reference: the baseline (no contrastive mechanism)" in body
    assert (f"never fired {analyses.fmt(pooled_sd(silent))} (2 dof); median frequency "
            f"{analyses.fmt(pooled_sd(median))} (2 dof)") in body  # both runs, both seeds
    jl = found["jl_error"].data
    assert list(jl) == ["run_1_jl_ema"]  # the baseline has no projection
    assert len(jl["run_1_jl_ema"]["errors"]) == 256 * 255 // 2 and jl["run_1_jl_ema"]["threshold"] == 0.4
    assert jl["run_1_jl_ema"]["errors"].max() < 1e-5  # d_in 64 ≤ 128: the projection is a rotation
    assert len(jl["run_1_jl_ema"]["random"]) == 256 * 255 // 2 and jl["run_1_jl_ema"]["random"].max() < 1e-5
    errors_43 = analyses.jl_cosine_errors(analyses.trained_sae(analyses.read_run(seed_43["run_1_jl_ema"]))[0])
    (row_43,) = [line for line in found["jl_error"].body.splitlines() if line.startswith("| Run 1") and "| 43 |" in line]
    assert row_43.split(" | ")[2] == analyses.fmt(float(errors_43.mean()))  # seed 43's own projection and decoder


def test_jl_errors_reference_random_rows_through_the_same_projection():
    found = experiment.find_plugin("contrastive/run_1_jl_ema")
    cfg = experiment.build_config("tiny", "contrastive/run_1_jl_ema")
    torch.manual_seed(0)
    sae = found.sae_class(64, 40, found.hyperparams_class(jl_dim=16, jl_check_latents=8), cfg)
    rows = analyses.random_unit_rows(40, 64, seed=1)
    p = rows.numpy() @ sae.jl.double().numpy()
    approx = (p / np.linalg.norm(p, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=1, keepdims=True)).T
    i, j = np.triu_indices(40, 1)
    exact = rows.numpy() @ rows.numpy().T
    np.testing.assert_allclose(analyses.jl_cosine_errors(sae, w=rows), np.abs(approx - exact)[i, j], atol=1e-6)


def test_a_reading_s_noise_is_its_seed_spread_pooled_over_the_runs_or_said_absent():
    readings = {"a": [(42, {"x": 1.0, "y": None}), (43, {"x": 3.0, "y": 2.0})], "b": [(42, {"x": 5.0, "y": 1.0})]}
    seeds, noise = analyses.seed_noise(readings, "these runs")
    assert noise == "Noise: the seed-to-seed standard deviation pooled over these runs: x 1.41 (1 dof)."
    assert seeds.count("\n") == 4 and "| a | 43 | 3 | 2 |" in seeds  # a header, its rule and a row per seed
    assert analyses.seed_noise({"a": [(42, {"x": 1.0})]})[1] is None  # one seed: no spread to state
    assert analyses.seed_noise({"a": [(42, {"x": math.nan}), (43, {"x": 1.0})]})[1] is None  # a NaN is no value


@pytest.mark.e2e
def test_freq_order_ordering_reads_spearman_of_held_out_frequency_with_index_for_the_baseline_and_each_run(tmp_path):
    from scipy.stats import spearmanr

    def rho(folder):
        density = json.loads((folder / "feature_metrics.json").read_text())["feature_density"]
        return spearmanr(density, range(256)).statistic

    seed_43 = second_seed(tmp_path, "freq_order", "run_2_freq_ordering")
    _, found = analyse(tmp_path, "freq_order", "ordering", "--only=run_2_freq_ordering")
    data = found["ordering"].data
    assert set(data) == {"run_0_baseline", "run_2_freq_ordering"}  # the baseline is the no-ordering reference
    for plugin, m in data.items():
        info = json.loads((m["folder"] / "final_info.json").read_text())
        assert m["seeds"] == pytest.approx([rho(m["folder"]), rho(seed_43[plugin])], abs=1e-12)
        assert m["rho"] == pytest.approx(np.mean(m["seeds"]), abs=1e-12)
        assert m["tracked"] == info.get("frequency_index_spearman")  # None for the baseline
    assert data["run_0_baseline"]["tracked"] is None and -1 <= data["run_2_freq_ordering"]["tracked"] <= 1
    assert f"reads ρ 0 ± {1 / math.sqrt(255):.3f}" in found["ordering"].body
    assert "seed-to-seed standard deviation of ρ pooled over the study's runs" in found["ordering"].body


@pytest.mark.e2e
def test_zscore_reactivation_compares_the_revived_latents_with_the_others(tmp_path):
    seed_43 = second_seed(tmp_path, "zscore_ortho", "run_4_skip")
    _, found = analyse(tmp_path, "zscore_ortho", "reactivation", "--only=run_4_skip")
    data = found["reactivation"].data
    assert list(data) == ["run_4_skip"]  # the baseline revives nothing and records nothing
    m, folder = data["run_4_skip"], data["run_4_skip"]["folder"]
    record = load_file(folder / "artifacts.safetensors")
    revived = record["revived_at"] >= 0
    assert revived.any() and (m["revived"] == revived).all()
    np.testing.assert_array_equal(m["before"], record["revived_max_cos"][revived])
    w = load_file(folder / "plugin_state.safetensors")["W_dec"].astype(np.float64)
    cos = np.abs((w / np.linalg.norm(w, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T)
    np.fill_diagonal(cos, 0)
    np.testing.assert_allclose(m["after"], cos.max(1), rtol=1e-9)
    density = json.loads((folder / "feature_metrics.json").read_text())["feature_density"]
    np.testing.assert_array_equal(m["rate"], density)
    assert f"| {int(revived.sum())} | " in found["reactivation"].body
    random = analyses.max_abs_cosine(analyses.random_unit_rows(256, 64, seed=0))
    np.testing.assert_array_equal(m["random"], random)
    assert f"random unit rows {np.median(random):.3g}" in found["reactivation"].caption
    revived_43 = (load_file(seed_43["run_4_skip"] / "artifacts.safetensors")["revived_at"] >= 0).sum()
    assert "| Run 4: " in found["reactivation"].body and f"| 43 | {revived_43} |" in found["reactivation"].body
    spread = analyses.fmt(pooled_sd([(revived.sum(), revived_43)]))
    assert f"revived {spread} (1 dof)" in found["reactivation"].caption  # the noise: its two seeds
    (seed_43["run_4_skip"] / "feature_metrics.json").unlink()  # a seed without a core evaluation is passed over
    again = analyses.reactivation(analyses.Setting("zscore_ortho", "tiny", dict(
        tokens=2048, dict_size=None, seed=42, device="auto", evals=None), tmp_path / "runs", tmp_path / "notes.md",
        ("run_4_skip",)))
    assert "| 43 |" not in again.body and analyses.ONE_SEED in again.caption


@pytest.mark.e2e
def test_adaptive_ortho_alpha_ablation_and_condition_numbers_of_the_groups(tmp_path):
    second = second_seed(tmp_path, "adaptive_ortho", "run_1_basic_ortho")["run_1_basic_ortho"]
    output, found = analyse(tmp_path, "adaptive_ortho", "--only=run_1_basic_ortho", "--values=0.1,1")
    alpha = found["alpha"].data
    assert set(alpha) == {("run_1_basic_ortho", 0.1), ("run_1_basic_ortho", 1.0)}
    (sweep,) = (tmp_path / "runs" / "sweeps").glob("analysis_adaptive_ortho_alpha-*")
    for value in ("0.1", "1"):
        folder = sweep / "run_1_basic_ortho" / f"alpha={value},seed=42"
        info = json.loads((folder / "final_info.json").read_text())
        assert json.loads((folder / "config.json").read_text())["hyperparams"]["alpha"] == float(value)
        assert alpha["run_1_basic_ortho", float(value)]["mean group κ"] == info["subspace_condition_numbers"]["mean"]
        assert alpha["run_1_basic_ortho", float(value)]["CE-loss score"] == \
            info["metrics"]["model_performance_preservation"]["ce_loss_score"]
    assert json.loads((sweep / "manifest.json").read_text())["asked"]["grid"] == "alpha=0.1,1"
    assert "adaptive_ortho/run_1_basic_ortho: reused" in output  # the study's run 1 is the sweep's α = 0.1
    kappas, folder, random, base, seed_means = found["condition_numbers"].data["run_1_basic_ortho"].values()
    assert folder == sweep / "run_1_basic_ortho" / "alpha=0.1,seed=42"
    w = load_file(folder / "plugin_state.safetensors")["W_dec"].astype(np.float64)
    groups = load_file(folder / "artifacts.safetensors")["feature_group"]
    assert kappas == pytest.approx([np.linalg.cond(w[groups == g]) for g in range(8)], rel=1e-9)
    recorded = json.loads((folder / "final_info.json").read_text())["subspace_condition_numbers"]["per_group"]
    assert kappas == pytest.approx(recorded, abs=1e-4)  # the plugin's own reading at the end of training
    w2, groups2 = (load_file(second / f)[k].astype(np.float64) for f, k in (("plugin_state.safetensors", "W_dec"),
                                                                             ("artifacts.safetensors", "feature_group")))
    second_kappas = [np.linalg.cond(w2[groups2 == g]) for g in range(8) if (groups2 == g).sum()]
    assert seed_means == pytest.approx([np.mean(kappas), np.mean(second_kappas)], rel=1e-9)  # its seeds 42, 43
    sizes = np.bincount(groups, minlength=8)
    assert random.shape == base.shape == (analyses.REFERENCE_DRAWS,) and base.std() > 0
    first = analyses.random_unit_rows(int(sizes.sum()), 64, seed=0).numpy()
    starts = np.cumsum(sizes) - sizes
    assert random[0] == pytest.approx(np.mean([np.linalg.cond(first[a:a + n]) for a, n in zip(starts, sizes) if n]))
    assert "random unit rows: mean κ ± sd" in found["condition_numbers"].body
    references = [analyses.reference_kappas(np.bincount(load_file(f / "artifacts.safetensors")["feature_group"]),
                                            lambda rows, k: analyses.random_unit_rows(rows, 64, seed=k)).mean()
                  for f in (folder, sweep / "run_1_basic_ortho" / "alpha=1,seed=42", second)]  # every run measured
    assert (f"random unit rows in groups of each run's sizes have mean κ {analyses.fmt(min(references), 4)}–"
            f"{analyses.fmt(max(references), 4)}") in found["alpha"].caption
    ce = [json.loads((f / "final_info.json").read_text())["metrics"]["model_performance_preservation"]["ce_loss_score"]
          for f in (folder, second)]
    noise = found["alpha"].body.split("Noise: ")[1]  # α 0.1 is the study's run 1, trained at seeds 42 and 43
    assert noise.startswith("the seed-to-seed standard deviation pooled over the values trained at more than one")
    assert f"CE-loss score {analyses.fmt(pooled_sd([ce]))} (1 dof)" in noise and "other values have one seed" in noise


@pytest.mark.e2e
def test_topk_threshold_ablation_sweeps_both_tau_modes_at_the_same_settings(tmp_path):
    _, found = analyse(tmp_path, "topk_ortho", "--values=0.005,0.001")
    data = found["topk_threshold"].data
    assert sorted(data) == [("run_1_topk_pairs", 0.001), ("run_1_topk_pairs", 0.005),
                            ("run_2_adaptive_tau", 0.001), ("run_2_adaptive_tau", 0.005)]
    (sweep,) = (tmp_path / "runs" / "sweeps").glob("analysis_topk_ortho_topk_threshold-*")
    for (plugin, value), numbers in data.items():
        folder = sweep / plugin / f"topk_percent={value:g},seed=42"
        config = json.loads((folder / "config.json").read_text())
        info = json.loads((folder / "final_info.json").read_text())
        assert config["hyperparams"]["topk_percent"] == value and config["tokens"] == 2048
        assert numbers["L0"] == info["metrics"]["sparsity"]["l0"]
        w = load_file(folder / "plugin_state.safetensors")["W_dec"].astype(np.float64)
        unit = w / np.linalg.norm(w, axis=1, keepdims=True)
        cos = np.abs(unit @ unit.T)
        assert numbers["dictionary mean |cos|"] == pytest.approx((cos.sum() - np.trace(cos)) / (256 * 255), rel=1e-9)
    body = found["topk_threshold"].body
    baseline_row = next(line for line in body.splitlines() if line.startswith("| Run 0: Baseline (reference) |"))
    assert float(baseline_row.split(" | ")[-2]) > 0 and "dictionary mean \\|cos\\|" in body  # its reference line
    assert f"mean |cos| {analyses.random_mean_abs_cosine(64):.4f}" in found["topk_threshold"].caption
    assert "Noise: one seed per value, so the seed-to-seed spread is not measured here" in body


@pytest.mark.parametrize("args, message", [
    (["baseline"], "no analyses for study 'baseline'; studies with analyses: topk_ortho"),
    (["contrastive", "reactivation"], "no analysis 'reactivation' for contrastive; choose one of sparsity, jl_error, absorption"),
    (["contrastive", "--only", "run_1_initial"], "--only zscore_ortho/run_1_initial: not runs of study contrastive"),
])
def test_a_bad_analysis_is_refused_in_one_line_naming_the_choices(tmp_path, args, message):
    result = cli("analyse", *args, *TINY, "--runs", str(tmp_path / "runs"), "--notes", str(tmp_path / "notes.md"))
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "runs").exists()


# ---- the unlearning comparison: refused here, end to end with the hub's loaders injected --------

@pytest.mark.parametrize("preset, message", [
    ("tiny", "trains its arms on tiny .*no tokenizer.*instruction-tuned model .*not tiny.*WMDP bio forget corpus"),
    ("embedded", "trains its arms on gemma-3-270m .*instruction-tuned model .*not gemma-3-270m"),
    ("gemma-2-2b", "trains its arms on google/gemma-2-2b-it .*WMDP bio forget corpus.*WMDP_BIO_FORGET_CORPUS="),
])
def test_unlearning_is_refused_in_one_line_before_any_training(tmp_path, monkeypatch, preset, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(evals.FORGET_CORPUS_VAR, raising=False)
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("work started"))
    result = cli("analyse", "adaptive_ortho", "unlearning", "--preset", preset, "--tokens", "2048",
                 "--runs", str(tmp_path / "runs"), "--notes", str(tmp_path / "notes.md"))
    assert result.exit_code == 2 and re.search(message, " ".join(result.output.split()))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "notes.md").exists()


@pytest.mark.e2e
def test_unlearning_scores_the_baseline_adaptive_and_fixed_ortho_arms_through_sae_bench(tmp_path, monkeypatch,
                                                                                        tokenizer):
    """As tests/test_evals.py runs unlearning: the tiny model with a word-level tokenizer stands in
    for gemma-2-2b-it, small local datasets for the hub and the gated forget corpus."""
    from sae_bench.evals.unlearning.utils import metrics
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    corpus, rng = tmp_path / "bio-forget-corpus.jsonl", random.Random(1)
    corpus.write_text("".join(json.dumps({"text": text(rng, 40)}) + "\n" for _ in range(20)))
    monkeypatch.setenv(evals.FORGET_CORPUS_VAR, str(corpus))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a random model answers no question right under all 24 orderings of its choices
    monkeypatch.setattr(metrics, "_find_all_permutation_correct_ans",
                        lambda found: np.arange(len(found["is_correct"]) // 24))

    def instruct_model(name, device, dtype):
        assert name == "google/gemma-2-2b-it"
        model = HookedTransformer(HookedTransformerConfig(**sources.TINY_MODEL, seed=0, device=device, dtype=dtype))
        model.set_tokenizer(tokenizer)
        model.cfg.model_name = "gemma-2-2b-it"  # sae_bench's prompt format is chosen by this name
        return model

    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", instruct_model)
    with_loaders = functools.partial(analyses.unlearning, eval_loaders={"load_dataset": fake_load_dataset})
    monkeypatch.setitem(analyses.ANALYSES["adaptive_ortho"], "unlearning",
                        functools.update_wrapper(with_loaders, analyses.unlearning))
    runs, notes, figures = tmp_path / "runs", tmp_path / "notes.md", tmp_path / "figures"
    overrides = dict(tokens=2048, dict_size=None, seed=42, device="cpu", evals=("core",), model="google/gemma-2-2b-it")
    setting = analyses.Setting("adaptive_ortho", "tiny", overrides, runs, notes)
    finding = analyses.run_analyses("adaptive_ortho", "unlearning", setting, figures)[
        figures / "adaptive_ortho" / "analysis_unlearning.png"]
    assert list(finding.data) == ["run_0_baseline", "run_1_basic_ortho", "run_10_fixed_ortho"]
    for plugin, numbers in finding.data.items():
        info = json.loads((numbers["folder"] / "final_info.json").read_text())
        result = info["evals"]["unlearning"]
        assert numbers["unlearning_score"] == result["eval_result_metrics"]["unlearning"]["unlearning_score"]
        assert 0 <= numbers["unlearning_score"] <= 1 and result["eval_config"]["model_name"] == "gemma-2-2b-it"
        assert result["eval_config"]["random_seed"] == evals.EVAL_SEED
        assert json.loads((numbers["folder"] / "config.json").read_text())["model"] == "google/gemma-2-2b-it"
        assert f"| {numbers['unlearning_score']:.4g} |" in finding.body
    assert len(re.findall(r" \| 0\.01 \| [012] \| 25 \| ", finding.body)) == 3  # each arm's one intervention
    text_before = notes.read_text()
    assert text_before.count("## Analysis: adaptive_ortho unlearning\n") == 1
    assert (figures / "adaptive_ortho" / "analysis_unlearning.png").stat().st_size > 10_000
    analyses.run_analyses("adaptive_ortho", "unlearning", analyses.Setting("adaptive_ortho", "tiny", overrides, runs,
                                                                           notes), figures)
    assert notes.read_text() == text_before  # every arm and its score reused, the paragraph not noted again


def test_an_analysis_reading_a_run_kept_without_its_weights_is_passed_over_among_all_and_refused_when_named(
        tmp_path, monkeypatch, capsys):
    from runs import NoWeights, check_weights
    kept = tmp_path / "kept-run"  # scripts/keep_runs.py keeps a run's records, not its SAE
    kept.mkdir()
    monkeypatch.setitem(analyses.ANALYSES, "topk_ortho", {"decoder": lambda s: check_weights(kept)})
    setting = analyses.Setting("topk_ortho", "tiny", {}, tmp_path / "runs", tmp_path / "notes.md")
    assert analyses.run_analyses("topk_ortho", None, setting, tmp_path / "figures") == {}
    assert "topk_ortho decoder: not run: " in capsys.readouterr().err
    with pytest.raises(NoWeights, match="holds no trained SAE .* kept it without its weights"):
        analyses.run_analyses("topk_ortho", "decoder", setting, tmp_path / "figures")
