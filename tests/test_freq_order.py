"""What is particular to the freq_order study: tracked activation frequencies are firing rates
and reach the run folder; the ordering loss's rates are exactly the hard rates and make frequency
fall with latent index; run 3's ordering weight ramps up from 0; resampling revives only silent
latents, along what their inputs miss, at the rarest live rate, with fresh Adam state; run 5's L1
coefficient is the penalty over the reconstruction cosine; run 9's attention projects queries,
keys and values from the latents' tokens and stays affordable at a realistic dictionary size."""

import pytest
import torch
from helpers import read_log
from safetensors.torch import load_file

import experiment

STUDY = "freq_order"
_runs: dict[str, tuple[dict, object]] = {}


def run_2(run_tiny, ordering_weight: float) -> tuple[dict, object]:
    """Run 2 on tiny at a learning rate (1e-2) at which 32 steps can reorder the latents; one run
    per weight per session."""
    if ordering_weight not in _runs:
        _runs[ordering_weight] = run_tiny(f"{STUDY}/run_2_freq_ordering", evals=(), lr=1e-2,
                                          hyperparams={"ordering_weight": ordering_weight})
    return _runs[ordering_weight]


def build(run: str, d_in: int = 64, d_sae: int = 256):
    plugin = experiment.find_plugin(f"{STUDY}/{run}")
    cfg = experiment.build_config("tiny", f"{STUDY}/{run}")
    torch.manual_seed(0)
    sae = plugin.sae_class(d_in, d_sae, plugin.hyperparams_class(), cfg)
    return sae, plugin.trainer_class(sae, cfg)


def test_tracked_frequency_is_the_firing_rate():
    sae, _ = build("run_2_freq_ordering")
    x = torch.randn(256, 64) * 3 + 1
    for step in range(3):  # a constant input: the bias-corrected EMA must equal its rate exactly
        sae.loss(x, step)
    rate = (sae.encode(x) > 0).float().mean(0)
    assert 0 < rate.mean() < 1
    torch.testing.assert_close(sae.frequencies(), rate)


def test_firing_rates_are_the_hard_rates_bit_for_bit_with_the_surrogate_gradient():
    sae, _ = build("run_2_freq_ordering")
    pre = (torch.randn(256, 2048) * 2).requires_grad_()
    rates = sae.firing_rates(pre)
    assert torch.equal(rates, (pre > 0).float().mean(0)), "the penalty's value must not carry rounding"
    rates.sum().backward()
    soft = torch.sigmoid(pre.detach() / sae.hp.surrogate_temperature)
    torch.testing.assert_close(pre.grad, soft * (1 - soft) / sae.hp.surrogate_temperature / len(pre))


def test_frequencies_and_their_order_are_saved_in_the_run_folder(run_tiny):
    info, out = run_2(run_tiny, 0.3)
    saved = load_file(out / "artifacts.safetensors")
    freq, order = saved["feature_frequencies"], saved["frequency_order"]
    assert freq.shape == (256,) and torch.isfinite(freq).all()
    assert (freq >= 0).all() and (freq <= 1).all() and freq.max() > 0
    assert sorted(order.tolist()) == list(range(256))
    assert (freq[order][1:] <= freq[order][:-1]).all(), "frequency_order must go from most to least frequent"
    l0 = [record["l0"] for record in read_log(out)]  # rates, not counts: they sum to about the L0
    assert min(l0) <= freq.sum() <= max(l0)
    assert -1 <= info["frequency_index_spearman"] <= 1 and 0 <= info["ordering_error"] <= 1


def test_ordering_loss_makes_frequency_fall_with_index(run_tiny):
    ordered, _ = run_2(run_tiny, 3.0)
    unordered, _ = run_2(run_tiny, 0.0)
    assert ordered["frequency_index_spearman"] < -0.5
    assert ordered["frequency_index_spearman"] < unordered["frequency_index_spearman"] - 0.5
    assert ordered["ordering_error"] < unordered["ordering_error"]


