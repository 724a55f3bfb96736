"""The JumpReLU baseline (plugins/baseline/run_0_jumprelu.py) is SAELens's JumpReLUTrainingSAE.

With the same fp32 weights and the same batch, our SAE and SAELens's training SAE (fed a
`TrainStepInput` as SAELens's trainer builds it: its scheduled `l0` coefficient and a dead-neuron
mask) give the same pre-activations, latents, reconstruction, loss terms and gradients, to 1e-5
relative (elementwise, with an absolute floor of 1e-5 of the tensor's largest value, for entries
that cancel to near zero). The names map explicitly: our `l2_loss` is SAELens's `mse_loss` (both
Σ over d_in, mean over the batch), our `sparsity_loss` is its `l0_loss`, and SAELens computes no
other term with its defaults (no `pre_act_loss`). Where a pre-activation lies within float
rounding of its threshold (or of the kernel's edge), either side of the jump is right; the tests
require there be none such in their data, so every comparison is exact-to-tolerance.

Our inference encoding (`sae.eval().encode`) is SAELens's inference `JumpReLUSAE.encode`, and
`experiment.save_sae` writes a `JumpReLUSAE` that `sae_lens.SAE.load_from_disk` loads and that
encodes and decodes real tiny-model activations as `ScaledSAE` does. Also held: the defaults are
the installed SAELens's (raw threshold parameter, "step" L0, no pre-activation loss, STE to the
threshold only), the threshold projection onto θ ≥ 0, and θ staying float32 in a bf16 SAE."""

import pytest
import torch
from helpers import assert_export_is_the_evaluated_sae, assert_same_state, exported, tiny_model_activations, trained_sae

import experiment

KEY = "baseline/run_0_jumprelu"
D_IN, D_SAE = 64, 256
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


def assert_close(ours, theirs, what, tol=1e-5):
    ours, theirs = ours.detach().float(), theirs.detach().float()
    floor = tol * theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=floor, msg=lambda m: f"{what}: {m}")


def jumprelu_sae(seed=1, d_in=D_IN, **hp):
    """Our SAE with random weights (decoder rows not unit-norm: nothing here relies on that) and
    thresholds spread over [0, 0.5], where a good share of pre-activations land near them."""
    plugin = experiment.find_plugin(KEY)
    cfg = experiment.build_config("tiny", KEY)
    torch.manual_seed(seed)
    sae = plugin.sae_class(d_in, D_SAE, plugin.hyperparams_class(**hp), cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, D_SAE) / d_in ** 0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, d_in) * 0.2)
        sae.b_enc.copy_(torch.randn(D_SAE) * 0.1)
        sae.b_dec.copy_(torch.randn(d_in) * 0.1)
        sae.threshold.copy_(torch.rand(D_SAE) * 0.5)
    return sae


def sae_lens_twin(sae):
    """SAELens's training SAE of the same configuration holding the same weights."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    hp = sae.hp
    twin = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, dtype="float32", device="cpu",
        jumprelu_bandwidth=hp.bandwidth, jumprelu_init_threshold=hp.init_threshold,
        l0_coefficient=hp.l0_coefficient, l0_warm_up_steps=hp.l0_warm_up_steps))
    twin.load_state_dict({k: getattr(sae, k).detach().clone() for k in PARAMS}, strict=True)
    return twin


def scheduled_l0_coefficient(hp, step):
    """The `l0` coefficient SAELens's trainer puts in the TrainStepInput of step `step`."""
    from sae_lens.training.optim import CoefficientScheduler

    scheduler = CoefficientScheduler(hp.l0_warm_up_steps, hp.l0_coefficient)
    for _ in range(step):
        scheduler.step()
    return scheduler.value


def no_ties(pre, threshold, bandwidth):
    """No pre-activation within 1e-6 (some 16 float32 steps at |pre| ~ 1, far more than the two
    implementations' pre-activations differ by) of its threshold or of the kernel's edges θ ± ε/2."""
    gap = (pre - threshold).abs()
    return not ((gap < 1e-6) | ((gap - bandwidth / 2).abs() < 1e-6)).any()


def batch(seed, n=128, d_in=D_IN):
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hp, step", [({}, 0), ({}, 9), (dict(bandwidth=0.1, l0_coefficient=0.3), 3),
                                      (dict(l0_coefficient=2.0, l0_warm_up_steps=4), 2)],
                         ids=["defaults", "defaults-later-step", "other-bandwidth-and-l0", "l0-warm-up"])
