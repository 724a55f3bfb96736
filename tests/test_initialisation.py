"""How an SAE starts: b_dec from the data (the first batch's geometric median), as the field's
trainers start, for every baseline; the seed notebooks' b_dec = 0 as a named option; and the
windows that scale with the run."""

import numpy as np
import pytest
import torch
from rich.progress import Progress

import experiment
import runs

BASELINES = ["run_0_baseline", "run_0_topk", "run_0_batchtopk", "run_0_jumprelu", "run_0_gated", "run_0_matryoshka"]


def offset_data(d_in=64, rows=512, seed=0) -> tuple[np.ndarray, torch.Tensor]:
    """Activations whose mean dominates their norm (as Gemma's do): a fixed offset plus noise."""
    generator = torch.Generator().manual_seed(seed)
    offset = 4.0 * torch.randn(d_in, generator=generator)
    return (offset + torch.randn(rows, d_in, generator=generator)).numpy(), offset


def first_step(plugin_name: str, tmp_path, **hyperparams) -> tuple[experiment.SAE, torch.Tensor]:
    """Train one step at a negligible lr on offset data: b_dec as it started, and the offset."""
    acts, offset = offset_data()
    plugin = experiment.find_plugin(plugin_name)
    cfg = experiment.build_config("tiny", plugin_name, tokens=256, batch_size=256, lr=1e-12, warmup_steps=0,
                                  hyperparams=hyperparams)
    torch.manual_seed(0)
    sae = plugin.sae_class(acts.shape[1], cfg.dict_size, plugin.hyperparams_class(**hyperparams), cfg)
    data = experiment.ActivationData(acts, torch.zeros(1, 1, dtype=torch.long), 1.0, from_cache=True)
    (tmp_path / "run").mkdir()
    with Progress(disable=True) as progress:
        experiment.train(sae, plugin.trainer_class(sae, cfg), data, cfg, tmp_path / "run", progress,
                         torch.device("cpu"), source_sha256=plugin.source_hash())
    return sae, offset


def test_the_geometric_median_resists_outliers_that_move_the_mean():
    points = torch.cat([torch.randn(99, 8, generator=torch.Generator().manual_seed(1)) * 0.01,
                        torch.full((1, 8), 1000.0)])
    median = experiment.geometric_median(points)
    assert median.norm() < 0.1 < points.mean(0).norm()


@pytest.mark.parametrize("plugin_name", BASELINES)
def test_every_baseline_starts_its_b_dec_at_the_datas_geometric_median(plugin_name, tmp_path):
    sae, offset = first_step(plugin_name, tmp_path)
    assert (sae.b_dec - offset).norm() < 0.1 * offset.norm()


def test_the_notebooks_template_starts_b_dec_at_zero_when_asked(tmp_path):
    sae, _ = first_step("run_0_topk", tmp_path, b_dec_init="zeros")
    assert sae.b_dec.abs().max() < 1e-6


def test_an_unknown_b_dec_init_is_refused_before_any_work():
    plugin = experiment.find_plugin("run_0_baseline")
    cfg = experiment.build_config("tiny", "run_0_baseline", hyperparams={"b_dec_init": "mean"})
    with pytest.raises(experiment.HarnessError, match="b_dec_init must be geometric_median or zeros"):
        experiment.checked_inputs(cfg, plugin)


@pytest.mark.parametrize("tokens, batch_size, steps", [(250_000, 1024, 24), (10_000_000, 2048, 488), (8192, 256, 3)])
def test_the_dead_latent_window_is_a_tenth_of_the_run_up_to_a_million_tokens(tokens, batch_size, steps):
    cfg = experiment.build_config("tiny", "run_0_topk", tokens=tokens, batch_size=batch_size)
    assert runs.dead_window_steps(cfg) == steps
    topk = experiment.find_plugin("run_0_topk")
    assert topk.sae_class(64, 256, topk.hyperparams_class(), cfg).dead_steps == steps
