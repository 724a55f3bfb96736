"""study and sweep on a Ray cluster (--workers N, --ray ADDRESS): each run a Ray task, with the
same results as the local mode, run for run, and nothing lost or noted twice when a worker dies.
One local Ray cluster of 2 CPUs serves the whole module (starting one costs seconds)."""

import dataclasses
import json
import os
import signal
import socket
import textwrap
import threading

import pytest
import ray
import torch
from helpers import claimed_by_another_process, cli, ctrl_c_raises

import cluster
import experiment
import studies

pytestmark = pytest.mark.e2e  # every test here starts a Ray cluster

TINY = ["--preset", "tiny", "--tokens", "2048"]
GRID = ["--grid", "sparsity_penalty=0.01,0.16", "--seeds", "2"]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    assert cluster.connect(None, num_cpus=2)
    yield
    ray.shutdown()


def finished_runs(runs) -> dict[str, dict]:
    """label -> final_info.json of each run of the one sweep under runs/."""
    (manifest,) = runs.glob("sweeps/*/manifest.json")
    return {row["run"]: json.loads((manifest.parent / row["run"] / "final_info.json").read_text())
            for row in json.loads(manifest.read_text())["finished"]}


def test_a_sweep_on_two_ray_workers_gives_the_local_sweeps_metrics_and_weights_run_for_run(tmp_path):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    for runs, extra in ((local, []), (on_ray, ["--workers", "2"])):
        result = cli("sweep", "--plugin", "run_0_baseline", *TINY, *GRID, "--runs", str(runs),
                     "--notes", str(runs / "notes.md"), *extra)
        assert result.exit_code == 0, result.output
    assert sum(line.startswith("[") and ": trained, L0 " in line for line in result.output.splitlines()) == 4
    here, there = finished_runs(local), finished_runs(on_ray)
    assert sorted(here) == sorted(there) and len(here) == 4
    # Where it ran and whether the first run harvested the cache (on Ray, the driver did) differ.
    ignored = {"provenance", "activations_from_cache"}
    for label, info in here.items():
        assert info["status"] == "completed"
        assert {k: v for k, v in there[label].items() if k not in ignored} == {
            k: v for k, v in info.items() if k not in ignored}, label
        for weights in ("sae_weights.safetensors", "plugin_state.safetensors"):
            (mine,) = local.glob(f"sweeps/*/{label}/{weights}")
            (theirs,) = on_ray.glob(f"sweeps/*/{label}/{weights}")
            assert mine.read_bytes() == theirs.read_bytes(), (label, weights)
    notes = (on_ray / "notes.md").read_text()
    assert all(notes.count(f"Run folder: {folder}\n") == 1 for folder in on_ray.glob("sweeps/*/*=*"))


STEP_LOGGER = '''"""{title}: {description}"""
import os
import signal
import time
from pathlib import Path

from plugins.baseline import run_0_baseline as parent

STEPS, FLAG = Path({steps!r}), Path({flag!r})


class Trainer(parent.Trainer):
    def after_step(self, x, out, step):
        super().after_step(x, out, step)
        with open(STEPS, "a") as fh:
            fh.write(f"{{self.run_cfg.sparsity_penalty}} {{self.run_cfg.seed}} {{step}} {{os.getpid()}}\\n")
{then}'''


def step_logger(folder, name: str, description: str, steps, flag, then: str):
    """A scratch run `name`: the baseline, whose trainer appends 'penalty seed step pid' to
    `steps` after each step, then runs `then` (the rest of after_step's body; FLAG is `flag`)."""
    title = name.split("_", 2)[2].replace("_", " ").capitalize()
    (folder / f"{name}.py").write_text(STEP_LOGGER.format(title=title, description=description, steps=str(steps),
                                                           flag=str(flag), then=textwrap.indent(then, " " * 8)))
    return experiment.find_plugin(f"{folder.name}/{name}")


def trained_steps(steps, *by: str) -> dict[tuple[str, ...], list[int]]:
    """The values of `by` (of penalty, seed, pid) -> the steps trained with them, in order."""
    found = {}
    for line in steps.read_text().splitlines():
        row = dict(zip(("penalty", "seed", "step", "pid"), line.split()))
        found.setdefault(tuple(row[name] for name in by), []).append(int(row["step"]))
    return found


