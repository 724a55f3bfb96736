"""The peer check against dictionary_learning (peers.py, embedded): each architecture's mapping trains
a few steps on both sides, on random activations in the tiny preset's shape, and what the check
cannot do is refused in one line. dictionary_learning is not in requirements.txt: without it the
training test skips (`pip install --no-deps dictionary-learning==0.1.0`)."""

import dataclasses
import importlib.util
import math

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import experiment
import peers
from plugins.baseline.run_0_jumprelu import THRESHOLD_TRAVEL

KNOBS = {  # arch: the harness's knob, its value here, the reference trainer's name for it
    "relu": ("sparsity_penalty", 0.3, "l1_penalty"), "gated": ("sparsity_penalty", 0.3, "l1_penalty"),
    "jumprelu": ("l0_coefficient", 0.5, "sparsity_penalty"), "topk": ("k", 16, "k"), "batchtopk": ("k", 16, "k"),
    "matryoshka": ("k", 16, "k"),
}
STEPS = 6  # above the tiny preset's warm-up of 4, which dictionary_learning's schedule requires
needs_dictionary_learning = pytest.mark.skipif(
    importlib.util.find_spec("dictionary_learning") is None,
    reason="dictionary_learning is not installed (not in requirements.txt); pip install --no-deps dictionary-learning==0.1.0")


def peers_cli(*args: str):
    app = typer.Typer()
    app.command()(peers.main)
    return CliRunner().invoke(app, list(args))


@needs_dictionary_learning
@pytest.mark.parametrize("start", peers.STARTS)
@pytest.mark.parametrize("arch", list(peers.REFERENCES))
def test_each_architecture_trains_on_both_sides_with_its_knob(arch, start):
    name, value, reference_name = KNOBS[arch]
    knob = peers.chosen_knob(arch, {"k": None, "sparsity_penalty": None, "l0_coefficient": None, name: value})
    plugin, cfg, hp = peers.harness_setting(arch, knob, "tiny", 0, 256 * STEPS)
    train = np.random.default_rng(0).standard_normal((cfg.tokens, 64), dtype=np.float32) + 3.0
    data = experiment.ActivationData(train, torch.zeros(0), 1.0, from_cache=False)
    ours, theirs = peers.compare(arch, plugin, cfg, hp, data, start)
    assert (ours["trainer"], theirs["trainer"], theirs["start"]) == ("harness", "dictionary_learning", start)
    assert ours[name] == theirs[name] == value
    assert peers.REFERENCES[arch].settings(hp, cfg, ours)[reference_name] == value
    for result in (ours, theirs):
        assert all(math.isfinite(result[score]) for score in ("l0", "explained_variance", "b_dec_from_mean")), result


@needs_dictionary_learning
def test_the_jumprelu_reference_trains_at_its_own_lambda_when_given_one(monkeypatch):
    built, reference_trainer = [], peers.reference_trainer
    monkeypatch.setattr(peers, "reference_trainer",
                        lambda arch: lambda **kwargs: built.append(reference_trainer(arch)(**kwargs)) or built[-1])
    plugin, cfg, hp = peers.harness_setting("jumprelu", {"l0_coefficient": 0.5}, "tiny", 0, 256 * STEPS)
    train = np.random.default_rng(0).standard_normal((cfg.tokens, 64), dtype=np.float32) + 3.0
    data = experiment.ActivationData(train, torch.zeros(0), 1.0, from_cache=False)
    ours, theirs = peers.compare("jumprelu", plugin, cfg, hp, data, "harness", dataclasses.replace(hp, l0_coefficient=50.0))
    assert (ours["l0_coefficient"], theirs["l0_coefficient"]) == (0.5, 50.0)
    assert [trainer.sparsity_coefficient for trainer in built] == [50.0]  # the reference trained at its own λ


@needs_dictionary_learning
def test_with_a_target_both_sides_train_the_reference_s_objective(monkeypatch):
    built, reference_trainer = [], peers.reference_trainer
    monkeypatch.setattr(peers, "reference_trainer",
                        lambda arch: lambda **kwargs: built.append(reference_trainer(arch)(**kwargs)) or built[-1])
    plugin, cfg, hp = peers.harness_setting("jumprelu", {"l0_coefficient": 5.0, "target_l0": 12.0}, "tiny", 0, 256 * STEPS)
    train = np.random.default_rng(0).standard_normal((cfg.tokens, 64), dtype=np.float32) + 3.0
    data = experiment.ActivationData(train, torch.zeros(0), 1.0, from_cache=False)
    ours, theirs = peers.compare("jumprelu", plugin, cfg, hp, data, "harness")
    assert [(trainer.sparsity_coefficient, trainer.target_l0) for trainer in built] == [(5.0, 12.0)]
    assert ours["target_l0"] == theirs["target_l0"] == 12.0  # each result row says which objective


def test_the_cli_target_reaches_the_harness_plugin(monkeypatch):
    asked = []
    monkeypatch.setattr(peers, "dictionary_learning_peers", lambda arch, knob, *rest: asked.append(knob) or [])
    result = peers_cli("--arch", "jumprelu", "--l0-coefficient", "100", "--target-l0", "16")
    assert result.exit_code == 0, result.output
    assert asked == [{"l0_coefficient": 100.0, "target_l0": 16.0}]
    assert peers.harness_setting("jumprelu", asked[0], "tiny", 0, 1024)[2].target_l0 == 16.0


