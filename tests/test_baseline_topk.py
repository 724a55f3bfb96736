"""The TopK SAE baseline (plugins/baseline/run_0_topk.py) against SAELens's own implementation.

SAELens's `TopKTrainingSAE`, built here with the same fp32 weights and the plugin's k and AuxK
coefficient, is fed the same batch through `training_forward_pass(TrainStepInput(...))` as
SAELens's trainer feeds it, with the dead-latent mask its trainer would pass: `SAETrainer.
dead_neurons`, i.e. `n_forward_passes_since_fired > dead_feature_window`, from the same counts.
Names mapped:

    ours                               SAELens
    l2_loss                            mse_loss (both Σ over d_in, mean over the batch)
    auxiliary_reconstruction_loss      auxiliary_reconstruction_loss (AuxK, coefficient and scale in)
    sparsity_loss                      none: TopK has no sparsity penalty, so ours is exactly 0 (or,
                                       should the harness let a plugin leave the term out, absent)
    steps_since_fired, dead_steps      n_forward_passes_since_fired, dead_feature_window

Ours logs the AuxK term only from step dead_steps + 1 (before that no latent can be dead and
SAELens's term is 0 too); the comparisons run at a later step, and the training test checks the
term's first step. SAELens trains with `rescale_acts_by_decoder_norm=True` by default, we keep
decoder rows at unit norm: both settings are compared on our unit-norm rows; with the rescaling
SAELens's W_dec gradient has extra components along each row, which our trainer projects out, so
W_dec's gradients are compared after that projection on both sides.
Every comparison is to 1e-5 relative (in norm, over the whole tensor); latent supports exactly."""

import json

import pytest
import torch
from helpers import assert_close_in_norm

import experiment
import sources
import evals
from runs import save_sae

KEY = "baseline/run_0_topk"
D_IN, D_SAE = 64, 256
DEAD_STEPS, STEP = 10, 20


def topk_sae(n_dead=0, seed=0, **hyperparams):
    """Our TopK SAE with its biases and encoder away from their initial values (decoder rows unit,
    as our trainer keeps them) and n_dead latents past the dead window (`steps_since_fired`)."""
    plugin = experiment.find_plugin(KEY)
    torch.manual_seed(seed)
    hp = plugin.hyperparams_class(**{"dead_steps": DEAD_STEPS, **hyperparams})
    sae = plugin.sae_class(D_IN, D_SAE, hp, experiment.build_config("tiny", KEY))
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_dec.T + 0.05 * torch.randn(D_IN, D_SAE))
        sae.b_enc.copy_(0.5 * torch.randn(D_SAE) - 2.0)  # some tokens' top k reach below 0: ReLU'd away
        sae.b_dec.copy_(0.3 * torch.randn(D_IN))
        counts = torch.randint(0, DEAD_STEPS + 1, (D_SAE,))  # the window's edge, DEAD_STEPS, is not dead
        counts[torch.randperm(D_SAE)[:n_dead]] = DEAD_STEPS + 1 + torch.randint(0, STEP - DEAD_STEPS, (n_dead,))
        sae.steps_since_fired.copy_(counts)
    return sae


def sae_lens_twin(sae, rescale=False):
    """SAELens's TopKTrainingSAE holding our weights, built independently of the plugin's hook."""
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    ref = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=sae.hp.k, aux_loss_coefficient=sae.hp.aux_loss_coefficient,
        rescale_acts_by_decoder_norm=rescale, dtype="float32", device="cpu"))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(ref, name).copy_(getattr(sae, name))
    return ref


def sae_lens_dead_mask(counts, window):
    """SAETrainer.dead_neurons, on SAELens's float counters."""
    return (counts.float() > window).bool()


def sae_lens_step(ref, x, dead, step):
    from sae_lens.saes.sae import TrainStepInput

    return ref.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                    n_training_steps=step, is_logging_step=False))


def batch(seed=1, n=512):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=gen) * 3 + 1


