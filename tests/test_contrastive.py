"""What is particular to the contrastive study (notebook 002): the 128-d JL projection and its
logged approximation check, the coordinated cosine schedules (contrast threshold 0.4 -> 0.05, held
above the projection's noise only where a floor is set; lambda_i bounds [0.02, 1.0] -> [0.01, 0.5]), the pairwise penalties
summed so that they act (over the pairs above threshold; per latent), the full Gram-Schmidt in
blocks of d_in rows, the 16 groups, and run 10's hard orthogonality and re-initialisation."""

import math

import pytest
import torch
from helpers import read_log, tiny_run

import analyses
import evals
import experiment
from plugins.contrastive.run_5_gram_schmidt import gram_schmidt


def build(run: str, d_in: int = 64, d_sae: int = 256, seed: int = 0, **hyperparams):
    plugin = experiment.find_plugin(f"contrastive/{run}")
    cfg = experiment.build_config("tiny", f"contrastive/{run}")
    torch.manual_seed(seed)
    sae = plugin.sae_class(d_in, d_sae, plugin.hyperparams_class(**hyperparams), cfg)
    return sae, plugin.trainer_class(sae, cfg)


@pytest.fixture(scope="module")
def lambda_run(tmp_path_factory):
    """One tiny run of run 3 (threshold and lambda schedules, JL check) with a 32-d JL space, so
    that the projection is a real reduction of the tiny model's 64 dimensions, and a noise floor of
    1/√32 that the annealed threshold reaches after 59% of the run."""
    tmp = tmp_path_factory.mktemp("contrastive")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAE_HARNESS_ACTIVATIONS", str(tmp / "activations"))
        info = tiny_run("contrastive/run_3_lambda_bounds", tmp / "run", tmp / "notes.md",
                        hyperparams={"jl_dim": 32, "noise_z": 1.0}, evals=())
    return info, read_log(tmp / "run")


def test_jl_projection_is_orthonormal_128d_limited_by_d_in():
    wide, _ = build("run_1_jl_ema", d_in=256, d_sae=512)
    assert wide.jl.shape == (256, 128)
    assert torch.allclose(wide.jl.T @ wide.jl, torch.eye(128), atol=1e-5)
    tiny, _ = build("run_1_jl_ema")
    assert tiny.jl.shape == (64, 64)  # d_in < 128: a rotation
    assert "jl" in dict(tiny.named_buffers())


def test_jl_projection_is_seeded_by_the_global_rng():
    assert torch.equal(build("run_1_jl_ema", seed=1)[0].jl, build("run_1_jl_ema", seed=1)[0].jl)
    assert not torch.equal(build("run_1_jl_ema", seed=1)[0].jl, build("run_1_jl_ema", seed=2)[0].jl)


def test_jl_check_measures_the_expected_distortion():
    sae, _ = build("run_1_jl_ema", d_in=256, d_sae=512)
    check = sae.jl_check(sae.W_dec.detach())
    # A random 128-d subspace of 256 keeps half of a random row's energy.
    assert check["jl_recon_error"] == pytest.approx(math.sqrt(0.5), abs=0.05)
    assert 0 < check["jl_cos_error_mean"] < 0.2 and check["jl_norm_distortion"] < 0.2
    rotation, _ = build("run_1_jl_ema")
    assert all(v < 1e-5 for v in rotation.jl_check(rotation.W_dec.detach()).values())


@pytest.mark.e2e
def test_jl_check_is_logged_every_step_and_in_final_info(lambda_run):
    info, log = lambda_run
    keys = ("jl_cos_error_mean", "jl_cos_error_max", "jl_norm_distortion", "jl_recon_error")
    for record in log:
        assert all(math.isfinite(record[k]) and record[k] > 0 for k in keys), record
    assert info["jl_dim"] == 32 and set(info["jl_check"]) == set(keys)
    assert info["jl_check"]["jl_recon_error"] == pytest.approx(math.sqrt(0.5), abs=0.15)