@needs_dictionary_learning
@pytest.mark.parametrize("arch", list(peers.REFERENCES))
def test_started_as_the_harness_the_reference_holds_the_harness_parameters_and_optimiser(arch):
    name, value, _ = KNOBS[arch]
    plugin, cfg, hp = peers.harness_setting(arch, {name: value}, "tiny", 0, 256 * STEPS)
    x = torch.randn(256, 64) + 3.0
    sae = plugin.sae_class(64, cfg.dict_size, hp, cfg)
    sae.init_from_data(x)
    trainer = peers.reference_trainer(arch)(steps=STEPS, activation_dim=64, dict_size=cfg.dict_size, layer=cfg.layer,
                                            lm_name=cfg.model, lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=0,
                                            device="cpu", **peers.REFERENCES[arch].settings(hp, cfg, {"l0": 8.0}))
    peers.start_as_harness(trainer, sae.state_dict(), cfg, hp)
    ae = trainer.ae
    with torch.no_grad():
        assert torch.equal(ae.decode(torch.zeros(1, cfg.dict_size))[0], sae.b_dec)  # b_dec from the data
        if arch != "gated":  # the same latents; jumprelu's reference encodes x, not x − b_dec: its b_enc makes up
            assert torch.allclose(ae.encode(x), sae.eval().encode(x), atol=1e-5)  # TopK family: θ from 0, both
        else:  # the gate encodes through r_mag and its own biases: its weights are checked
            assert torch.equal(ae.encoder.weight, sae.W_enc.T) and torch.equal(ae.mag_bias, sae.b_mag)
    assert all(group["betas"] == (0.9, 0.999) for group in trainer.optimizer.param_groups)
    assert getattr(trainer, "dead_feature_threshold", None) in (None, (peers.dead_window_steps(cfg) + 2) * cfg.batch_size)
    if arch == "jumprelu":  # θ steps at the harness's rate, in a param group of its own
        (theta,) = [g for g in trainer.optimizer.param_groups if any(p is ae.threshold for p in g["params"])]
        assert theta["initial_lr"] == pytest.approx(THRESHOLD_TRAVEL / cfg.steps)
        assert trainer.scheduler.optimizer is trainer.optimizer and theta["lr"] == 0  # the warm-up's first step
    if arch in ("relu", "gated"):  # the references that do not clip themselves: their step clips at norm 1
        for p in ae.parameters():
            p.grad = torch.full_like(p, 100.0)
        trainer.optimizer.step()
        assert torch.cat([p.grad.flatten() for p in ae.parameters()]).norm().item() <= 1.0 + 1e-5
        # ... after the decoder gradient's part along its rows is removed, as the harness clips: a large
        # radial gradient with a small tangential one leaves the tangential one unclipped.
        decoder = ae.decoder.weight
        columns = decoder.detach() / decoder.detach().norm(dim=0, keepdim=True)
        tangential = torch.randn_like(decoder) * 1e-3
        tangential -= (tangential * columns).sum(dim=0, keepdim=True) * columns
        for p in ae.parameters():
            p.grad = torch.zeros_like(p)
        decoder.grad = 100.0 * columns + tangential
        trainer.optimizer.step()
        assert torch.allclose(decoder.grad, tangential, atol=2e-5)  # clipped first, it would be ~1e-6 of it


@pytest.mark.parametrize("args, message", [
    (["--arch", "sparse"], "--arch sparse: choose one of relu, gated, jumprelu, topk, batchtopk, matryoshka"),
    (["--preset", "synth-tiny", "--arch", "relu"], "--preset synth-tiny checks only topk and batchtopk"),
    (["--preset", "tiny", "--arch", "topk"], "--preset tiny: choose embedded or one of"),
    (["--arch", "relu", "--k", "16"], "--k does not apply to --arch relu; its knob is --sparsity-penalty"),
    (["--arch", "topk", "--l0-coefficient", "1"], "--l0-coefficient does not apply to --arch topk; its knob is --k"),
    (["--preset", "synth-tiny", "--decoder", "free"], "--decoder free: choose unit or rescaled"),
    (["--decoder", "rescaled"], "--decoder rescaled: SAELens's decoder is a synthetic preset's option"),
    (["--start", "reference"], "--start reference: choose own or harness"),
    (["--arch", "topk", "--reference-l0-coefficient", "3"], "--reference-l0-coefficient: the jumprelu reference's"),
    (["--preset", "synth-tiny", "--start", "harness"], "--start harness: an embedded option"),
    (["--arch", "topk", "--target-l0", "16"], "--target-l0 16.0: a positive L0 target for --arch jumprelu"),
    (["--arch", "jumprelu", "--target-l0", "0"], "--target-l0 0.0: a positive L0 target for --arch jumprelu"),
    (["--arch", "jumprelu", "--target-l0", "nan"], "--target-l0 nan: a positive L0 target for --arch jumprelu"),
    (["--arch", "jumprelu", "--target-l0", "16", "--reference-l0-coefficient", "3"], "--target-l0 trains both"),
])
def test_what_the_peer_check_cannot_do_is_refused_in_one_line(args, message):
    result = peers_cli(*args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output, result.output
