"""bench.py measures what it reports, in one process; `experiment.py bench` runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import bench
import experiment
import kernels

ROOT = Path(bench.__file__).parent
SPARSE_BELOW = 0.1  # the switch point these tests give the tiny preset's shapes, instead of timing it


def bench_cli(*args: str):
    return CliRunner().invoke(bench.app, list(args))


@pytest.fixture(autouse=True)
def measured_switch_point(tmp_path, monkeypatch):
    """The sparse step's switch point at the tiny preset's shapes (batch 256, d_in 64, d_sae 256),
    cached as training's measurement leaves it."""
    monkeypatch.setattr(experiment, "CACHE_DIR", tmp_path / "cache")
    kernels.sparse_below(256, 64, 256, experiment.CACHE_DIR, measure=lambda *shape: {"sparse_below": SPARSE_BELOW})


def test_bench_measures_every_quantity_it_reports(tmp_path):
    """bench: harvest vs plain forward, cache reads, our SAE step vs sae_lens's, the roofline
    fraction and peak memory, all measured (positive and finite) and written to bench.json."""
    out = tmp_path / "bench.json"
    result = bench_cli("--preset", "tiny", "--steps", "2", "--tokens", "4096", "--out", str(out))
    assert result.exit_code == 0, result.output
    bench = json.loads(out.read_text())
    for part in ("plain_forward", "harvest", "cache_read", "sae_step", "sae_lens_step"):
        assert 0 < bench[part]["tokens_per_s"] < float("inf") and bench[part]["peak_mb"] >= 0
    for ratio in ("harvest_vs_forward", "cache_read_vs_harvest", "ours_vs_sae_lens", "sae_step_roofline_fraction"):
        assert 0 < bench[ratio] < float("inf")
    assert "ours / sae_lens" in result.output
    assert bench["sae_step"]["path"] == "dense"  # a fresh SAE: about half its latents fire


def test_bench_at_two_percent_latent_density_times_the_sparse_step(tmp_path):
    out = tmp_path / "bench.json"
    result = bench_cli("--preset", "tiny", "--steps", "2", "--tokens", "4096", "--l0-fraction", "0.02",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    step = json.loads(out.read_text())["sae_step"]
    assert step["path"] == "sparse" and 0.01 < step["latent_density"] < 0.03
    assert step["sparse_below"] == SPARSE_BELOW and "sparse below 10%" in result.output


def test_experiment_bench_runs_bench_py_with_its_arguments():
    """`python experiment.py bench ARGS` is `python bench.py ARGS`: bench.py's own refusal comes back."""
    done = subprocess.run([sys.executable, str(ROOT / "experiment.py"), "bench", "--preset", "no-such-preset"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unknown preset 'no-such-preset'" in done.stderr + done.stdout


def test_bench_refuses_a_plugin_no_sae_lens_architecture_is_before_any_work(monkeypatch):
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    result = bench_cli("--preset", "tiny", "--plugin", "run_7_adaptive_ln")
    assert result.exit_code == 2 and "is no SAELens architecture" in result.output


def test_bench_times_a_baseline_architecture_with_its_hyperparameters_against_sae_lens_s(tmp_path):
    out = tmp_path / "bench.json"
    result = bench_cli("--preset", "tiny", "--plugin", "run_0_topk", "--set", "k=8", "--steps", "2",
                       "--tokens", "4096", "--out", str(out))
    assert result.exit_code == 0, result.output
    bench = json.loads(out.read_text())
    assert bench["plugin"] == "baseline/run_0_topk" and bench["hyperparams"]["k"] == 8
    assert 0 < bench["ours_vs_sae_lens"] < float("inf") and 0 < bench["sae_step"]["latent_density"] <= 8 / 256
    assert bench["sae_step"]["path"] == "sparse"  # TopK's sparse step, below the switch point
