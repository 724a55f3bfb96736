"""What the topk_ortho study must do on the tiny preset. Every per-step quantity the notebook
tried and failed to record (its runs 2-10 logged nothing or zeros) is in every train_log.jsonl
record, finite and non-zero, and its last value is in final_info's `final_metrics`; the
selection takes the most co-active distinct pairs, as many as `topk_percent` says; the loss is
the selected pairs' overlap energy beyond τ, large enough that the harness does not call it
inert; pair stability is the Jaccard index with the previous step's selection and with the
selection a window (a tenth of the run) earlier; the adaptive τ moves."""

import math

import pytest
import torch
from helpers import cli, read_log

import experiment

RUN_1 = "topk_ortho/run_1_topk_pairs"
RUN_2 = "topk_ortho/run_2_adaptive_tau"
LOGGED = ("total_loss", "l2_loss", "sparsity_loss", "ortho_loss", "active_features",
          "unique_features_in_pairs", "max_pair_correlation", "mean_pair_correlation",
          "pair_jaccard", "pair_jaccard_window", "selected_pairs", "tau")
NONZERO_EVERY_STEP = ("active_features", "selected_pairs", "unique_features_in_pairs",
                      "max_pair_correlation", "mean_pair_correlation", "tau")
TINY_PAIRS = 256 * 255 // 2


def sae_for(plugin: str, d_sae: int = 256, **hp):
    found = experiment.find_plugin(plugin)
    cfg = experiment.build_config("tiny", plugin)
    torch.manual_seed(0)
    return found.sae_class(64, d_sae, found.hyperparams_class(**hp), cfg)


