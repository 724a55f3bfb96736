"""The Gated SAE baseline (plugins/baseline/run_0_gated.py) against SAELens's own implementation.

SAELens's `GatedTrainingSAE`, built here with the same fp32 weights, is fed the same batch through
`training_forward_pass(TrainStepInput(...))` as SAELens's trainer feeds it. Names mapped:

    ours                               SAELens
    b_enc                              b_gate (the gated SAEs have no b_enc)
    l2_loss                            mse_loss (both Σ over d_in, mean over the batch)
    sparsity_loss                      l1_loss (λ Σ ReLU(π_gate)·‖W_dec,i‖, coefficients["l1"] = λ)
    auxiliary_reconstruction_loss      auxiliary_reconstruction_loss

SAELens's `hidden_pre` is the magnitude pre-activation, our `Forward.pre` the gate's: not
compared as such (the latents and the loss terms built from each are).

One difference, on purpose: the auxiliary reconstruction goes through a frozen decoder (the
paper's x̂_frozen), SAELens's does not detach it. Values are equal; the gradients of W_enc, b_gate,
r_mag and b_mag equal SAELens's for its whole loss; those of W_dec and b_dec equal SAELens's less
what its auxiliary term sends through the decoder (W_dec, and b_dec as the decoder's bias; b_dec
as the encoder's centring keeps its share), and the test checks that this part is not zero.
Every comparison is to 1e-5 relative (in norm, over the whole tensor)."""

import pytest
import torch
from helpers import (assert_close_in_norm, assert_export_is_the_evaluated_sae, assert_same_state, exported,
                     tiny_model_activations, trained_sae)

import experiment

KEY = "baseline/run_0_gated"
D_IN, D_SAE = 64, 256


def gated_sae(seed=0):
    """Our gated SAE with every parameter away from its initial value (decoder rows off the unit
    sphere, so the ‖W_dec,i‖ weight of the L1 is exercised)."""
    plugin = experiment.find_plugin(KEY)
    torch.manual_seed(seed)
    sae = plugin.sae_class(D_IN, D_SAE, plugin.hyperparams_class(), experiment.build_config("tiny", KEY))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
        sae.W_enc.copy_(sae.W_dec.T + 0.05 * torch.randn(D_IN, D_SAE))
        for name, spread in (("b_enc", 0.5), ("b_dec", 0.3), ("r_mag", 0.3), ("b_mag", 0.5)):
            getattr(sae, name).copy_(spread * torch.randn_like(getattr(sae, name)))
    return sae


def sae_lens_twin(sae):
    """SAELens's GatedTrainingSAE holding our weights, built independently of the plugin's hook."""
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig

    ref = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu",
                                                  l1_coefficient=sae.run_cfg.sparsity_penalty))
    with torch.no_grad():
        for ours, theirs in (("W_enc", "W_enc"), ("b_enc", "b_gate"), ("r_mag", "r_mag"), ("b_mag", "b_mag"),
                             ("W_dec", "W_dec"), ("b_dec", "b_dec")):
            getattr(ref, theirs).copy_(getattr(sae, ours))
    return ref


def batch(seed=1, n=512):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=gen) * 3 + 1


def sae_lens_step(ref, x, step):
    from sae_lens.saes.sae import TrainStepInput

    dead = torch.rand(D_SAE, generator=torch.Generator().manual_seed(2)) < 0.3  # unused by the gated loss
    return ref.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={"l1": ref.cfg.l1_coefficient}, dead_neuron_mask=dead, n_training_steps=step,
        is_logging_step=False))


def test_training_latents_reconstruction_and_loss_terms_equal_sae_lens():
    sae = gated_sae()
    ref = sae_lens_twin(sae)
    x = batch()
    out, theirs = sae.train().loss(x, 7), sae_lens_step(ref.train(), x, 7)
    assert 0 < (out.latents > 0).float().mean() < 1  # some latents gated off, some on
    assert torch.equal(out.latents > 0, theirs.feature_acts > 0)
    assert_close_in_norm(out.latents, theirs.feature_acts, "latents")
    assert_close_in_norm(sae.decode(out.latents), theirs.sae_out, "reconstruction")
    assert set(out.terms) == {"l2_loss", "sparsity_loss", "auxiliary_reconstruction_loss"}
    assert set(theirs.losses) == {"mse_loss", "l1_loss", "auxiliary_reconstruction_loss"}
    for ours_name, their_name in (("l2_loss", "mse_loss"), ("sparsity_loss", "l1_loss"),
                                  ("auxiliary_reconstruction_loss", "auxiliary_reconstruction_loss")):
        assert_close_in_norm(out.terms[ours_name], theirs.losses[their_name], ours_name)
    assert_close_in_norm(sum(out.terms.values()), theirs.loss, "total loss")


