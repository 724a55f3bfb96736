"""The BatchTopK baseline (plugins/baseline/run_0_batchtopk.py) against SAELens's own implementation.

SAELens's `BatchTopKTrainingSAE`, built here with the same fp32 weights and θ, is fed the same
batches through `training_forward_pass(TrainStepInput(...))` as SAELens's trainer feeds it, with
the dead-latent mask SAELens's trainer would pass: its `n_forward_passes_since_fired` counts,
kept here exactly as `SAETrainer._train_step` keeps them, with `dead_feature_window` = our
`dead_steps` (4 in these tests, so that latents die within a few passes). Names mapped:

    ours                            SAELens
    l2_loss                         mse_loss (both Σ over d_in, mean over the batch)
    auxiliary_reconstruction_loss   auxiliary_reconstruction_loss (AuxK; coefficients = {}, as
                                    SAELens's TopK); ours is absent up to step dead_steps, where
                                    nothing can be dead and SAELens's is exactly 0
    (no sparsity_loss)              (BatchTopK has no sparsity penalty)
    topk_threshold                  topk_threshold (float64 buffer, updated in every training pass)

Two SAELens twins: one with `rescale_acts_by_decoder_norm = False` (the formula the plugin
computes, since the harness keeps decoder rows at unit norm) and the bench hook's, SAELens's
default `True`, which multiplies pre-activations by ‖W_dec,i‖ = 1 and divides them out again:
the same latents, losses and θ, and the same gradients along the unit sphere (the norm's own
gradient is radial, and the harness projects radial gradients out). SAELens's training SAE in eval
mode still takes the batch's top k·B; its inference model is the JumpReLU SAE its
`save_inference_model` writes, θ in every latent: that is what our `sae.eval()` is compared with.
Every comparison is to 1e-5 relative (in norm, over the whole tensor); supports are compared
exactly. Every check runs on the Matryoshka baseline too, which builds on this one
(tests/test_baseline_matryoshka.py tests its prefixes)."""

import pytest
import torch
from helpers import (PARITY_D_IN, PARITY_D_SAE, PARAMS, assert_close_in_norm, assert_export_is_the_evaluated_sae,
                     assert_same_state, batch, exported, make_sae, sae_lens_pass, sae_lens_twin,
                     tiny_model_activations, trained_sae)
from safetensors.torch import load_file

import experiment
import sources

FAMILY = ["baseline/run_0_batchtopk", "baseline/run_0_matryoshka"]
D_IN, D_SAE = PARITY_D_IN, PARITY_D_SAE


def train_and_held_activations() -> tuple[torch.Tensor, torch.Tensor]:
    """Real activations of the tiny model at blocks.1.hook_resid_post, BOS dropped as in harvest,
    in the model's scale: (train, held-out) rows of the same synthetic text."""
    acts = tiny_model_activations(288)
    return acts[:256].reshape(-1, D_IN), acts[256:].reshape(-1, D_IN)


class SAELensDeadCounts:
    """SAELens's trainer's dead-latent bookkeeping (SAETrainer.dead_neurons and _train_step)."""

    def __init__(self, window, start):
        self.window, self.n_forward_passes_since_fired = window, start.float().clone()

    def dead_neurons(self):
        return (self.n_forward_passes_since_fired > self.window).bool()

    def after_step(self, feature_acts):
        did_fire = feature_acts.bool().float().sum(-2).bool()
        self.n_forward_passes_since_fired += 1
        self.n_forward_passes_since_fired[did_fire] = 0


AUXK = "auxiliary_reconstruction_loss"


