"""bench.py measures what it reports, in one process; `experiment.py bench` runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import bench
import experiment
from common import cache_dir
import kernels

ROOT = Path(bench.__file__).parent
SPARSE_BELOW = 0.1  # the switch point these tests give the tiny preset's shapes, instead of timing it


def bench_cli(*args: str):
    return CliRunner().invoke(bench.app, list(args))


@pytest.fixture(autouse=True)
def measured_switch_point(tmp_path, monkeypatch):
    """The sparse step's switch point at the tiny preset's shapes (batch 256, d_in 64, d_sae 256),
    cached as training's measurement leaves it."""
    monkeypatch.setenv("SAE_HARNESS_CACHE", str(tmp_path / "cache"))
    torch.use_deterministic_algorithms(True)  # stored under a CPU run's kernel mode, as bench runs
    kernels.sparse_below(256, 64, 256, cache_dir(), measure=lambda *shape: {"sparse_below": SPARSE_BELOW})


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_bench_at_two_percent_latent_density_times_the_sparse_step(tmp_path):
    out = tmp_path / "bench.json"
    result = bench_cli("--preset", "tiny", "--steps", "2", "--tokens", "4096", "--l0-fraction", "0.02",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    step = json.loads(out.read_text())["sae_step"]
    assert step["path"] == "sparse" and 0.01 < step["latent_density"] < 0.03
    assert step["sparse_below"] == SPARSE_BELOW and "sparse below 10%" in result.output


@pytest.mark.e2e
def test_experiment_bench_runs_bench_py_with_its_arguments():
    """`python experiment.py bench ARGS` is `python bench.py ARGS`: bench.py's own refusal comes back."""
    done = subprocess.run([sys.executable, str(ROOT / "experiment.py"), "bench", "--preset", "no-such-preset"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unknown preset 'no-such-preset'" in done.stderr + done.stdout


def test_bench_refuses_a_plugin_no_sae_lens_architecture_is_before_any_work(monkeypatch):
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    result = bench_cli("--preset", "tiny", "--plugin", "run_7_adaptive_ln")
    assert result.exit_code == 2 and "is no SAELens architecture" in result.output


@pytest.mark.e2e
def test_bench_times_a_baseline_architecture_with_its_hyperparameters_against_sae_lens_s(tmp_path):
    out = tmp_path / "bench.json"
    result = bench_cli("--preset", "tiny", "--plugin", "run_0_topk", "--set", "k=8", "--steps", "2",
                       "--tokens", "4096", "--out", str(out))
    assert result.exit_code == 0, result.output
    bench = json.loads(out.read_text())
    assert bench["plugin"] == "baseline/run_0_topk" and bench["hyperparams"]["k"] == 8
    assert 0 < bench["ours_vs_sae_lens"] < float("inf") and 0 < bench["sae_step"]["latent_density"] <= 8 / 256
    assert bench["sae_step"]["path"] == "sparse"  # TopK's sparse step, below the switch point


SMALL = ["--activations", "random", "--d-in", "64", "--dict-size", "256", "--batch-size", "256", "--steps", "2"]
BASELINES = ["baseline/run_0_baseline", "baseline/run_0_batchtopk", "baseline/run_0_gated", "baseline/run_0_jumprelu",
             "baseline/run_0_matryoshka", "baseline/run_0_topk"]


@pytest.fixture
def no_llm(monkeypatch):
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("random activations loaded a model"))


@pytest.mark.e2e
def test_bench_on_random_activations_times_every_baseline_against_sae_lens_with_no_llm(tmp_path, no_llm):
    out = tmp_path / "bench.json"
    result = bench_cli(*SMALL, "--out", str(out))
    assert result.exit_code == 0, result.output
    bench = json.loads(out.read_text())
    assert (bench["activations"], bench["d_in"], bench["d_sae"], bench["batch_size"]) == ("random", 64, 256, 256)
    assert bench["dtype"] == bench["roofline_dtype"] == "fp32" and 0 < bench["roofline_flops"] < float("inf")
    assert sorted(bench["architectures"]) == BASELINES
    for name, row in bench["architectures"].items():
        for part in ("sae_step", "sae_lens_step"):
            assert 0 < row[part]["tokens_per_s"] < float("inf") and row[part]["peak_mb"] >= 0, name
        assert 0 < row["ours_vs_sae_lens"] < float("inf") and 0 < row["sae_step_roofline_fraction"] < float("inf")
    assert "ours / sae_lens" in result.output


def test_random_activations_default_to_the_field_s_reference_shape(no_llm, monkeypatch):
    """2304 x 16384 x 4096 (Gemma-2-2B's residual width) unless given; stopped before any timing."""
    def stop(cfgs, d_in, *args):
        raise experiment.HarnessError(f"asked for {d_in} x {cfgs[0].dict_size} x {cfgs[0].batch_size}")
    monkeypatch.setattr(bench, "run_synthetic", stop)
    result = bench_cli("--activations", "random", "--plugin", "run_0_topk")
    assert "asked for 2304 x 16384 x 4096" in result.output


@pytest.mark.parametrize("path, settings", [
    # Left to the switch point (0.1 here), ReLU at 2% of latents firing and TopK at k 8 of 256 would be sparse...
    ("dense", {"run_0_baseline": ["--l0-fraction", "0.02"], "run_0_topk": ["--set", "k=8"], "run_0_gated": []}),
    # ...and ReLU at half its latents firing and TopK at k 64 of 256 dense.
    ("sparse", {"run_0_baseline": [], "run_0_topk": [], "run_0_gated": []}),
])
@pytest.mark.e2e
def test_the_path_flag_forces_our_step_dense_or_sparse_where_the_sae_has_a_sparse_step(tmp_path, no_llm, path,
                                                                                       settings):
    """Gated has no sparse step: dense either way."""
    out = tmp_path / "bench.json"
    for plugin, args in settings.items():
        result = bench_cli(*SMALL, "--plugin", plugin, *args, "--path", path, "--out", str(out))
        assert result.exit_code == 0, result.output
        step = json.loads(out.read_text())["architectures"][f"baseline/{plugin}"]["sae_step"]
        assert step["path"] == (path if plugin != "run_0_gated" else "dense"), plugin
        assert step["sparse_below"] is None  # forced, not measured
    assert kernels.SPARSE_DEVICES == ("cpu",) and cache_dir().name == "cache"  # put back as they were


@pytest.mark.e2e
def test_bench_in_bf16_autocasts_both_steps_and_takes_a_bf16_matmul_roofline(tmp_path, no_llm, monkeypatch):
    autocast_dtypes = []
    step_autocast = kernels.step_autocast
    monkeypatch.setattr(kernels, "step_autocast", lambda dtype, device: autocast_dtypes.append(dtype)
                        or step_autocast(dtype, device))
    out = tmp_path / "bench.json"
    result = bench_cli(*SMALL, "--plugin", "run_0_topk", "--dtype", "bf16", "--out", str(out))
    assert result.exit_code == 0, result.output
    bench = json.loads(out.read_text())
    assert bench["dtype"] == bench["roofline_dtype"] == "bf16"
    assert bench["architectures"]["baseline/run_0_topk"]["sae_step"]["dtype"] == "bf16"
    assert set(autocast_dtypes) == {"bf16"} and len(autocast_dtypes) >= 2 * 3 * 2  # ours and sae_lens's timed steps


@pytest.mark.parametrize("args, message", [
    (["--activations", "hub"], "unknown --activations 'hub'"),
    (["--path", "fast"], "unknown --path 'fast'"),
    (["--dtype", "fp16"], "unknown --dtype 'fp16'; use fp32 or bf16"),
    (["--d-in", "64"], "--d-in is for --activations random"),
    (["--activations", "random", "--layer", "3"], "--model and --layer are for --activations model"),
    (["--activations", "random", "--plugin", "run_7_adaptive_ln"], "is no SAELens architecture"),
])
def test_bench_refuses_bad_options_in_one_line_before_any_work(monkeypatch, args, message):
    monkeypatch.setattr(bench, "run_synthetic", lambda *a, **k: pytest.fail("work"))
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("work"))
    result = bench_cli("--preset", "tiny", *args)
    assert result.exit_code == 2 and message in result.output


def test_bench_eval_times_a_run_s_core_evaluation_both_ways_split_into_its_passes(tmp_path, run_tiny):
    """--eval RUN_DIR: sae_bench's path (its clean, spliced and zero-ablated full passes) against the
    cached one (to the hooked layer, on from it), each split into parts that add up to its total,
    with the same metrics."""
    _, run_dir = run_tiny("run_0_baseline")
    out = tmp_path / "bench.json"
    result = bench_cli("--eval", str(run_dir), "--eval-rounds", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    run = json.loads(out.read_text())["eval"]
    before, after = run["paths"]["sae_bench"], run["paths"]["cached"]
    assert set(bench.EvalParts.FULL_PASSES) <= set(before["parts"])
    assert not set(bench.EvalParts.FULL_PASSES) & set(after["parts"])
    assert {"model up to the hooked layer", "model from the hooked layer on, SAE spliced in"} <= set(after["parts"])
    for path in (before, after):
        assert sum(path["parts"].values()) == pytest.approx(path["total_s"]) and path["total_s"] > 0
        assert all(seconds >= -1e-3 for seconds in path["parts"].values())
    assert not run["reference_built"]  # the run's own evaluation made it; bench read it
    assert run["max_relative_difference"] < 1e-5
    assert "cached / sae_bench" in result.output