def along_the_sphere(grad, w_dec):
    """A W_dec gradient less its component along each (unit) row: what our trainer steps along."""
    return grad - (grad * w_dec).sum(1, keepdim=True) * w_dec


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescaled"])
@pytest.mark.parametrize("n_dead", [0, 5, 100], ids=["none_dead", "fewer_dead_than_k_aux", "more_dead"])
def test_training_latents_reconstruction_loss_terms_and_gradients_equal_sae_lens(n_dead, rescale):
    sae = topk_sae(n_dead)
    ref = sae_lens_twin(sae, rescale)
    dead = sae_lens_dead_mask(sae.steps_since_fired, DEAD_STEPS)
    assert dead.sum() == n_dead
    x = batch()
    fwd = sae.train().training_pass(x, STEP)
    out, theirs = sae.loss(x, STEP), sae_lens_step(ref.train(), x, dead, STEP)
    assert torch.equal(out.latents > 0, theirs.feature_acts > 0)
    l0 = (out.latents > 0).sum(-1)
    assert l0.max() == sae.hp.k and l0.min() < sae.hp.k  # the k largest, and the ReLU of them
    assert_close_in_norm(out.latents, theirs.feature_acts, "latents")
    assert_close_in_norm(fwd.x_hat, theirs.sae_out, "reconstruction")
    terms = dict(out.terms)
    assert terms.pop("sparsity_loss", torch.zeros(())).item() == 0.0  # no such penalty: zero, or no term at all
    assert set(terms) == {"l2_loss", "auxiliary_reconstruction_loss"}
    assert set(theirs.losses) == {"mse_loss", "auxiliary_reconstruction_loss"}
    assert_close_in_norm(out.terms["l2_loss"], theirs.losses["mse_loss"], "l2_loss")
    aux = out.terms["auxiliary_reconstruction_loss"]
    assert_close_in_norm(aux, theirs.losses["auxiliary_reconstruction_loss"], "auxiliary_reconstruction_loss")
    assert (aux > 0) == (n_dead > 0) and out.stats["auxk_dead"].item() == n_dead
    assert_close_in_norm(sum(out.terms.values()), theirs.loss, "total loss")

    sum(out.terms.values()).backward()
    theirs.loss.backward()
    for name in ("W_enc", "b_enc", "b_dec"):
        assert_close_in_norm(getattr(sae, name).grad, getattr(ref, name).grad, f"grad {name}")
    ours_w, theirs_w = sae.W_dec.grad, ref.W_dec.grad
    if rescale:
        ours_w, theirs_w = along_the_sphere(ours_w, sae.W_dec), along_the_sphere(theirs_w, sae.W_dec)
    assert_close_in_norm(ours_w, theirs_w, "grad W_dec")