def compare_pass(sae, out, theirs, x):
    """Latents, pre-activations, reconstruction, every term and the total. No sparsity_loss;
    where ours has no AuxK term yet (step ≤ dead_steps), SAELens's is exactly 0."""
    assert torch.equal(out.latents > 0, theirs.feature_acts > 0), "latent supports"
    assert_close_in_norm(out.latents, theirs.feature_acts, "latents")
    assert_close_in_norm(sae.pre_activation(x), theirs.hidden_pre, "pre-activations")
    assert_close_in_norm(sae.decode(out.latents), theirs.sae_out, "reconstruction")
    names = {"l2_loss": "mse_loss", **{name: name for name in out.terms if name != "l2_loss"}}
    assert "sparsity_loss" not in out.terms and set(theirs.losses) == set(names.values()) | {AUXK}
    for ours_name, their_name in names.items():
        assert_close_in_norm(out.terms[ours_name], theirs.losses[their_name], ours_name)
    if AUXK not in out.terms:
        assert theirs.losses[AUXK].item() == 0
    assert_close_in_norm(sum(out.terms.values()), theirs.loss, "total loss")


def run_side_by_side(sae, refs, steps=8, first_dead=(), first_step=100):
    """`steps` training passes (no update; the dead counters moved as the trainer's after_step moves them) of ours and of
    each SAELens twin on the same batches, numbered from `first_step`, with SAELens's trainer's
    dead mask; returns the AuxK values seen (None: no such term) and the dead counts."""
    start = torch.zeros(D_SAE)
    start[list(first_dead)] = 100
    sae.steps_since_fired.copy_(start.long())
    counts = SAELensDeadCounts(sae.hp.dead_steps, start)
    aux, n_dead = [], []
    for i in range(steps):
        step, x, dead = first_step + i, batch(i), counts.dead_neurons()
        assert torch.equal(sae.dead_latents(), dead), f"step {step}: the dead mask is not SAELens's trainer's"
        out = sae.train().loss(x, step)
        sae.update_dead_counters()
        for ref in refs:
            theirs = sae_lens_pass(ref, x, step, dead)
            compare_pass(sae, out, theirs, x)
            assert_close_in_norm(sae.topk_threshold, ref.topk_threshold, "θ after the pass")
        counts.after_step(theirs.feature_acts)
        aux.append(out.terms[AUXK].item() if AUXK in out.terms else None)
        n_dead.append(int(dead.sum()))
    return aux, n_dead


@pytest.mark.e2e
@pytest.mark.parametrize("first_dead", [range(10), range(60)], ids=["few_dead", "many_dead"])
@pytest.mark.parametrize("key", FAMILY, ids=["batchtopk", "matryoshka"])
def test_training_passes_equal_sae_lens_with_its_trainers_dead_mask(key, first_dead):
    """Past step dead_steps (4 here), dead at the start: 10 latents (AuxK scaled by 10/32) or 60
    (more than k_aux = 32); they fire and revive, then the 8 never-firing latents go dead once
    they have not fired in dead_steps steps."""
    sae = make_sae(key, dead_steps=4)
    refs = [sae_lens_twin(sae, rescale=False), sae_lens_twin(sae, rescale=True)]
    aux, n_dead = run_side_by_side(sae, refs, first_dead=first_dead)
    assert n_dead[0] == len(first_dead) and n_dead[4] == 0 and n_dead[5] == 8
    assert aux[0] > 0 and aux[4] == 0 and aux[5] > 0
    assert sae.topk_threshold > 0


@pytest.mark.e2e
@pytest.mark.parametrize("key", FAMILY, ids=["batchtopk", "matryoshka"])
def test_auxk_is_neither_computed_nor_logged_before_anything_can_be_dead(key):
    """From step 0, nothing can be dead before step dead_steps + 1 (SAELens's AuxK is 0 there);
    the never-firing latents are dead from then on, and the term is SAELens's."""
    sae = make_sae(key, dead_steps=4)
    aux, n_dead = run_side_by_side(sae, [sae_lens_twin(sae, rescale=False)], steps=7, first_step=0)
    assert aux[:5] == [None] * 5 and n_dead[:5] == [0] * 5
    assert n_dead[5:] == [8, 8] and aux[5] > 0 and aux[6] > 0


def radial_free(grad, W_dec):
    """The decoder gradient along the unit sphere (what the harness's step uses)."""
    return grad - (grad * W_dec).sum(1, keepdim=True) * W_dec


