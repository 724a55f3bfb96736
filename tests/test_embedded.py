"""The real path, on a small budget: the embedded Gemma 3 270M (dequantised from its PyPI GGUF
package on first use, then cached) and the text shipped by sae_probes, through training and
sae_bench's core evaluation, with no hub."""

import math

import pytest

import experiment

pytestmark = pytest.mark.e2e  # the embedded Gemma model, end to end


def test_embedded_model_and_text_run_end_to_end_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plugin = experiment.find_plugin("run_0_baseline")
    cfg = experiment.build_config("embedded", "baseline/run_0_baseline", tokens=4096, dict_size=512,
                                  batch_size=512, warmup_steps=2, eval_batch_prompts=2,
                                  eval_reconstruction_batches=1, eval_sparsity_batches=2)
    info = experiment.execute(cfg, plugin, tmp_path / "run", tmp_path / "notes.md")
    assert info["training_steps"] == 8 and info["status"] == "completed"
    metrics = info["metrics"]
    flat = [v for group in metrics.values() for v in group.values() if isinstance(v, float)]
    assert flat and all(math.isfinite(v) for v in flat)
    # Gemma's own next-token loss on real text is far below the zero-ablation loss.
    perf = metrics["model_performance_preservation"]
    assert perf["ce_loss_without_sae"] < 6 < perf["ce_loss_with_ablation"]
    assert metrics["sparsity"]["l0"] > 0
    assert (tmp_path / "notes.md").read_text().count("## Run 0: Baseline") == 1