def test_a_training_pass_is_sae_lens_s_latents_reconstruction_loss_terms_and_gradients(hp, step):
    from sae_lens.saes.sae import TrainStepInput

    sae, x = jumprelu_sae(**hp).train(), batch(2)
    twin = sae_lens_twin(sae).train()
    coefficient = scheduled_l0_coefficient(sae.hp, step)
    dead = torch.rand(D_SAE, generator=torch.Generator().manual_seed(2)) < 0.3
    theirs = twin.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={"l0": coefficient}, dead_neuron_mask=dead, n_training_steps=step,
        is_logging_step=False))
    fwd = sae.training_pass(x, step)
    out = sae.loss(x, step)
    assert no_ties(fwd.pre, sae.threshold, sae.hp.bandwidth)
    assert 0 < (fwd.f > 0).float().mean() < 1 and (fwd.pre - sae.threshold).abs().lt(sae.hp.bandwidth / 2).any()

    assert_close(fwd.pre, theirs.hidden_pre, "pre-activations")
    assert_close(out.latents, theirs.feature_acts, "latents")
    assert_close(fwd.x_hat, theirs.sae_out, "reconstruction")
    assert set(out.terms) == {"l2_loss", "sparsity_loss"} and set(theirs.losses) == {"mse_loss", "l0_loss"}
    assert_close(out.terms["l2_loss"], theirs.losses["mse_loss"], "l2_loss vs mse_loss")
    assert_close(out.terms["sparsity_loss"], theirs.losses["l0_loss"], "sparsity_loss vs l0_loss")
    total = sum(out.terms.values())
    assert_close(total, theirs.loss, "total loss")

    total.backward()
    theirs.loss.backward()
    for name in PARAMS:
        assert_close(getattr(sae, name).grad, getattr(twin, name).grad, f"gradient of {name}")
    assert sae.threshold.grad.abs().sum() > 0


def test_the_l0_coefficient_warms_up_as_sae_lens_s_scheduler():
    sae, x = jumprelu_sae(l0_coefficient=3.0, l0_warm_up_steps=5), batch(3)
    fwd = sae.training_pass(x, 0)
    for step in range(9):
        fwd.step = step
        assert sae.sparsity_coefficient(fwd) == pytest.approx(scheduled_l0_coefficient(sae.hp, step), rel=1e-12)


def test_with_a_target_the_l0_penalty_is_dictionary_learning_s_pull_to_it():
    """λ·(mean L0/target − 1)² (JumpReluTrainer's loss), its θ gradient the step loss's through
    the chain rule; SAELens has no such mode, so there is no twin to bench against."""
    x, target = batch(4), 20.0
    step_mode, target_mode = jumprelu_sae(l0_coefficient=1.0), jumprelu_sae(l0_coefficient=0.3, target_l0=target)
    step_loss, target_loss = step_mode.loss(x, 0).terms["sparsity_loss"], target_mode.loss(x, 0).terms["sparsity_loss"]
    mean_l0 = (target_mode.training_pass(x, 0).pre > target_mode.threshold).sum(-1).float().mean()
    assert target_loss.item() == pytest.approx(0.3 * (mean_l0.item() / target - 1) ** 2, rel=1e-5)
    step_loss.backward()
    target_loss.backward()
    assert_close(target_mode.threshold.grad, 0.3 * 2 * (mean_l0 / target - 1) / target * step_mode.threshold.grad,
                 "θ's gradient")
    assert target_mode.sae_lens_training() is None


def test_the_inference_encoding_is_sae_lens_s_jumprelu_sae():
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = jumprelu_sae()
    with torch.no_grad():  # θ = 0 and θ < 0 included: inference is ReLU(pre)·H(pre − θ) whatever θ
        sae.threshold[:8] = 0.0
        sae.threshold[8:16] = -0.2
    inference = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu"))
    inference.load_state_dict({k: getattr(sae, k).detach().clone() for k in PARAMS}, strict=True)
    x = batch(4)
    sae.eval()
    with torch.no_grad():
        assert no_ties(sae.pre_activation(x), sae.threshold, sae.hp.bandwidth)
        f = sae.encode(x)
        assert_close(f, inference.encode(x), "inference latents")
        assert_close(sae.decode(f), inference.decode(f), "inference reconstruction")
        assert (f >= 0).all() and 0 < (f > 0).float().mean() < 1


def test_the_threshold_is_projected_onto_non_negative_values_as_sae_lens_does():
    """SAELens clamps θ at 0 in place before each training pass; we do it after each update."""
    from sae_lens.saes.sae import TrainStepInput

    sae, x = jumprelu_sae(), batch(5)
    with torch.no_grad():
        sae.threshold[:32] = -torch.rand(32) * 0.3
    twin = sae_lens_twin(sae).train()
    theirs = twin.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={"l0": 1.0}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False))
    sae.project_threshold()
    assert sae.threshold.min() == 0 and torch.equal(sae.threshold.detach(), twin.threshold.detach())
    assert_close(sae.train().loss(x, 0).latents, theirs.feature_acts, "latents after the projection")

    # Without the L0 term the reconstruction's gradient alone moves θ; Adam's ~lr step takes
    # some of these θ = 1e-6 below zero, and the update ends with them at exactly 0.
    unpenalised = jumprelu_sae(l0_coefficient=0.0)
    with torch.no_grad():
        unpenalised.threshold.fill_(1e-6)
    experiment.find_plugin(KEY).trainer_class(unpenalised, unpenalised.run_cfg).step(x, 0)
    assert unpenalised.threshold.min() == 0 and (unpenalised.threshold > 1e-6).any()