def test_a_worker_killed_mid_run_is_retried_from_its_checkpoint_and_each_run_is_noted_once(tmp_path, scratch_study):
    steps, killed = tmp_path / "steps.txt", tmp_path / "killed"
    plugin = step_logger(scratch_study, "run_1_dies_once", "the worker is killed mid-run the first time it trains "
                         "penalty 0.16", steps, killed,
                         "if self.run_cfg.sparsity_penalty == 0.16 and step == 7 and not FLAG.exists():\n"
                         "    FLAG.touch()\n"
                         "    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or a lost node would\n")
    runs, notes = tmp_path / "runs", tmp_path / "notes.md"
    overrides = dict(tokens=4096, seed=42, device="cpu", evals=("core",))
    jobs = studies.sweep_jobs(plugin, "tiny", ["sparsity_penalty=0.01,0.16"], 1, overrides, runs / "s")
    for job in jobs:
        job.cfg.checkpoint_every = 3  # checkpoints after steps 2, 5, 8, ...: the kill at step 7 loses steps 6-7
    rows = studies.run_jobs(jobs, notes, runs, remote=cluster.runner(2, None))
    assert killed.exists()
    assert [row["how"] for row in rows] == ["trained", "resumed"]
    assert all(row["info"]["status"] == "completed" and row["info"]["training_steps"] == 16 for row in rows)
    attempts = trained_steps(steps, "penalty", "pid")  # (penalty, worker pid) -> the steps it trained
    assert [trained for (penalty, _), trained in attempts.items() if penalty == "0.01"] == [list(range(16))]
    # killed after step 7 (its last checkpoint after step 5), then resumed in another process
    assert [trained for (penalty, _), trained in attempts.items() if penalty == "0.16"] == [
        list(range(8)), list(range(6, 16))]
    text = notes.read_text()
    assert text.count("## Run 1: Dies once") == 2
    assert all(text.count(f"Run folder: {job.run_dir}\n") == 1 for job in jobs)


LOAD_LOGGER = '''"""Logs model loads: the baseline, whose module (imported once per process) makes every model
load of its process append the process's pid to a file."""
import os
from pathlib import Path

import experiment
from plugins.baseline import run_0_baseline as parent

LOADS, load = Path({loads!r}), experiment.load_model


def logged_load(*args, **kwargs):
    with open(LOADS, "a") as fh:
        fh.write(f"{{os.getpid()}}\\n")
    return load(*args, **kwargs)


experiment.load_model = logged_load
'''


def test_a_ray_task_fails_saying_so_and_leaves_alone_a_folder_another_process_is_training_in(tmp_path):
    cfg = studies.job_config(experiment.find_plugin("baseline/run_0_baseline"), "tiny", {}, dict(tokens=2048))
    folder = tmp_path / "runs" / "sweeps" / "sparsity_penalty=0.04,seed=42"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # the other process has begun: no checkpoint yet
    with claimed_by_another_process(folder):
        how, info, _ = ray.get(cluster.run_in_worker.remote(dataclasses.asdict(cfg), str(folder), "trained",
                                                            str(tmp_path / "notes.md"), str(tmp_path / "activations")))
    assert how == "failed" and "another process is training" in info["error"]
    assert [p.name for p in folder.iterdir()] == ["config.json"]


def test_a_ray_worker_loads_the_model_once_for_all_the_runs_it_takes(tmp_path, scratch_study, monkeypatch):
    loads = tmp_path / "loads.txt"
    (scratch_study / "run_1_logs_loads.py").write_text(LOAD_LOGGER.format(loads=str(loads)))
    monkeypatch.setattr(experiment, "load_model", experiment.load_model)  # put back after the plugin's wrapper here
    plugin = experiment.find_plugin("scratch_test_study/run_1_logs_loads")
    runs, notes = tmp_path / "runs", tmp_path / "notes.md"
    jobs = studies.sweep_jobs(plugin, "tiny", ["sparsity_penalty=0.01,0.02,0.04,0.08"], 1,
                              dict(tokens=2048, seed=42, device="cpu", evals=("core",)), runs / "s")
    rows = studies.run_jobs(jobs, notes, runs, remote=cluster.runner(2, None))
    assert [row["how"] for row in rows] == ["trained"] * 4
    in_workers = [int(pid) for pid in loads.read_text().split() if int(pid) != os.getpid()]  # the driver's: caches
    assert len(in_workers) == len(set(in_workers)) < len(jobs)  # once per worker, and a worker took several runs


