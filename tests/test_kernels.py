"""kernels.py's sparse step: the same loss and gradients as the dense path for the TopK family
(AuxK acting or not), the same training log, and the switch between the two taken from a
measurement on the machine, cached. Nothing here is timed: the measurement is injected. And each
harness process's share of the cores, counted among the live ones."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TOPK_FAMILY, assert_sparse_step_is_the_dense_step, family_sae, read_log

import experiment
from common import ROOT, cache_dir
import kernels

D_IN, D_SAE, K = 64, 512, 8
RTOL = 1e-5


@pytest.mark.parametrize("n_dead", [0, 40], ids=["auxk_inactive", "auxk_active"])
@pytest.mark.parametrize("key", TOPK_FAMILY)
def test_the_sparse_step_gives_the_dense_steps_loss_terms_and_every_gradient(key, n_dead):
    sae, x = family_sae(key, n_dead), torch.randn(256, D_IN) * 2 + 0.5
    dense_terms, dense_grads = assert_sparse_step_is_the_dense_step(sae, x)
    assert (dense_terms["auxiliary_reconstruction_loss"] > 0).item() is (n_dead > 0)
    dead = sae.dead_latents()
    assert (dense_grads["b_enc"][dead] != 0).any().item() is (n_dead > 0)  # AuxK's gradient reaches the dead


def test_the_sparse_decode_is_the_product_and_passes_gradients_on_the_active_latents():
    f = torch.relu(torch.randn(6, 10) - 1)
    f[2] = 0  # a token with no active latent
    weight = torch.randn(10, 4, requires_grad=True)
    dense, sparse = (f.clone().requires_grad_() for _ in range(2))
    out_dense, out_sparse = kernels.decode(dense, weight, False), kernels.decode(sparse, weight, True)
    torch.testing.assert_close(out_sparse, out_dense)
    grad_out = torch.randn(6, 4)
    dense_grads = torch.autograd.grad(out_dense, (dense, weight), grad_out)
    sparse_grads = torch.autograd.grad(out_sparse, (sparse, weight), grad_out)
    torch.testing.assert_close(sparse_grads[1], dense_grads[1])
    active = f > 0
    torch.testing.assert_close(sparse_grads[0][active], dense_grads[0][active])
    assert not sparse_grads[0][~active].any()


def switch_point_file(cache_dir, batch, d_in, d_sae, sparse_below):
    """The cache as a measurement on this machine would leave it, without timing anything."""
    kernels.sparse_below(batch, d_in, d_sae, cache_dir, measure=lambda *shape: {"sparse_below": sparse_below})


def test_the_switch_point_is_measured_once_per_machine_and_shape_then_read_back(tmp_path, monkeypatch):
    measured = []

    def measure(batch, d_in, d_sae):
        measured.append((batch, d_in, d_sae))
        return {"sparse_below": 0.25, "dense_ms": 3.0}

    def never(*shape):
        raise AssertionError("measured again")

    assert kernels.sparse_below(1024, 640, 2048, tmp_path, measure) == 0.25
    assert kernels.sparse_below(1024, 640, 2048, tmp_path, never) == 0.25
    assert kernels.sparse_below(512, 640, 2048, tmp_path, measure) == 0.25
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert kernels.sparse_below(512, 640, 2048, tmp_path, measure) == 0.25
    assert measured == [(1024, 640, 2048), (512, 640, 2048), (512, 640, 2048)]
    stored = json.loads((tmp_path / kernels.SPARSE_CACHE).read_text())
    key = kernels.machine_key(512, 640, 2048)
    assert key in stored and stored[key]["dense_ms"] == 3.0 and len(stored) == 3
    assert kernels.cpu_model() in key and torch.__version__ in key and "7 threads" in key
    torch.use_deterministic_algorithms(not torch.are_deterministic_algorithms_enabled())
    assert kernels.machine_key(512, 640, 2048) != key, "deterministic kernels time differently"


def test_the_cpu_model_names_its_family_model_and_stepping_where_linux_gives_them(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                    "model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\n")
    real = Path
    monkeypatch.setattr(kernels, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    assert kernels.cpu_model() == "AMD EPYC (cpu family 25, model 17, stepping 1)"
    info.write_text("model name\t: Some CPU\n")
    assert kernels.cpu_model() == "Some CPU"


def test_the_switch_point_is_where_the_sparse_pass_s_time_line_crosses_the_dense_time(monkeypatch):
    timed = []

    def time_pass(sparse, density):  # dense 1 s; sparse 0.2 s + 2 s per unit of density: even at 0.4
        timed.append((sparse, density))
        return 0.2 + 2 * density if sparse else 1.0
    monkeypatch.setattr(kernels, "MEASURE_BUDGET_S", float("inf"))
    result = kernels.switch_point(time_pass)
    assert result == {"sparse_below": 0.4, "dense_ms": 1000.0, "sparse_ms": {"0.01": 220.0, "0.2": 600.0}}
    assert timed[:3] == [(False, 0.01), (True, 0.01), (True, 0.2)]  # in turn, round after round
    assert len(timed) == 3 * (kernels.MEASURE_ROUNDS + 1)


@pytest.mark.parametrize("sparse_low, sparse_high, below", [
    (1.5, 2.0, 0.0),  # slower even at the lower density
    (0.1, 0.1, 0.2),  # no growth measured: faster across the densities timed, no further
    (0.1, 0.15, 1.0),  # the crossing lies beyond every density
])
def test_the_switch_point_at_its_edges(sparse_low, sparse_high, below):
    low, high = kernels.DENSITIES
    result = kernels.switch_point(lambda sparse, density: (sparse_low if density == low else sparse_high) if sparse else 1.0)
    assert result["sparse_below"] == below


def test_the_measurement_stops_once_its_budget_is_spent():
    timed = []
    kernels.switch_point(lambda sparse, density: timed.append(sparse) or 1.0)  # 3 s a round
    assert len(timed) == 2 * 3  # the warm-up round, and one timed round


@pytest.mark.parametrize("key, b_enc, sparse_below, sparse", [
    ("baseline/run_0_baseline", -5.0, 0.1, True),
    ("baseline/run_0_baseline", 0.0, 0.1, False),
    ("baseline/run_0_baseline", -5.0, 0.0, False),
    ("baseline/run_0_topk", 0.0, 0.1, True),  # k 8 of 512
    ("baseline/run_0_topk", 0.0, 0.01, False),
    ("zscore_ortho/run_7_adaptive_ln", -5.0, 1.0, False),  # its own encoder: no sparse step
])
def test_the_trainer_switches_at_the_measured_density(tmp_path, monkeypatch, key, b_enc, sparse_below, sparse):
    monkeypatch.setenv("SAE_HARNESS_CACHE", str(tmp_path))
    switch_point_file(tmp_path, 256, D_IN, D_SAE, sparse_below)
    plugin = experiment.find_plugin(key)
    cfg = experiment.build_config("tiny", key)
    torch.manual_seed(0)
    sae = plugin.sae_class(D_IN, D_SAE, plugin.hyperparams_class(**({"k": K} if "topk" in key else {})), cfg)
    with torch.no_grad():
        sae.b_enc.fill_(b_enc)
    trainer = plugin.trainer_class(sae, cfg)
    x = torch.randn(256, D_IN) * 2
    trainer.step(x, 0)
    assert trainer.sparse is sparse and not sae.sparse_backward  # decided at step 0, taken from step 1
    trainer.step(x, 1)
    assert sae.sparse_backward is sparse


def test_other_devices_keep_the_dense_step_unmeasured(tmp_path):
    latents = torch.zeros(4, 8, device="meta")
    assert not kernels.use_sparse_step(latents, 3, 0, True, tmp_path, measure=pytest.fail)
    assert not (tmp_path / kernels.SPARSE_CACHE).exists()


def test_the_density_is_checked_every_few_steps_only(tmp_path):
    switch_point_file(tmp_path, 4, 3, 8, 0.5)
    latents = torch.ones(4, 8)  # all fire: dense, when checked
    assert kernels.use_sparse_step(latents, 3, kernels.CHECK_EVERY + 1, True, tmp_path)
    assert not kernels.use_sparse_step(latents, 3, kernels.CHECK_EVERY, True, tmp_path)


def test_a_topk_run_logs_the_same_on_the_sparse_step_as_on_the_dense_one(run_tiny, tmp_path, monkeypatch):
    """The tiny preset's 32 steps, AuxK acting from step 4, once with the switch point measured at
    density 0 (dense throughout) and once at 1 (sparse from step 1)."""
    sparse_decodes = []
    dense_decode = kernels.decode
    monkeypatch.setattr(kernels, "decode", lambda f, w, sparse: sparse_decodes.append(sparse) or dense_decode(f, w, sparse))
    logs = {}
    torch.use_deterministic_algorithms(True)  # the switch point is stored under a CPU run's kernel mode
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # and its threads: the run takes these
    for sparse_below in (0.0, 1.0):
        monkeypatch.setenv("SAE_HARNESS_CACHE", str(tmp_path / f"cache_{sparse_below}"))
        switch_point_file(cache_dir(), 256, 64, 256, sparse_below)
        sparse_decodes.clear()
        # b_dec from 0: latents die on tiny, so that AuxK has something to act on
        _, run_dir = run_tiny("run_0_topk", hyperparams={"k": 8, "dead_steps": 3, "b_dec_init": "zeros"})
        assert any(sparse_decodes) is (sparse_below == 1.0)
        logs[sparse_below] = read_log(run_dir)
    dense, sparse = logs[0.0], logs[1.0]
    assert [r["step"] for r in sparse] == [r["step"] for r in dense] and len(dense) >= 3
    assert dense[-1]["auxiliary_reconstruction_loss"] > 0
    for dense_record, sparse_record in zip(dense, sparse):
        assert set(sparse_record) == set(dense_record)
        for name, value in dense_record.items():
            assert sparse_record[name] == pytest.approx(value, rel=RTOL, abs=1e-7), (dense_record["step"], name)


@pytest.fixture
def torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_each_harness_process_takes_its_share_of_the_cores_and_says_so(tmp_path, monkeypatch, capsys, torch_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    other = os.getppid()  # stands for another live harness process
    (tmp_path / str(other)).write_text(kernels.process_started(other))
    (tmp_path / str(2**22 + 1)).write_text("1")  # above Linux's largest pid: a process that has ended
    (tmp_path / "1").write_text("-1")  # pid 1 runs, but is not the process that registered: a reused pid
    assert kernels.take_thread_share(tmp_path, cores=4) == 2 and torch.get_num_threads() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(os.getpid()), str(other)])
    assert "torch threads: 2, this process's share" in capsys.readouterr().err
    (tmp_path / str(other)).unlink()  # as it does when it exits
    assert kernels.take_thread_share(tmp_path, cores=4) == 4  # alone again: every core


def test_omp_num_threads_decides_where_set_and_a_bad_value_is_refused(tmp_path, monkeypatch, torch_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as Ray sets it for a worker of one CPU
    assert kernels.take_thread_share(tmp_path, cores=4) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "all")
    with pytest.raises(kernels.HarnessError, match="OMP_NUM_THREADS=all is no number of threads"):
        kernels.take_thread_share(tmp_path, cores=4)


@pytest.mark.e2e  # starts a Python process
def test_a_harness_process_is_registered_from_its_imports_until_it_exits(tmp_path):
    """So that two commands started side by side count each other before either takes its share."""
    listed = subprocess.run([sys.executable, "-c", "import os, kernels\n"
                             "print(os.getpid(), *os.listdir(kernels.process_registry()))"],
                            cwd=ROOT, env={**os.environ, "SAE_HARNESS_CACHE": str(tmp_path)}, capture_output=True,
                            text=True, check=True).stdout.split()
    assert len(listed) == 2 and listed[0] == listed[1]
    (registry,) = (tmp_path / "processes").iterdir()
    assert list(registry.iterdir()) == []  # removed at exit
