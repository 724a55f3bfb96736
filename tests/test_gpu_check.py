"""Ready for the GPU (issue 16): the bf16 step (autocast, tested here on CPU), the CUDA-marked tests
that scripts/gpu_check.sh runs where there is a GPU (skipped elsewhere), and the check's CPU form,
run here so that it cannot rot."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TOPK_FAMILY, assert_sparse_step_is_the_dense_step, cli, family_sae, read_log
from rich.progress import Progress
from safetensors.torch import load_file

import experiment
import studies

ROOT = Path(experiment.__file__).parent
D_IN = 64
BF16_RTOL = 1e-2  # bf16 against fp32 final losses of a tiny run; measured 5e-5 (ReLU) and 2e-4 (TopK) on CPU


def plugin_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained SAE's own weights (training scale), as a finished run saved them."""
    return load_file(run_dir / "plugin_state.safetensors")


def test_run_in_bf16_trains_near_the_fp32_run_with_fp32_weights_unit_decoder_rows_and_says_so(run_tiny, tmp_path,
                                                                                             notes):
    fp32, _ = run_tiny("run_0_baseline")
    result = cli("run", "--preset", "tiny", "--plugin", "run_0_baseline", "--dtype", "bf16",
                 "--out", str(tmp_path / "bf16"), "--notes", str(notes))
    assert result.exit_code == 0, result.output
    bf16 = json.loads((tmp_path / "bf16" / "final_info.json").read_text())
    assert bf16["provenance"]["config"]["dtype"] == "bf16" and fp32["provenance"]["config"]["dtype"] == "fp32"
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bf16"
    assert bf16["final_loss_terms"] != fp32["final_loss_terms"]  # the matmuls did run in bf16
    for name, value in fp32["final_loss_terms"].items():
        assert bf16["final_loss_terms"][name] == pytest.approx(value, rel=BF16_RTOL), name
    state = plugin_state(tmp_path / "bf16")
    assert all(tensor.dtype == torch.float32 for name, tensor in state.items())
    torch.testing.assert_close(state["W_dec"].norm(dim=1), torch.ones(len(state["W_dec"])), rtol=0, atol=1e-6)


def killed_after_step_15_and_resumed(run_tiny, notes, monkeypatch, plugin: str, **overrides) -> experiment.RunConfig:
    """Train a tiny run whole, then again killed after its checkpoint at step 15 and resumed: the
    resumed run must end in the whole run's losses and weights, bit for bit. Returns its config."""
    done, whole_dir = run_tiny(plugin, checkpoint_every=8, **overrides)  # 32 steps
    save_checkpoint = experiment.save_checkpoint

    def killed_after_step_15(run_dir, step, *args):
        save_checkpoint(run_dir, step, *args)
        if step == 15:
            raise RuntimeError("killed")
    with monkeypatch.context() as patch:
        patch.setattr(experiment, "save_checkpoint", killed_after_step_15)
        with pytest.raises(RuntimeError, match="killed"):
            run_tiny(plugin, checkpoint_every=8, **overrides)
    run_dir = sorted((notes.parent / "runs").iterdir())[-1]
    cfg, found = experiment.saved_config(run_dir, "--resume")
    resumed = experiment.execute(cfg, found, run_dir, notes, resume=True)
    assert resumed["final_loss_terms"] == done["final_loss_terms"]
    for name, tensor in plugin_state(whole_dir).items():
        assert torch.equal(plugin_state(run_dir)[name], tensor), name
    return cfg


def test_a_bf16_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run_s_weights(run_tiny, notes,
                                                                                         monkeypatch):
    assert killed_after_step_15_and_resumed(run_tiny, notes, monkeypatch, "run_0_topk", dtype="bf16").dtype == "bf16"


def test_a_run_saved_before_the_dtype_field_is_found_as_the_same_fp32_run_by_study_and_sweep():
    """Runs are reused or resumed by their saved config (`comparable`): one saved without `dtype`
    was fp32."""
    config = dataclasses.asdict(experiment.build_config("tiny", "baseline/run_0_baseline"))
    saved_before = {k: v for k, v in config.items() if k != "dtype"}
    assert studies.comparable(saved_before) == studies.comparable(config)
    assert studies.comparable(saved_before) != studies.comparable({**config, "dtype": "bf16"})