def test_inference_encoding_equals_sae_lens_and_the_training_encoding():
    from sae_lens import TopKSAE, TopKSAEConfig

    sae = topk_sae()
    x = batch(seed=3)
    with torch.no_grad():
        trained = sae.train().encode(x)
        ours = sae.eval().encode(x)
        for rescale in (False, True):
            theirs = sae_lens_twin(sae, rescale).eval().encode(x)
            assert torch.equal(ours > 0, theirs > 0)
            assert_close_in_norm(ours, theirs, f"eval encoding, training SAE (rescale {rescale})")
        inference = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=sae.hp.k, dtype="float32", device="cpu"))
        inference.load_state_dict({n: getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec")})
        theirs = inference.encode(x)
    assert torch.equal(ours > 0, theirs > 0)
    assert_close_in_norm(ours, theirs, "eval encoding, inference TopKSAE")
    assert torch.equal(trained, ours)


def test_training_passes_sae_lens_trainers_dead_mask_from_before_each_step():
    """Our Trainer for a few steps against SAELens's twin of each step's weights, given the mask
    SAELens's trainer keeps (counts from the steps before, updated from the step's latents): the
    AuxK term appears at step dead_steps + 1 and equals SAELens's from there."""
    dead_steps = 2
    sae = topk_sae(dead_steps=dead_steps)
    with torch.no_grad():
        sae.steps_since_fired.zero_()
        sae.b_enc[:20] = -20.0  # these never make a token's top k: dead after the window
    trainer = experiment.find_plugin(KEY).trainer_class(sae, sae.run_cfg)
    counts = torch.zeros(D_SAE)  # SAETrainer.n_forward_passes_since_fired
    seen_aux = []
    for step in range(8):
        x = batch(seed=10 + step, n=128)
        dead = sae_lens_dead_mask(counts, dead_steps)
        with torch.no_grad():
            theirs = sae_lens_step(sae_lens_twin(sae).train(), x, dead, step)
        _, out = trainer.step(x, step)
        assert torch.equal(out.latents > 0, theirs.feature_acts > 0)
        if step <= dead_steps:
            assert "auxiliary_reconstruction_loss" not in out.terms and not dead.any()
        else:
            aux = out.terms["auxiliary_reconstruction_loss"]
            assert_close_in_norm(aux, theirs.losses["auxiliary_reconstruction_loss"], f"AuxK at step {step}")
            seen_aux.append(aux.item())
        counts += 1
        counts[(theirs.feature_acts > 0).any(0)] = 0
        assert torch.equal(sae.dead_latents(), sae_lens_dead_mask(counts, dead_steps))
    assert len(seen_aux) == 8 - dead_steps - 1 and all(a > 0 for a in seen_aux)
    assert sae.dead_latents()[:20].all()


def tiny_activations():
    """A few rows of the tiny model's layer-1 residual stream, as the harness harvests them."""
    model = sources.load_model("tiny", torch.device("cpu"))
    tokens = sources.synthetic_contexts(4, 32, model.cfg.d_vocab)
    hook = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook]  # (4, 32, d_model)


@pytest.mark.e2e
def test_export_loads_in_sae_lens_as_topk_and_encodes_and_decodes_like_the_evaluated_sae(tmp_path):
    import sae_lens
    from sae_lens import TopKSAE

    acts = tiny_activations()
    flat = acts.reshape(-1, acts.shape[-1])
    scale = sources.activation_scale(flat.numpy())
    plugin = experiment.find_plugin(KEY)
    torch.manual_seed(0)
    sae = plugin.sae_class(flat.shape[1], D_SAE, plugin.hyperparams_class(dead_steps=1),
                           experiment.build_config("tiny", KEY))
    trainer = plugin.trainer_class(sae, sae.run_cfg)
    for step in range(4):  # the weights move, AuxK included
        trainer.step(flat * scale, step)
    assert save_sae(sae, scale, tmp_path) == {"architecture": "topk", "exact": True}
    assert json.loads((tmp_path / "cfg.json").read_text())["metadata"]["harness_export"] == "exact"
    loaded = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(loaded) is TopKSAE and loaded.cfg.k == sae.hp.k
    scaled = evals.ScaledSAE(sae.eval(), scale)
    with torch.no_grad():
        ours, theirs = scaled.encode(acts), loaded.encode(acts)
        assert torch.equal(ours > 0, theirs > 0) and (ours > 0).sum(-1).float().mean() > 0.9 * sae.hp.k
        assert_close_in_norm(ours, theirs, "encode")
        assert_close_in_norm(scaled.decode(ours), loaded.decode(ours), "decode")
        assert_close_in_norm(scaled(acts), loaded(acts), "forward")


def test_sae_lens_training_hook_is_the_twin_and_a_changed_formula_is_not_topk(tmp_path):
    from sae_lens.saes.topk_sae import TopKTrainingSAE

    sae = topk_sae()
    ref, coefficients = sae.sae_lens_training()
    assert type(ref) is TopKTrainingSAE and coefficients == {}
    assert (ref.cfg.k, ref.cfg.aux_loss_coefficient) == (64, 1 / 32) and sae.hp.dead_steps == DEAD_STEPS
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(ref, name), getattr(sae, name))
    assert experiment.find_plugin(KEY).hyperparams_class().dead_steps == 0  # the run's window (test_initialisation)

    class Shifted(type(sae)):
        def activation(self, pre, x):
            return super().activation(pre - 0.1, x)

    child = Shifted(D_IN, D_SAE, sae.hp, sae.run_cfg)
    assert child.sae_lens_training() is None
    assert save_sae(child, 1.0, tmp_path) == {"architecture": "topk", "exact": False}
