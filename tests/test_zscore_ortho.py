"""What the zscore_ortho study must do, and what every skip-path plugin must do in evaluation.

A skip path is part of the SAE: sae_bench, which decodes what it encoded (edited in place for
ablations), gets the reconstruction the SAE trained with, and the SAELens export says it is not
exact. In zscore_ortho: the statistics are the EMA of the latents' covariance and of their
pre-activations, run 2 initialises them from the first batch; the orthogonality loss is the
co-active pairs' overlap energy beyond τ, large enough that the harness does not call it inert;
revival and the threshold warm-up follow the notebook's steps scaled to the run; run 5 weighs the
L1 by usage from the first step; run 8's attention has query, key and value projections and
mixes the blocks of a token's code without densifying it; run 9's scales are different
normalisations."""

import dataclasses
import math

import pytest
import torch

import experiment
import evals
from runs import save_sae

STUDY = "zscore_ortho"
SKIP_PLUGINS = sorted(k for k in experiment.plugin_files()  # every plugin with its own reconstruction
                      if not experiment.keeps_methods(experiment.find_plugin(k).sae_class, ("reconstruct",),
                                                      experiment.SAE))


def build(plugin: str, d_sae: int = 256, tokens: int | None = None, **hp):
    found = experiment.find_plugin(plugin if "/" in plugin else f"{STUDY}/{plugin}")
    cfg = experiment.build_config("tiny", f"{found.study}/{found.name}", tokens=tokens)
    torch.manual_seed(0)
    sae = found.sae_class(64, d_sae, found.hyperparams_class(**hp), cfg)
    return sae, found.trainer_class(sae, cfg)


def batch(seed: int, n: int = 256) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def test_the_skip_plugins_are_zscore_run_4_and_adaptive_run_6_and_their_descendants():
    assert {"zscore_ortho/run_4_skip", "adaptive_ortho/run_6_skip_dropout"} <= set(SKIP_PLUGINS)
    assert all(k.startswith(("zscore_ortho/", "adaptive_ortho/")) for k in SKIP_PLUGINS)


@pytest.mark.e2e
@pytest.mark.parametrize("key", SKIP_PLUGINS)
def test_a_skip_plugins_evaluated_reconstruction_is_its_training_reconstruction(key, tmp_path):
    """sae_bench core computes decode(encode(x)) on (batch, position, d_in) activations in the
    model's scale; it must be the reconstruction the loss trained on, for the same batch."""
    sae, trainer = build(key)
    if hasattr(sae.hp, "feature_dropout"):  # training-only randomness off: the same function
        sae.hp = dataclasses.replace(sae.hp, feature_dropout=0.0)
    for step in range(2):
        trainer.step(batch(step), step)
    x, scale = batch(7), 0.5  # x in the training scale
    with torch.no_grad():
        trained = sae.training_pass(x, 2).x_hat
        scaled = evals.ScaledSAE(sae.eval(), scale)
        f = scaled.encode((x / scale).reshape(4, 64, 64))
        evaluated = scaled.decode(f).reshape(256, 64) * scale
        torch.testing.assert_close(evaluated, trained, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scaled((x / scale).reshape(4, 64, 64)).reshape(256, 64) * scale, trained,
                                   rtol=1e-5, atol=1e-5)
        latent_path = scaled.decode(f.clone()).reshape(256, 64) * scale  # latents encode did not return
        assert (evaluated - latent_path).abs().max() > 1e-2  # so the skip path is really there

        f[..., :32] = 0.0  # an ablation, as sae_bench's SCR/TPP and unlearning make it
        ablated = scaled.decode(f).reshape(256, 64) * scale
        torch.testing.assert_close(ablated, sae.reconstruct(x, f.reshape(256, -1)), rtol=1e-5, atol=1e-5)
    assert save_sae(sae, scale, tmp_path)["exact"] is False