def aux_gradient_through_the_decoder(ref, x):
    """What SAELens's auxiliary term sends into W_dec and b_dec through its (un-frozen) decoder
    x̂_gate = ReLU(π_gate) W_dec + b_dec alone: leaf copies of the two stand in for the decoder
    there, every other tensor is SAELens's own, without gradient."""
    W_dec, b_dec = (ref.W_dec.detach().clone().requires_grad_(), ref.b_dec.detach().clone().requires_grad_())
    gate = torch.relu((x - ref.b_dec.detach()) @ ref.W_enc.detach() + ref.b_gate.detach())
    aux = (gate @ W_dec + b_dec - x).pow(2).sum(-1).mean()
    return torch.autograd.grad(aux, [W_dec, b_dec])


def test_gradients_equal_sae_lens_with_the_auxiliary_decoder_frozen():
    sae = gated_sae()
    ref = sae_lens_twin(sae)
    x = batch()
    out, theirs = sae.train().loss(x, 0), sae_lens_step(ref.train(), x, 0)
    sum(out.terms.values()).backward()
    params = [ref.W_enc, ref.b_gate, ref.r_mag, ref.b_mag, ref.W_dec, ref.b_dec]
    whole = dict(zip(("W_enc", "b_enc", "r_mag", "b_mag", "W_dec", "b_dec"),
                     torch.autograd.grad(theirs.loss, params)))
    for name in ("W_enc", "b_enc", "r_mag", "b_mag"):
        assert_close_in_norm(getattr(sae, name).grad, whole[name], f"grad {name}")
    # b_dec also centres the encoder's input: that part of the auxiliary gradient stays, as in the paper.
    for name, through_decoder in zip(("W_dec", "b_dec"), aux_gradient_through_the_decoder(ref, x)):
        assert_close_in_norm(getattr(sae, name).grad, whole[name] - through_decoder, f"grad {name}")
        # The frozen decoder is a real difference: SAELens's auxiliary term moves the decoder.
        assert (getattr(sae, name).grad - whole[name]).norm() > 1e-3 * whole[name].norm()


def test_inference_encoding_equals_sae_lens():
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig

    sae = gated_sae()
    ref = sae_lens_twin(sae).eval()
    inference = GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu"))
    inference.load_state_dict(ref.state_dict())
    x = batch(seed=3)
    with torch.no_grad():
        f = sae.eval().encode(x)
        assert_close_in_norm(f, ref.encode(x), "eval encode vs GatedTrainingSAE")
        assert_close_in_norm(f, inference.encode(x), "eval encode vs GatedSAE")
        assert_close_in_norm(sae.decode(f), inference.decode(f), "decode vs GatedSAE")


def test_the_bench_hook_gives_sae_lens_twin_and_coefficients():
    sae = gated_sae()
    hooked, coefficients = sae.sae_lens_training()
    twin = sae_lens_twin(sae)
    assert type(hooked) is type(twin) and coefficients == {"l1": sae.run_cfg.sparsity_penalty}
    assert hooked.cfg.l1_coefficient == twin.cfg.l1_coefficient
    assert_same_state(hooked, twin)


@pytest.mark.e2e
def test_export_loads_in_sae_lens_as_gated_and_equals_the_evaluated_sae(tmp_path):
    from sae_lens import GatedSAE

    acts = tiny_model_activations(16).reshape(-1, D_IN)
    sae, scale = trained_sae(KEY, acts, D_SAE)
    assert sae.r_mag.abs().max() > 0 and sae.b_mag.abs().max() > 0 and sae.b_enc.abs().max() > 0
    loaded = exported(sae, scale, tmp_path, "gated")
    assert type(loaded) is GatedSAE
    assert_export_is_the_evaluated_sae(loaded, sae, scale, acts)