@pytest.mark.e2e
def test_contrast_threshold_anneals_from_0_4_towards_0_05_and_a_noise_floor_set_holds_it_above(lambda_run):
    thresholds = [r["contrast_threshold"] for r in lambda_run[1]]
    floor = 1 / 32 ** 0.5
    assert thresholds[0] == pytest.approx(0.4) and thresholds[1] > thresholds[2] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(thresholds, thresholds[1:])) and thresholds[-1] == pytest.approx(floor)
    embedded_like, _ = build("run_2_cosine_threshold", d_in=640, d_sae=1024)  # the notebook's schedule, no floor
    last = embedded_like.run_cfg.steps - 1
    assert embedded_like.contrast_threshold(0) == pytest.approx(0.4)
    assert embedded_like.contrast_threshold(last) == pytest.approx(0.05)
    floored, _ = build("run_2_cosine_threshold", d_in=640, d_sae=1024, noise_z=3.0)
    assert floored.contrast_threshold(last) == pytest.approx(3 / 128 ** 0.5)
    fixed, _ = build("run_1_jl_ema")
    assert fixed.contrast_threshold(0) == fixed.contrast_threshold(10_000) == 0.4


@pytest.mark.e2e
def test_lambdas_stay_within_step_dependent_bounds(lambda_run):
    log = lambda_run[1]
    assert (log[0]["lambda_lo"], log[0]["lambda_hi"]) == pytest.approx((0.02, 1.0))
    assert (log[-1]["lambda_lo"], log[-1]["lambda_hi"]) == pytest.approx((0.01, 0.5))
    for r in log:  # the mean of equal λs may round a float32 ulp off them
        assert r["lambda_lo"] - 1e-6 <= r["lambda_min"] <= r["lambda_max"] <= r["lambda_hi"] + 1e-6
        assert r["lambda_min"] - 1e-6 <= r["lambda_mean"] <= r["lambda_max"] + 1e-6


def test_contrastive_penalty_is_summed_over_the_pairs_above_threshold():
    sae, _ = build("run_1_jl_ema")
    w = torch.nn.functional.normalize(torch.randn(256, 64), dim=1)
    cos = (w @ w.T).abs().triu(1)
    loss, over = sae.contrastive_loss(w, 0.3)  # the projection is a rotation on tiny
    assert loss.item() == pytest.approx(((cos - 0.3).clamp_min(0) ** 2).sum().item(), rel=1e-4)
    assert over.item() == pytest.approx((cos > 0.3).sum().item() / (256 * 255 / 2), rel=1e-4)
    assert sae.contrastive_loss(w, 1.0)[0] == 0


def test_diversity_loss_sums_each_latents_mean_cosine_with_the_others():
    sae, _ = build("run_4_diversity")
    f = torch.relu(torch.randn(64, 256))
    cos = torch.nn.functional.normalize(f, dim=0).T @ torch.nn.functional.normalize(f, dim=0)
    brute = ((cos.sum(1) - cos.diagonal()) / 255).sum()
    assert sae.diversity_loss(f).item() == pytest.approx(brute.item(), rel=1e-4)


def modified_gram_schmidt(rows: torch.Tensor) -> torch.Tensor:
    """The textbook loop: each row minus its projections on the unit rows before it, normalised."""
    done = []
    for row in rows:
        for q in done:
            row = row - (row @ q) * q
        done.append(row / row.norm())
    return torch.stack(done)


def test_gram_schmidt_is_modified_gram_schmidt_within_blocks_keeping_norms():
    w = torch.randn(100, 16, dtype=torch.float64) * torch.rand(100, 1, dtype=torch.float64)
    q = gram_schmidt(w, 16)  # 100 = 6 blocks of 16 + a short block of 4
    for start in range(0, 100, 16):
        rows = w[start:start + 16]
        torch.testing.assert_close(q[start:start + 16], modified_gram_schmidt(rows) * rows.norm(dim=1, keepdim=True))


def test_gram_schmidt_is_full_each_block_of_d_in_rows_an_orthonormal_basis():
    sae, _ = build("run_5_gram_schmidt")
    w = sae.decoder_weight().detach()
    assert sae.gs_block_size() == 64 and not torch.allclose(w, sae.W_dec)
    for block in w.split(64):  # 256 latents: four complete bases of the 64-d space
        torch.testing.assert_close(block @ block.T, torch.eye(64), atol=1e-4, rtol=0)


def test_hierarchical_structure_has_16_groups_and_masks_weak_groups():
    sae, _ = build("run_7_group_sparsity")
    assert torch.bincount(sae.group_index).tolist() == [16] * 16
    f = sae.encode(torch.randn(32, 64) * 3)
    kept = (sae.group_sum((f > 0).float()) > 0).sum(1)
    assert (kept <= sae.hp.active_groups).all() and len(sae.final_info()["group_activity"]) == 16


def test_group_learning_rates_favour_under_used_groups():
    sae, _ = build("run_8_group_lr")
    sae.importance.fill_(1.0)
    sae.importance[sae.group_index == 3] = 0.01
    lr = sae.group_lr_multipliers()
    assert lr[3] == sae.hp.lr_max and (lr >= sae.hp.lr_min).all() and (lr[lr != lr[3]] < 1).all()