def test_ordering_weight_ramps_from_zero_to_its_full_value():
    sae, _ = build("run_3_ordering_ramp")
    ramp = sae.run_cfg.scaled_steps(sae.hp.ordering_ramp_steps)
    weights = [sae.ordering_weight(step) for step in range(sae.run_cfg.steps)]
    assert 1 < ramp < sae.run_cfg.steps
    assert weights[0] == 0 and 0 < weights[ramp // 2] < 0.5
    assert all(a <= b for a, b in zip(weights, weights[1:]))
    assert weights[ramp] == weights[-1] == pytest.approx(0.5)
    x = torch.randn(256, 64) * 3 + 1
    assert sae.loss(x, 0).terms["ordering_loss"] == 0 and sae.loss(x, ramp).terms["ordering_loss"] > 0


@pytest.mark.parametrize("run", ["run_4_freq_resampling", "run_7_preact_layer_norm", "run_9_latent_attention"])
def test_resampling_revives_only_silent_latents_at_the_rarest_live_rate(run):
    sae, trainer = build(run)
    x = torch.randn(256, 64) * 3 + 1
    trainer.window_fires = torch.full((256,), 100.0 * trainer.every)
    trainer.window_fires[:10] = 0  # silent in the window
    trainer.window_fires[10] = 3 * trainer.every  # rare but alive: 3 tokens a batch
    before = sae.W_dec.detach().clone()
    trainer.resample(x)
    assert trainer.resampled == 10
    assert not torch.isclose(sae.W_dec[:10], before[:10]).all(dim=1).any()
    assert torch.equal(sae.W_dec[10:], before[10:]), "a rare latent is the study's result, not a dead one"
    assert ((sae.encode(x)[:, :10] > 0).sum(0) == 3).all(), "revived latents enter at the rarest live rate"


def test_resampled_directions_are_what_the_inputs_miss_not_the_direction_they_share():
    """A residual stream's inputs share one dominant direction; reviving latents along raw
    inputs makes near-copies that fire together on the same tokens."""
    sae, trainer = build("run_4_freq_resampling")
    shared = torch.nn.functional.normalize(torch.randn(64), dim=0) * 30
    x = torch.randn(256, 64) + shared  # raw inputs' pairwise cosine ≈ 0.9
    trainer.window_fires = torch.full((256,), 100.0 * trainer.every)
    trainer.window_fires[:40] = 0
    trainer.resample(x)
    rows = torch.nn.functional.normalize(sae.W_dec[:40], dim=-1)
    cosines = (rows @ rows.T)[~torch.eye(40, dtype=torch.bool)]
    assert cosines.abs().mean() < 0.2, f"revived rows are near-copies (mean |cos| {cosines.abs().mean():.2f})"
    assert (rows @ torch.nn.functional.normalize(shared, dim=0)).abs().max() < 0.5


@pytest.mark.parametrize("run", ["run_4_freq_resampling", "run_9_latent_attention"])
def test_resampling_revives_dead_latents_with_fresh_adam_state(run):
    sae, trainer = build(run)
    x = torch.randn(256, 64) * 3 + 1
    dead = torch.arange(10)
    with torch.no_grad():
        sae.b_enc[dead] = -1e4
    for step in range(trainer.every - 1):
        trainer.step(x, step)
    for state in trainer.optimizer.state.values():  # moments a reset must clear
        state["exp_avg"].fill_(1.0)
        state["exp_avg_sq"].fill_(1.0)
    decoder_before = sae.W_dec[dead].clone()
    trainer.step(x, trainer.every - 1)  # the first resampling step
    assert trainer.resampled >= len(dead)
    assert not torch.isclose(sae.W_dec[dead], decoder_before).all(dim=1).any()
    assert (sae.encode(x)[:, dead] > 0).any(dim=0).all(), "resampled latents must fire again"
    for param, dim in sae.latent_slices():
        state = trainer.optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            assert (state[key].index_select(dim, dead) == 0).all(), f"{key} of a resampled latent kept"
            assert (state[key] != 0).any(), f"{key} was reset for every latent"


def test_l1_coefficient_is_the_penalty_over_the_reconstruction_cosine():
    sae, _ = build("run_5_adaptive_l1")
    x = torch.randn(256, 64) * 3 + 1
    for flip in (1.0, -1.0):  # a good and a hopeless (negative cosine) reconstruction
        with torch.no_grad():
            sae.W_dec.mul_(flip)
        stats = sae.loss(x, 0).stats
        cosine = stats["recon_cosine"]
        expected = sae.run_cfg.sparsity_penalty / max(cosine.item(), sae.hp.min_cosine)
        assert stats["l1_coefficient"].item() == pytest.approx(expected)
    assert cosine < 0 and stats["l1_coefficient"].item() == pytest.approx(sae.run_cfg.sparsity_penalty / 0.1)


def test_self_attention_projects_queries_keys_and_values_from_the_latents_tokens():
    from plugins.freq_order import run_8_skip_projection

    sae, _ = build("run_9_latent_attention", d_sae=32)
    x = torch.randn(8, 64) * 3 + 1
    pre = run_8_skip_projection.SAE.pre_activation(sae, x)
    tokens = torch.relu(pre)[:, :, None] * sae.W_dec[None]  # (B, d_sae, d_in): what each latent writes
    query = tokens.sum(1) @ sae.W_query
    keys, values = tokens @ sae.W_key, tokens @ sae.W_value
    firing = pre > 0  # the sequence: the latents that write something for the token
    scores = (keys @ query[:, :, None]).squeeze(-1) / sae.hp.d_attn ** 0.5
    weights = torch.stack([torch.zeros(32).index_put((row,), torch.softmax(s[row], 0)) for s, row in zip(scores, firing)])
    context = (weights[:, :, None] * values).sum(1)
    expected = pre + sae.attention_scale * context @ sae.W_out
    torch.testing.assert_close(sae.pre_activation(x), expected)


def test_self_attention_weighs_only_the_latents_that_fire_and_a_token_with_none_attends_to_nothing():
    sae, _ = build("run_9_latent_attention")
    f0 = torch.relu(torch.randn(16, 256) - 2)  # about 2% of the latents fire per token
    f0[0] = 0.0  # a token on which nothing fires
    weights = sae.attention(f0, sae.decoder_weight()).detach()
    assert (weights[f0 == 0] == 0).all() and (weights[0] == 0).all()
    torch.testing.assert_close(weights[1:].sum(1), torch.ones(15))
    assert torch.isfinite(torch.autograd.grad(sae.attention(f0, sae.decoder_weight()).pow(2).sum(), sae.W_key)[0]).all()


@pytest.mark.e2e
def test_self_attention_trains_at_a_realistic_dictionary_size():
    # B x d_sae x d_sae would be 256 x 16384 x 16384 floats (275 GB): this only runs if the
    # attention never builds it.
    sae, trainer = build("run_9_latent_attention", d_sae=16384)
    total, out = trainer.step(torch.randn(256, 64) * 3 + 1, 0)
    assert torch.isfinite(total) and out.latents.shape == (256, 16384)