def test_each_run_asks_ray_for_its_share_of_the_cluster():
    assert cluster.share_per_run(2) == (1, 0)  # 2 CPUs, no GPU
    assert cluster.share_per_run(1) == (2, 0)
    assert cluster.share_per_run(3) == (0.6666, 0)  # a fraction Ray takes, three fitting at once
    assert cluster.share_per_run(0) == (2, 0)  # no --workers: one run per node


def test_ctrl_c_on_the_driver_stops_the_runs_at_a_checkpoint_and_the_same_call_resumes_them(tmp_path, scratch_study):
    steps, go = tmp_path / "steps.txt", tmp_path / "go"
    plugin = step_logger(scratch_study, "run_1_slow", "a tenth of a second per step, and from step 15 on five "
                         "seconds a step until the flag file exists, so that a test's Ctrl-C lands mid-run however "
                         "loaded the machine", steps, go,
                         "time.sleep(0.1)\n"
                         "waited = 0.0\n"
                         "while step >= 15 and not FLAG.exists() and waited < 5:\n"
                         "    time.sleep(0.05)\n"
                         "    waited += 0.05\n")
    runs, notes = tmp_path / "runs", tmp_path / "notes.md"
    jobs = studies.sweep_jobs(plugin, "tiny", ["sparsity_penalty=0.04"], 2,
                                 dict(tokens=8192, seed=42, device="cpu", evals=("core",)), runs / "s")
    for job in jobs:
        job.cfg.checkpoint_every = 10  # the first after step 9

    stop = threading.Event()

    def ctrl_c_once_a_run_is_past_its_first_checkpoint():  # the runs slow to 5 s a step at step 15
        while not stop.wait(0.05):
            if any((job.run_dir / experiment.CHECKPOINT).exists() for job in jobs):
                return os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=ctrl_c_once_a_run_is_past_its_first_checkpoint, daemon=True).start()
    with ctrl_c_raises():  # the watcher is stopped before the handler goes back
        try:
            with pytest.raises(experiment.Interrupted):
                studies.run_jobs(jobs, notes, runs, remote=cluster.runner(2, None))
        finally:
            stop.set()
    assert not any((job.run_dir / "final_info.json").exists() for job in jobs) and not notes.exists()
    stopped = [job for job in jobs if job.run_dir.exists()]  # the other one may not have started yet
    trained = {int(seed): done for (seed,), done in trained_steps(steps, "seed").items()}  # seed -> its steps
    saved = [torch.load(job.run_dir / experiment.CHECKPOINT, weights_only=False)["step"] for job in stopped]
    assert stopped and [trained[job.cfg.seed][-1] for job in stopped] == saved  # stopped at a checkpoint
    assert max(saved) < 31  # mid-run
    go.touch()  # full speed from here
    rows = studies.run_jobs(jobs, notes, runs, remote=cluster.runner(2, None))
    assert [row["how"] for row in rows] == ["resumed" if job in stopped else "trained" for job in jobs]
    assert all(row["info"]["status"] == "completed" and row["info"]["training_steps"] == 32 for row in rows)
    assert notes.read_text().count("## Run 1: Slow") == 2


def test_an_address_where_nothing_answers_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(cluster, "build_caches", lambda cfgs: pytest.fail("work started"))
    result = cli("sweep", "--plugin", "run_0_baseline", *TINY, "--grid", "sparsity_penalty=0.01,0.16",
                 "--ray", f"127.0.0.1:{port}", "--runs", str(tmp_path / "runs"))
    assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
    assert f"--ray 127.0.0.1:{port}: nothing answers there" in result.output and "ray start --head" in result.output
    with socket.socket() as listening:  # and where something does, the check lets Ray try
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert cluster.unanswered(f"127.0.0.1:{listening.getsockname()[1]}") is None


def test_caches_are_built_largest_first_so_that_smaller_budgets_read_their_first_rows(monkeypatch):
    built = []
    monkeypatch.setattr(cluster, "build_cache", lambda cfg, progress: built.append(cfg.tokens))
    cfgs = [experiment.build_config("tiny", "baseline/run_0_baseline", tokens=n) for n in (2048, 8192, 4096, 8192)]
    assert cluster.build_caches(cfgs) == {} and built == [8192, 4096, 2048]