def test_run_refuses_an_unknown_dtype_in_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(studies, "execute", lambda *a, **k: pytest.fail("work"))
    result = cli("run", "--preset", "tiny", "--plugin", "run_0_baseline", "--dtype", "fp16",
                 "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "unknown --dtype 'fp16'; use fp32 or bf16" in result.output


# ----------------------------------------------------------------------------------------------
# On CUDA: run by scripts/gpu_check.sh (`pytest -m cuda tests/test_gpu_check.py`), skipped elsewhere.

CUDA = torch.device("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestOnCuda:
    def test_a_step_s_losses_are_read_without_waiting_for_the_step_queued_after_it(self, tmp_path):
        """REPORT_LAG: on CUDA the host checks step s's losses (and logs them) after queuing step
        s + 1, and must not wait for s + 1 to finish; here s + 1 keeps the GPU busy for ~100 ms."""
        cfg = experiment.build_config("tiny", "baseline/run_0_baseline", device="cuda")
        latents = torch.zeros(4, cfg.dict_size, device=CUDA)
        fired_at = torch.full((cfg.dict_size,), -1, device=CUDA)
        with experiment.StepLog(tmp_path / "log.jsonl", cfg, Progress(disable=True), 0, {}, leader=True) as log:
            for step in range(2):
                if step == 1:
                    torch.cuda.synchronize()
                    torch.cuda._sleep(200_000_000)  # cycles: ~100 ms at the H200's 1.98 GHz
                loss = torch.ones((), device=CUDA) * (step + 1)
                log.queue(step, loss, experiment.LossOutput({"l2_loss": loss}, latents), fired_at, 1e-3)
            start = time.perf_counter()
            log.read_back(1)  # step 0's losses only
            read_s = time.perf_counter() - start
            torch.cuda.synchronize()
            busy_s = time.perf_counter() - start
        assert log.final == {"l2_loss": 1.0, "total_loss": 1.0}
        assert read_s < busy_s / 4, f"reading step 0 took {read_s * 1e3:.0f} ms of step 1's {busy_s * 1e3:.0f} ms"

    def test_adam_is_fused_on_cuda_and_steps_as_the_unfused_one(self):
        plugin = experiment.find_plugin("run_0_baseline")
        cfg = experiment.build_config("tiny", "baseline/run_0_baseline")
        torch.manual_seed(0)
        sae = plugin.sae_class(D_IN, 256, plugin.hyperparams_class(), cfg, device=CUDA)
        twin = copy.deepcopy(sae)
        trainer = plugin.trainer_class(sae, cfg)
        assert trainer.optimizer.defaults["fused"]
        unfused = torch.optim.Adam(twin.parameters(), lr=trainer.optimizer.param_groups[0]["lr"], fused=False)
        for _ in range(3):
            for param, twin_param in zip(sae.parameters(), twin.parameters()):
                param.grad = torch.randn_like(param)
                twin_param.grad = param.grad.clone()
            trainer.optimizer.step()
            unfused.step()
        for (name, param), twin_param in zip(sae.named_parameters(), twin.parameters()):
            torch.testing.assert_close(param, twin_param, rtol=1e-5, atol=1e-7, msg=name)

    @pytest.mark.parametrize("n_dead", [0, 40], ids=["auxk_inactive", "auxk_active"])
    @pytest.mark.parametrize("key", TOPK_FAMILY)
    def test_the_sparse_step_on_cuda_gives_the_dense_step_s_loss_terms_and_gradients(self, key, n_dead):
        """As tests/test_kernels.py on CPU, in full fp32 (TF32 off)."""
        torch.backends.cuda.matmul.allow_tf32 = False
        sae = family_sae(key, n_dead).to(CUDA)
        assert_sparse_step_is_the_dense_step(sae, (torch.randn(256, D_IN) * 2 + 0.5).to(CUDA))

    @pytest.mark.parametrize("plugin, dtype", [("run_0_baseline", "fp32"), ("run_0_topk", "bf16")])
    def test_a_tiny_run_trains_and_evaluates_end_to_end_on_cuda(self, run_tiny, plugin, dtype):
        info, run_dir = run_tiny(plugin, device="cuda", dtype=dtype)
        assert info["status"] == "completed" and info["training_steps"] == 32
        assert info["provenance"]["device"].startswith("cuda") and info["provenance"]["device_name"] != "cpu"
        assert 0 < info["metrics"]["sparsity"]["l0"] and len(read_log(run_dir)) >= 4
        state = plugin_state(run_dir)
        torch.testing.assert_close(state["W_dec"].norm(dim=1), torch.ones(len(state["W_dec"])), rtol=0, atol=1e-5)

    def test_a_cuda_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_run_s_weights(self, run_tiny, notes,
                                                                                            monkeypatch):
        killed_after_step_15_and_resumed(run_tiny, notes, monkeypatch, "run_0_baseline", device="cuda")

    @pytest.mark.e2e
    def test_deterministic_mode_trains_the_same_weights_twice_on_cuda(self, tmp_path):
        """Each run in its own process: cuBLAS reads CUBLAS_WORKSPACE_CONFIG (set by --deterministic)
        only when a process first uses it."""
        env = {**os.environ, "SAE_HARNESS_CACHE": str(tmp_path / "cache")}
        run = [sys.executable, str(ROOT / "experiment.py"), "run", "--preset", "tiny", "--plugin", "run_0_baseline",
               "--device", "cuda", "--deterministic", "--notes", str(tmp_path / "notes.md")]
        for name in ("first", "second"):
            done = subprocess.run([*run, "--out", str(tmp_path / name)], env=env, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stdout + done.stderr
        first, second = plugin_state(tmp_path / "first"), plugin_state(tmp_path / "second")
        for name, tensor in first.items():
            assert torch.equal(second[name], tensor), name


# ----------------------------------------------------------------------------------------------
# The check itself, in its CPU form.

@pytest.mark.e2e
def test_the_gpu_check_runs_in_its_cpu_form_and_writes_one_json(tmp_path):
    """No CUDA: every CUDA-marked test is skipped, not failed, and the synthetic bench times every
    baseline in fp32 and bf16 with the sparse step forced off and on (where an SAE has one)."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
           "SAE_HARNESS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["gpu_check.json"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["finished"]
    tests = report["cuda_tests"]
    assert tests["counts"]["skipped"] == len(tests["cases"]) >= 10 and not tests["counts"]["failed"]
    assert sorted(report["bench"]) == ["bf16_dense", "bf16_sparse", "fp32_dense", "fp32_sparse"]
    for name, bench in report["bench"].items():
        assert (bench["d_in"], bench["d_sae"], bench["batch_size"]) == (64, 256, 256), name
        paths = {arch: row["sae_step"]["path"] for arch, row in bench["architectures"].items()}
        if name.endswith("dense"):
            assert len(paths) == 6 and set(paths.values()) == {"dense"}
        else:  # only the SAEs with a sparse step
            assert set(paths) == {"baseline/run_0_baseline", *TOPK_FAMILY} and set(paths.values()) == {"sparse"}
        assert all(row["sae_step"]["tokens_per_s"] > 0 for row in bench["architectures"].values())