@pytest.mark.parametrize("tokens, lr, scale", [(8192, 1e-3, 4 / (1e-3 * 32)), (10_000_000, 1e-3, 1.0)])
def test_the_threshold_steps_fast_enough_to_travel_its_range_within_the_run(tokens, lr, scale):
    """Adam moves θ about lr per step whatever λ is: on a short run θ takes a rate that lets it
    travel THRESHOLD_TRAVEL (4) over the run, so that λ, not the run's length, sets L0."""
    plugin = experiment.find_plugin(KEY)
    cfg = experiment.build_config("tiny", KEY, tokens=tokens, lr=lr, warmup_steps=0)
    sae = plugin.sae_class(D_IN, D_SAE, plugin.hyperparams_class(), cfg)
    before = sae.threshold.detach().clone()
    plugin.trainer_class(sae, cfg).step(batch(7), 0)
    moved = (sae.threshold.detach() - before).abs()
    assert moved.max() == pytest.approx(scale * lr, rel=0.05)  # Adam's first step is lr · sign(g)


def test_the_threshold_stays_float32_in_a_bfloat16_sae():
    """Adam's ~lr steps on θ would round away in bfloat16 (θ = 1 has a bf16 spacing of 2⁻⁷);
    as in SAELens, θ is float32 whatever .to(dtype) asks, and is cast only where compared."""
    sae = jumprelu_sae()
    twin = sae_lens_twin(sae)
    sae.to(dtype=torch.bfloat16)
    twin.to(dtype=torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16 and twin.W_enc.dtype == torch.bfloat16
    assert sae.threshold.dtype == torch.float32 and twin.threshold.dtype == torch.float32
    x = batch(6).to(torch.bfloat16)
    out = sae.train().loss(x, 0)
    assert out.latents.dtype == torch.bfloat16
    sum(out.terms.values()).backward()
    assert sae.threshold.grad.dtype == torch.float32 and sae.threshold.grad.abs().sum() > 0
    with torch.no_grad():
        sae.threshold.fill_(1.0).add_(1e-3)  # below bf16's resolution at 1
    assert (sae.threshold > 1.0).all()


def test_defaults_are_the_installed_sae_lens_s():
    """Raw threshold (not log θ), bandwidth 0.05, θ₀ = 0.01, "step" L0, no pre-activation loss,
    the estimator's gradient to θ only, no L0 warm-up; λ is ours to choose (SAELens's is 1.0)."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    theirs = JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)
    ours = experiment.find_plugin(KEY).hyperparams_class()
    assert (ours.bandwidth, ours.init_threshold, ours.l0_warm_up_steps) == \
        (theirs.jumprelu_bandwidth, theirs.jumprelu_init_threshold, theirs.l0_warm_up_steps)
    assert theirs.jumprelu_sparsity_loss_mode == "step" and theirs.pre_act_loss_coefficient is None
    assert theirs.jumprelu_ste_to_input is False
    names = dict(JumpReLUTrainingSAE(theirs).named_parameters())
    assert "threshold" in names and "log_threshold" not in names
    sae = jumprelu_sae()
    fresh = experiment.find_plugin(KEY).sae_class(D_IN, D_SAE, ours, sae.run_cfg)
    assert torch.equal(fresh.threshold, torch.full((D_SAE,), ours.init_threshold))


def test_the_bench_hook_gives_sae_lens_s_twin_and_coefficients():
    sae = jumprelu_sae(bandwidth=0.07, l0_coefficient=0.4, l0_warm_up_steps=3)
    hooked, coefficients = sae.sae_lens_training()
    twin = sae_lens_twin(sae)
    assert type(hooked) is type(twin) and coefficients == {"l0": 0.4}
    for field in ("jumprelu_bandwidth", "jumprelu_init_threshold", "l0_coefficient", "l0_warm_up_steps",
                  "jumprelu_sparsity_loss_mode", "pre_act_loss_coefficient", "jumprelu_ste_to_input"):
        assert getattr(hooked.cfg, field) == getattr(twin.cfg, field), field
    assert_same_state(hooked, twin)


@pytest.mark.e2e
def test_export_loads_in_sae_lens_as_jumprelu_and_equals_the_evaluated_sae(tmp_path):
    from sae_lens import JumpReLUSAE

    acts = tiny_model_activations(16).reshape(-1, D_IN)
    sae, scale = trained_sae(KEY, acts, D_SAE)
    assert sae.threshold.std() > 0 and sae.threshold.min() >= 0 and sae.b_dec.abs().max() > 0
    loaded = exported(sae, scale, tmp_path, "jumprelu")
    assert type(loaded) is JumpReLUSAE
    assert torch.equal(loaded.threshold.detach(), sae.threshold.detach())
    with torch.no_grad():
        assert no_ties(sae.pre_activation(acts * scale), sae.threshold, sae.hp.bandwidth)
    assert_export_is_the_evaluated_sae(loaded, sae, scale, acts, close=assert_close)
