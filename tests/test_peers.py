"""The peer check against dictionary_learning (peers.py, embedded): each architecture's mapping trains
a few steps on both sides, on random activations in the tiny preset's shape, and what the check
cannot do is refused in one line. dictionary_learning is not in requirements.txt: without it the
training test skips (`pip install --no-deps dictionary-learning==0.1.0`)."""

import importlib.util
import math

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import experiment
import peers

KNOBS = {  # arch: the harness's knob, its value here, the reference trainer's name for it
    "relu": ("sparsity_penalty", 0.3, "l1_penalty"), "gated": ("sparsity_penalty", 0.3, "l1_penalty"),
    "jumprelu": ("l0_coefficient", 0.5, "sparsity_penalty"), "topk": ("k", 16, "k"), "batchtopk": ("k", 16, "k"),
    "matryoshka": ("k", 16, "k"),
}
STEPS = 6  # above the tiny preset's warm-up of 4, which dictionary_learning's schedule requires


def peers_cli(*args: str):
    app = typer.Typer()
    app.command()(peers.main)
    return CliRunner().invoke(app, list(args))


@pytest.mark.skipif(importlib.util.find_spec("dictionary_learning") is None,
                    reason="dictionary_learning is not installed (not in requirements.txt); "
                           "pip install --no-deps dictionary-learning==0.1.0")
@pytest.mark.parametrize("arch", list(peers.REFERENCES))
def test_each_architecture_trains_on_both_sides_with_its_knob(arch):
    name, value, reference_name = KNOBS[arch]
    knob = peers.chosen_knob(arch, {"k": None, "sparsity_penalty": None, "l0_coefficient": None, name: value})
    plugin, cfg, hp = peers.harness_setting(arch, knob, "tiny", 0, 256 * STEPS)
    train = np.random.default_rng(0).standard_normal((cfg.tokens, 64), dtype=np.float32) + 3.0
    data = experiment.ActivationData(train, torch.zeros(0), 1.0, from_cache=False)
    ours, theirs = peers.compare(arch, plugin, cfg, hp, data)
    assert (ours["trainer"], theirs["trainer"]) == ("harness", "dictionary_learning")
    assert ours[name] == theirs[name] == value
    assert peers.REFERENCES[arch].settings(hp, cfg, ours)[reference_name] == value
    for result in (ours, theirs):
        assert all(math.isfinite(result[score]) for score in ("l0", "explained_variance", "b_dec_from_mean")), result


@pytest.mark.parametrize("args, message", [
    (["--arch", "sparse"], "--arch sparse: choose one of relu, gated, jumprelu, topk, batchtopk, matryoshka"),
    (["--preset", "synth-tiny", "--arch", "relu"], "--preset synth-tiny checks only topk and batchtopk"),
    (["--preset", "tiny", "--arch", "topk"], "--preset tiny: choose embedded or one of"),
    (["--arch", "relu", "--k", "16"], "--k does not apply to --arch relu; its knob is --sparsity-penalty"),
    (["--arch", "topk", "--l0-coefficient", "1"], "--l0-coefficient does not apply to --arch topk; its knob is --k"),
    (["--preset", "synth-tiny", "--decoder", "free"], "--decoder free: choose unit or rescaled"),
    (["--decoder", "rescaled"], "--decoder rescaled: SAELens's decoder is a synthetic preset's option"),
])
def test_what_the_peer_check_cannot_do_is_refused_in_one_line(args, message):
    result = peers_cli(*args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output, result.output