def test_covariance_statistics_and_run_2s_first_batch_initialisation():
    x = batch(0)
    for run, expected_share in (("run_1_initial", 0.01), ("run_2_stable_init", 1.0)):
        sae, _ = build(run, svd_rank=256)  # full rank: the randomized SVD is exact
        pre = sae.pre_activation(x).detach()
        out = sae.loss(x, 0)
        f = out.latents.detach()
        assert 0 < (f > 0).float().mean() < 1
        u = sae.coactivation_factor
        torch.testing.assert_close(u @ u.T, expected_share * f.T @ f / len(f), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(sae.pre_mean, expected_share * pre.mean(0))
        torch.testing.assert_close(sae.pre_var, expected_share * pre.var(0))


def test_ortho_loss_is_the_overlap_energy_of_the_most_coactive_pairs_beyond_tau():
    sae, _ = build("run_1_initial", d_sae=8, max_pairs=2)
    factor = torch.zeros(8, 8)  # UUᵀ: pairs (0, 1), (2, 3), (4, 5), (6, 7) co-active 0.9, 0.5, 0.3, 0.05
    for i, c in zip((0, 2, 4, 6), (0.9, 0.5, 0.3, 0.05)):
        factor[i, i] = factor[i + 1, i] = c ** 0.5
    sae.coactivation_factor.copy_(factor)
    w = sae.W_dec.detach()
    expected = sum(2 * (c - 0.1) * (w[i] @ w[j]).abs() for i, j, c in ((0, 1, 0.9), (2, 3, 0.5)))  # the top two
    loss = sae.aux_losses(None)["ortho_loss"]
    assert math.isclose(loss.item(), 0.1 * expected.item(), rel_tol=1e-5)
    loss.backward()
    assert sae.W_dec.grad[:4].abs().sum() > 0 and sae.W_dec.grad[4:].abs().sum() == 0


def test_the_most_coactive_pairs_are_read_from_the_rank_r_factor_in_blocks_and_no_buffer_is_d_sae_squared():
    sae, _ = build("run_1_initial", max_pairs=100)
    sae.loss(batch(0), 0)
    assert sae.coactivation_factor.shape == (256, 32)
    assert all(b.numel() < 256 * 256 for b in sae.buffers())
    with torch.no_grad():
        sae.coactivation_factor.mul_(10)  # some pairs above τ
    u = sae.coactivation_factor
    brute = torch.triu(u @ u.T - sae.hp.tau, diagonal=1).clamp_min(0).flatten().topk(100)
    for rows in (256, 7):
        weights, ids = sae.coactive_pairs(rows)
        torch.testing.assert_close(weights, brute.values)
        assert set(ids.tolist()) == set(brute.indices.tolist())


# Weights 0.1 and 0.01. Run 1's τ (the notebook's) sits above tiny's co-activations once b_dec
# starts at the data, so that none passes it in 32 steps: here τ is lowered (on embedded it acts).
@pytest.mark.parametrize("run, hyperparams", [("run_1_initial", {"tau": 0.01}), ("run_3_reduced_ortho_lr", None)])
def test_the_orthogonality_term_is_not_inert_on_tiny(run, hyperparams, run_tiny):
    info, _ = run_tiny(f"{STUDY}/{run}", evals=(), hyperparams=hyperparams)
    assert not [w for w in info["warnings"] if "cannot change the model" in w], info["warnings"]


@pytest.mark.e2e
def test_revival_and_threshold_warm_up_follow_the_notebooks_steps_scaled_to_the_run():
    sae, trainer = build("run_2_stable_init", tokens=256 * 100, max_revive=256)  # 100 steps
    period, warmup = sae.run_cfg.scaled_steps(500), sae.run_cfg.scaled_steps(100)
    assert (period, warmup) == (10, 2)
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # latents 0-7 never fire
    for step in range(period + 1):
        if step == warmup:
            torch.testing.assert_close(sae.threshold(), sae.pre_mean + 2.0 * sae.pre_var.sqrt())
        elif step == 1:
            torch.testing.assert_close(sae.threshold(), sae.pre_mean + 1.0 * sae.pre_var.sqrt())  # halfway
        trainer.step(batch(step), step)
        assert (trainer.revived > 0) == (step == period), step
    assert (sae.b_enc[:8] == 0).all()  # revived: re-initialised


def test_run_5_weighs_the_l1_by_usage_from_the_first_step():
    sae, _ = build("run_5_importance_l1")
    out = sae.loss(batch(0), 0)
    f = out.latents.detach()
    torch.testing.assert_close(sae.importance, f.mean(0))
    weights = (f.mean(0) / f.mean()).clamp(0.5, 2.0)
    assert weights.min() == 0.5 and weights.max() == 2.0  # the weights act at once
    torch.testing.assert_close(out.terms["sparsity_loss"], 0.04 * (f * weights).sum(-1).mean())


def test_run_8_attention_mixes_the_blocks_of_a_tokens_code_through_its_projections():
    sae, _ = build("run_8_attention", d_sae=200)  # 4 blocks of 64, the last one padded
    f = torch.relu(torch.randn(16, 200, generator=torch.Generator().manual_seed(1)) - 1)
    with torch.no_grad():
        mixed = sae.block_attention(f)
        assert mixed.shape == (16, 200)
        other = f.clone()
        other[:, 64:128] *= 2  # block 1 changes...
        assert not torch.allclose(sae.block_attention(other)[:, :64], mixed[:, :64])  # ...and block 0 hears it
        for projection in (sae.W_query, sae.W_key, sae.W_value):
            projection += 0.5
            assert not torch.allclose(sae.block_attention(f), mixed)
            projection -= 0.5
        pre = torch.randn(16, 200)
        base = experiment.find_plugin(f"{STUDY}/run_7_adaptive_ln").sae_class.activation(sae, pre, None)
        reweighted = sae.activation(pre, None)
    assert ((reweighted == 0) == (base == 0)).all() and (reweighted >= 0).all()  # zeros stay zero
    assert not torch.allclose(reweighted, base)


def test_run_9_scales_are_different_normalisations():
    sae, _ = build("run_9_multiscale_norm")
    u = torch.randn(64, generator=torch.Generator().manual_seed(2))
    u = (u - u.mean()) / u.std(unbiased=False)
    norms = sae.multiscale_norms(torch.stack([10 * u, 0.5 * u]))  # (2 tokens, 4 scales, 64)
    for k, s in enumerate([0.1, 0.5, 1.0, 2.0]):
        for t, spread in enumerate([10.0, 0.5]):
            torch.testing.assert_close(norms[t, k], spread * u / math.sqrt(spread ** 2 + s ** 2))
    ratio = (norms[1] / norms[0]).mean(-1)  # small over large spread, per scale
    assert ratio[0] > 0.95 and ratio[-1] < 0.3 and (ratio.diff() < 0).all()  # normalising at 0.1, nearly linear at 2
    with torch.no_grad():
        sae.scale_logits.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
        sae.scale_gains.mul_(torch.rand(4, 64, generator=torch.Generator().manual_seed(3)) + 0.5)
    x = batch(4, n=8)
    mix = torch.softmax(sae.scale_logits, 0)
    adaptive_norm = experiment.find_plugin(f"{STUDY}/run_8_attention").sae_class.encoder_input(sae, x)
    branches = sae.multiscale_norms(adaptive_norm) * sae.scale_gains
    expected = (mix[:, None] * (branches + sae.scale_residuals[:, None] * (x - sae.b_dec)[:, None])).sum(1)
    torch.testing.assert_close(sae.encoder_input(x), expected)