@pytest.mark.parametrize("key", FAMILY, ids=["batchtopk", "matryoshka"])
def test_gradients_equal_sae_lens(key):
    """Every parameter's gradient of the total, with dead latents in the AuxK term."""
    sae = make_sae(key, dead_steps=4)
    refs = {rescale: sae_lens_twin(sae, rescale) for rescale in (False, True)}
    x, dead = batch(0), torch.arange(D_SAE) < 40
    sae.steps_since_fired.copy_(dead.long() * 100)
    out = sae.train().loss(x, 100)
    assert torch.equal(sae.dead_latents(), dead) and out.terms[AUXK] > 0
    sum(out.terms.values()).backward()
    for rescale, ref in refs.items():
        theirs = sae_lens_pass(ref, x, 0, dead)
        grads = dict(zip(PARAMS, torch.autograd.grad(theirs.loss, [getattr(ref, n) for n in PARAMS])))
        for name in ("W_enc", "b_enc", "b_dec"):
            assert_close_in_norm(getattr(sae, name).grad, grads[name], f"grad {name} (rescale {rescale})")
        W_dec = sae.W_dec.detach()
        if rescale:  # ‖W_dec,i‖'s own gradient is radial: compare along the sphere
            assert_close_in_norm(radial_free(sae.W_dec.grad, W_dec), radial_free(grads["W_dec"], W_dec), "grad W_dec")
        else:
            assert_close_in_norm(sae.W_dec.grad, grads["W_dec"], "grad W_dec")


@pytest.mark.e2e
@pytest.mark.parametrize("key", FAMILY, ids=["batchtopk", "matryoshka"])
def test_inference_encoding_equals_sae_lens_saved_inference_model(key, tmp_path):
    """After a few training passes (θ > 0), SAELens's own conversion to its inference model (a
    JumpReLU SAE) encodes and decodes as our eval-mode SAE."""
    from sae_lens import SAE as SAELensSAE
    from sae_lens import JumpReLUSAE

    sae = make_sae(key, dead_steps=4)
    ref = sae_lens_twin(sae, rescale=False)
    run_side_by_side(sae, [ref], steps=6)
    ref.save_inference_model(tmp_path)
    inference = SAELensSAE.load_from_disk(tmp_path)
    assert type(inference) is JumpReLUSAE
    assert torch.equal(inference.threshold, torch.full((D_SAE,), sae.topk_threshold.item()))
    x = batch(100, n=512)
    with torch.no_grad():
        f = sae.eval().encode(x)
        assert 0 < (f > 0).float().mean() < 1
        assert torch.equal(f > 0, inference.encode(x) > 0)
        assert_close_in_norm(f, inference.encode(x), "eval encode vs SAELens's JumpReLUSAE")
        assert_close_in_norm(sae.decode(f), inference.decode(f), "decode vs SAELens's JumpReLUSAE")


@pytest.mark.parametrize("key", FAMILY, ids=["batchtopk", "matryoshka"])
def test_the_bench_hook_gives_sae_lens_twin_and_no_coefficients(key):
    sae = make_sae(key)
    sae.topk_threshold.fill_(0.25)
    hooked, coefficients = sae.sae_lens_training()
    twin = sae_lens_twin(sae, rescale=True)
    assert type(hooked) is type(twin) and coefficients == {}
    fields = ("k", "topk_threshold_lr", "aux_loss_coefficient", "rescale_acts_by_decoder_norm", "matryoshka_widths")
    for field in fields:
        assert getattr(hooked.cfg, field, None) == getattr(twin.cfg, field, None), field
    assert_same_state(hooked, twin)


def l0(f):
    return (f > 0).float().sum(-1).mean().item()