def batch(seed: int, n: int = 256) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def selected(sae) -> set[tuple[int, int]]:
    d = sae.cfg.d_sae
    return {(p // d, p % d) for p in sae.pairs.tolist() if p >= 0}


def inert_warnings(info: dict) -> list[str]:
    return [w for w in info["warnings"] if "cannot change the model" in w]


def test_every_quantity_is_logged_finite_and_nonzero_on_a_real_run(run_tiny):
    info, run_dir = run_tiny(RUN_1, evals=())
    log = read_log(run_dir)
    assert info["training_steps"] == 32 and [r["step"] for r in log] == [0, 10, 20, 30, 31]
    for record in log:
        assert set(LOGGED) <= record.keys()
        assert all(math.isfinite(record[name]) for name in LOGGED), record
    for name in LOGGED:
        assert any(record[name] != 0 for record in log), f"{name} is zero at every logged step"
    for name in NONZERO_EVERY_STEP:
        assert all(record[name] > 0 for record in log), (name, [r[name] for r in log])
    for record in log:
        assert record["mean_pair_correlation"] <= record["max_pair_correlation"] <= 1
        assert record["unique_features_in_pairs"] <= min(2 * record["selected_pairs"], 256)
        assert record["active_features"] <= 256 and 0 <= record["pair_jaccard"] <= 1
        assert record["tau"] == 0.1 or math.isclose(record["tau"], 0.1, rel_tol=1e-6)  # fixed τ
    assert log[0]["pair_jaccard"] == 0 and log[-1]["pair_jaccard"] > 0  # no previous selection at step 0
    final = info["final_metrics"]
    assert set(LOGGED) <= final.keys()
    for name in LOGGED:
        assert math.isclose(final[name], log[-1][name], rel_tol=1e-6), name
    assert math.isclose(final["total_loss"], info["final_loss"], rel_tol=1e-6)
    assert not inert_warnings(info)


@pytest.mark.e2e
def test_set_topk_percent_selects_more_pairs(tmp_path, notes):
    runs = {}
    for percent in ("0.001", "0.01"):
        out = tmp_path / percent
        result = cli("run", "--plugin", RUN_1, "--preset", "tiny", "--evals", "", "--out", str(out),
                     "--notes", str(notes), "--set", f"topk_percent={percent}")
        assert result.exit_code == 0, result.output
        runs[float(percent)] = read_log(out)
    for percent, log in runs.items():  # the tiny run has far more co-firing pairs than slots
        assert all(r["selected_pairs"] == round(percent * TINY_PAIRS) for r in log), percent
    for few, many in zip(runs[0.001], runs[0.01]):
        assert many["selected_pairs"] > few["selected_pairs"]
        assert many["unique_features_in_pairs"] > few["unique_features_in_pairs"]


def test_adaptive_tau_moves_away_from_its_start(run_tiny):
    info, run_dir = run_tiny(RUN_2, evals=())
    taus = [r["tau"] for r in read_log(run_dir)]
    assert math.isclose(taus[0], 0.1, rel_tol=1e-6)  # logged before the first update
    assert abs(taus[-1] - 0.1) > 1e-3, taus
    assert math.isclose(info["final_metrics"]["tau"], taus[-1], rel_tol=1e-6)
    assert not inert_warnings(info)


def test_adaptive_tau_steps_towards_the_selected_pairs_median_overlap():
    sae = sae_for(RUN_2)
    trainer = experiment.find_plugin(RUN_2).trainer_class(sae, sae.run_cfg)
    trainer.step(batch(0), 0)  # the trainer's after_step moves τ after the update
    pairs = sae.pairs[sae.pairs >= 0]
    median = sae.pair_cosines(pairs).abs().median().item()
    expected = 0.99 * 0.1 + 0.01 * median
    assert math.isclose(sae.tau().item(), expected, rel_tol=1e-4)
    assert abs(median - 0.1) > 1e-3  # so the step is a real move


def test_selection_is_the_most_coactive_distinct_pairs():
    sae = sae_for(RUN_1, d_sae=64, topk_percent=0.01)  # 0.01 of 2016 pairs: 20
    f = torch.relu(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) - 1)
    scores = {(i, j): (f[:, i] * f[:, j]).sum().item() for i in range(64) for j in range(i + 1, 64)}
    best = sorted(scores, key=scores.get, reverse=True)[:20]
    got, coactivation = sae.select_pairs(f)
    assert len(got) == 20 and (got >= 0).all()
    assert {(p // 64, p % 64) for p in got.tolist()} == set(best)
    for p, c in zip(got.tolist(), coactivation.tolist()):
        assert math.isclose(c, scores[p // 64, p % 64] / 32, rel_tol=1e-5)  # the batch mean of f_i·f_j


def test_pairs_that_never_cofire_are_not_selected():
    sae = sae_for(RUN_1, d_sae=64, topk_percent=0.01)
    f = torch.zeros(8, 64)
    f[:, :3] = 1.0  # only 3 co-firing pairs for 20 slots
    got, coactivation = sae.select_pairs(f)
    assert {(p // 64, p % 64) for p in got.tolist() if p >= 0} == {(0, 1), (0, 2), (1, 2)}
    assert (coactivation[got < 0] == 0).all()
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # no latent fires: nothing to select
    out = sae.loss(batch(0), 0)
    assert out.terms["ortho_loss"] == 0 and out.stats["selected_pairs"] == 0
    assert all(torch.isfinite(v) for v in out.stats.values())


def test_pair_jaccard_is_the_overlap_with_the_previous_steps_selection():
    sae = sae_for(RUN_1)
    assert sae.loss(batch(0), 0).stats["pair_jaccard"] == 0  # nothing selected before
    assert sae.loss(batch(0), 1).stats["pair_jaccard"] == 1  # same batch, same pairs
    before = selected(sae)
    jaccard = sae.loss(batch(1), 2).stats["pair_jaccard"].item()
    after = selected(sae)
    assert 0 < len(before & after) < len(before | after)
    assert math.isclose(jaccard, len(before & after) / len(before | after), rel_tol=1e-6)


def test_pair_jaccard_window_is_the_overlap_with_the_selection_a_window_earlier():
    sae = sae_for(RUN_1)
    window = sae.run_cfg.scaled_steps(sae.hp.stability_every)
    assert window > 1
    kept = {}
    for step in range(2 * window + 1):
        stats = sae.loss(batch(step), step).stats
        if step % window == 0:
            kept[step] = selected(sae)
        expected = 0.0 if step < window else len(kept[window] & kept[0]) / len(kept[window] | kept[0])
        if step == 2 * window:
            expected = len(kept[2 * window] & kept[window]) / len(kept[2 * window] | kept[window])
        assert math.isclose(stats["pair_jaccard_window"].item(), expected, rel_tol=1e-6, abs_tol=1e-9), step
    assert 0 < expected < 1


def test_ortho_loss_is_the_selected_pairs_overlap_energy_beyond_tau():
    """ortho_weight · Σ_selected 2·mean_batch(f_i·f_j)·max(|w_i·w_j| − τ, 0), with gradients
    into the decoder only."""
    sae = sae_for(RUN_1, d_sae=64, topk_percent=0.01)
    x = batch(3, n=32)
    out = sae.loss(x, 0)
    f, w = out.latents.detach(), sae.W_dec.detach()
    expected = 0.0
    for p in sae.pairs.tolist():
        if p >= 0:
            i, j = p // 64, p % 64
            overlap = (w[i] @ w[j]).abs().item()
            expected += 2 * (f[:, i] * f[:, j]).mean().item() * max(overlap - 0.1, 0.0)
    assert expected > 0  # some selected pair overlaps beyond τ: the hinge is active
    assert math.isclose(out.terms["ortho_loss"].item(), 0.1 * expected, rel_tol=1e-4)
    out.terms["ortho_loss"].backward()
    assert sae.W_dec.grad.abs().sum() > 0 and sae.W_enc.grad is None