def test_temperature_anneals_and_competition_leaves_window_winners_intact():
    sae, trainer = build("run_9_wta")
    x = torch.randn(256, 64) * 3
    assert float(sae.temperature) == pytest.approx(1.0)
    for step in range(trainer.run_cfg.steps):
        sae.anneal_temperature(step)
    assert float(sae.temperature) == pytest.approx(0.05)
    windows = sae.windows(sae.encode(x)).detach()
    # with a sharp temperature each competing window is dominated by its winner
    top = windows.amax(-1)
    competing = top > sae.winner_threshold
    assert ((windows.sum(-1) - top)[competing] < top[competing]).float().mean() > 0.9


def test_decorrelation_loss_matches_the_correlation_matrix():
    sae, _ = build("run_10_hard_ortho")
    f = torch.relu(torch.randn(128, 256))
    f[:, 7] = 0  # a dead latent counts as uncorrelated
    corr = torch.corrcoef(f.T).nan_to_num()
    brute = corr.pow(2).sum() - corr.diagonal().pow(2).sum()
    assert sae.correlation(f).item() == pytest.approx(brute.item(), rel=1e-3)


def test_hard_orthogonality_holds_and_dead_units_are_reinitialised():
    sae, trainer = build("run_10_hard_ortho")
    assert sae.ortho_error() < 1e-4
    x = torch.randn(256, 64) * 3 + 1
    every = trainer.run_cfg.scaled_steps(sae.hp.reinit_every)
    for step in range(every):
        trainer.step(x, step)
    with torch.no_grad():  # five dead units
        sae.b_enc[:5] = -1e4
        sae.utilisation[:5] = 0.0
    before = sae.W_dec[:5].clone()
    total, out = trainer.step(x, every)
    assert out.stats["reinitialised_total"] == 5 and not torch.allclose(sae.W_dec[:5], before)
    assert sae.ortho_error() < 1e-4 and (sae.utilisation[:5] > 0).all()


def test_re_initialisation_leaves_every_live_latent_s_decoder_row_exactly_as_it_was():
    sae, trainer = build("run_10_hard_ortho")
    x = torch.randn(256, 64) * 3 + 1
    with torch.no_grad():  # dead units in the first block, the middle of the second and the last
        dead = torch.tensor([0, 3, 70, 100, 255])
        sae.utilisation.fill_(0.1)
        sae.utilisation[dead] = 0.0
    live, before = torch.ones(256, dtype=torch.bool), sae.W_dec.detach().clone()
    live[dead] = False
    trainer.reinitialise(x)
    assert trainer.reinitialised == 5
    assert torch.equal(sae.W_dec[live], before[live]) and not torch.allclose(sae.W_dec[dead], before[dead])
    assert sae.ortho_error() < 1e-5


def test_every_weight_reader_reads_the_decoder_that_decode_uses():
    """Run 5 decodes through gram_schmidt(W_dec): sae_bench's weights (absorption's unit rows
    included), the SAELens export, the dashboard's directions and the analyses' rows are that
    decoder, not the stored W_dec."""
    sae, _ = build("run_5_gram_schmidt")
    scale, effective = 4.0, sae.decoder_weight().detach()
    assert not torch.allclose(effective, sae.W_dec.detach(), atol=1e-2)  # the transform matters here
    scaled = evals.ScaledSAE(sae, scale)
    torch.testing.assert_close(scaled.W_dec, effective / scale)
    torch.testing.assert_close(sae.sae_lens_export(scale)[0].W_dec.detach(), effective / scale)
    x = torch.randn(32, 64)
    reconstruction = scaled(x)
    unit = evals.unit_decoder_rows(evals.ScaledSAE(sae, scale))
    torch.testing.assert_close(unit.W_dec, torch.nn.functional.normalize(effective, dim=1))
    torch.testing.assert_close(unit.decode(unit.encode(x)), reconstruction, rtol=1e-4, atol=1e-5)
    one_hot = torch.eye(sae.cfg.d_sae)[:5]
    torch.testing.assert_close(scaled.decode(one_hot) - scaled.decode(0 * one_hot), effective[:5] / scale)
    kappas = analyses.group_condition_numbers(sae.decoder_weight(), torch.zeros(256, dtype=torch.long), 1)
    assert kappas[0] == pytest.approx(1.0, abs=1e-3)  # blocks of 64 orthonormal rows: the whole is 4 stacked bases