@pytest.mark.e2e
@pytest.mark.parametrize("key", FAMILY, ids=["batchtopk", "matryoshka"])
def test_inference_l0_is_k_once_the_threshold_has_converged(key):
    """Training and inference encodings agree in expectation. θ starts at 0 (an eval-mode SAE
    then fires like a ReLU SAE, far above k: evaluating before θ has converged is the trap); after
    training, and enough training-mode passes for θ's running mean (rate 0.01) to settle on the
    final weights, the JumpReLU encoding of held-out tokens fires k latents per token to within
    5% (θ is E[a batch's smallest kept activation], not the cut-off of any one batch, so not
    exactly k), keeps the latents training would keep, and reconstructs as well."""
    train, held = train_and_held_activations()
    scale = sources.activation_scale(train.numpy())
    train, held = train * scale, held * scale
    plugin, cfg = experiment.find_plugin(key), experiment.build_config("tiny", key)
    torch.manual_seed(0)
    sae = plugin.sae_class(D_IN, D_SAE, plugin.hyperparams_class(), cfg)
    k = sae.hp.k
    with torch.no_grad():
        assert l0(sae.eval().encode(held)) > 1.5 * k  # θ = 0: plain ReLU
    trainer, gen = plugin.trainer_class(sae.train(), cfg), torch.Generator().manual_seed(0)

    def draw():
        return train[torch.randint(len(train), (cfg.batch_size,), generator=gen)]
    for step in range(60):
        trainer.step(draw(), step)
    with torch.no_grad():
        for step in range(60, 460):  # the weights frozen: θ converges on them
            sae.loss(draw(), step)
        theta = sae.topk_threshold.clone()
        sae.eval().loss(held, 460)
        assert torch.equal(sae.topk_threshold, theta)  # evaluation never moves θ
        f_eval = sae.encode(held)
        f_train = sae.train().encode(held[:cfg.batch_size])
        f_eval_batch = sae.eval().encode(held[:cfg.batch_size])
        mse = [(sae.decode(f) - held[:cfg.batch_size]).pow(2).sum(-1).mean().item() for f in (f_train, f_eval_batch)]
    assert l0(f_train) == k
    assert abs(l0(f_eval) / k - 1) < 0.05, (l0(f_eval), k)
    kept = ((f_train > 0) & (f_eval_batch > 0)).sum() / (f_train > 0).sum()
    assert kept > 0.95
    assert abs(mse[1] / mse[0] - 1) < 0.05, mse


@pytest.mark.e2e
@pytest.mark.parametrize("key", FAMILY, ids=["batchtopk", "matryoshka"])
def test_export_loads_in_sae_lens_as_jumprelu_and_equals_the_evaluated_sae(key, tmp_path):
    """Train on real activations, save as the harness does, load with SAELens: a JumpReLUSAE with
    θ in every latent, encoding and decoding as the evaluated ScaledSAE."""
    from sae_lens import JumpReLUSAE

    acts = torch.cat(train_and_held_activations())
    sae, scale = trained_sae(key, acts, D_SAE, rows=256)
    assert sae.topk_threshold > 0
    loaded = exported(sae, scale, tmp_path, "jumprelu")
    state = load_file(tmp_path / "plugin_state.safetensors")  # the harness's exact reload keeps θ in float64
    assert state["topk_threshold"].dtype == torch.float64 and torch.equal(state["topk_threshold"], sae.topk_threshold)
    assert type(loaded) is JumpReLUSAE
    assert torch.equal(loaded.threshold, torch.full((D_SAE,), sae.topk_threshold.item()))
    f = assert_export_is_the_evaluated_sae(loaded, sae, scale, acts)
    assert torch.equal(loaded.encode(acts) > 0, f > 0)


def test_the_threshold_stays_float64_when_the_sae_is_cast():
    """sae_bench casts the SAE to the model's dtype (bf16 on CUDA); θ keeps its float64 (SAELens
    keeps it so: the running mean's small steps), and is compared in the pre-activations' dtype."""
    sae = make_sae(FAMILY[0])
    sae.topk_threshold.fill_(0.3)
    sae.to(torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.topk_threshold.dtype == torch.float64
    with torch.no_grad():
        f = sae.eval().encode(batch(0).to(torch.bfloat16))
    assert f.dtype == torch.bfloat16 and 0 < (f > 0).float().mean() < 1
