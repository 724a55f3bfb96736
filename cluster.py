"""Studies and sweeps on a Ray cluster: with `--workers N` (a local Ray cluster started for the
command) or `--ray ADDRESS` (a running one), studies.run_jobs hands each run it does not reuse
to run_on_ray (bound by `runner`), which makes it one Ray task. Ray schedules the tasks (N at once, each with its
share of the CPUs and, where the cluster has GPUs, one GPU), assigns the GPUs and retries a task
whose worker died; the harness only maps runs to tasks:

    the driver   builds every activation cache the runs read, once, before any run is scheduled;
                 submits the runs; yields each as it finishes (run_jobs prints its line)
    a worker     runs one run as the local mode does (experiment.execute), then the next it is
                 given, with the model it loaded for the first (CPU runs; a GPU run has a process
                 of its own); a retry after its worker died continues from that run's last checkpoint

Every node must see the same paths: the checkout, the runs folder, the notebook, and the
activation cache (SAE_HARNESS_CACHE) on shared storage.

Imports: the CLI's study and sweep commands import this module; it imports experiment (the core).
"""

from __future__ import annotations

from common import HarnessError, activations_dir, console  # first: its import guards

import dataclasses
import math
import os
import socket
import time
from pathlib import Path

import ray
import torch
from rich.progress import Progress

import experiment
import kernels
from runs import check_writable, claimed, left_in

# A run whose worker died (killed, out of memory, node lost) is tried again this many times.
WORKER_RETRIES = 3
# After Ctrl-C, seconds the driver waits for the runs in progress to save their checkpoints.
STOP_WAIT_S = 60


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address`, or start a local one (of num_cpus CPUs, default all)
    when it is None; True if this call started or joined it, False if this process already had one."""
    if address and (silent := unanswered(address)):
        raise HarnessError(f"--ray {address}: nothing answers there ({silent}); start the head with `ray start --head "
                           "--port 6379` and pass its HOST:PORT, or use --workers N for a local cluster")
    if ray.is_initialized():
        return False
    try:  # each run's own log is in its run folder: N runs' progress bars would bury the run lines
        ray.init(address=address or "local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        raise HarnessError(f"--ray {address}: cannot join the Ray cluster ({exc}); is `ray start --head` running "
                           "there, and, as its token authentication asks, RAY_AUTH_MODE=token set here with the "
                           "head's ~/.ray/auth_token?") from None
    return True


def unanswered(address: str, timeout_s: float = 5.0) -> str | None:
    """Why nothing accepts a connection at a HOST:PORT address, or None if something does (or the
    address names no port, as "auto"). Ray itself retries an address where nothing answers for
    minutes, silently."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def runner(workers: int, address: str | None):
    """run_on_ray bound to this cluster, for studies.run_jobs; None (one run after another, here)
    where neither --workers nor --ray asks for a cluster."""
    if workers < 0:
        raise HarnessError(f"--workers must be 0 (one run after another) or more, got {workers}")
    if not (workers or address):
        return None
    return lambda plans, notes: run_on_ray(plans, notes, workers, address)


def run_on_ray(plans: list[tuple], notes: Path, workers: int, address: str | None):
    """For each planned run (index, Job, run folder, "trained" or "resumed"), yield (index, how,
    folder, final_info, wall seconds) as its Ray task finishes; a run that fails for its own
    reasons (a HarnessError, a plugin's exception, a worker that died every retry) comes back
    with status failed. Ctrl-C cancels the tasks, which checkpoint, and raises Interrupted."""
    if not plans:  # every run was reused: no cluster to start
        return
    joined = connect(address)
    try:
        yield from finished_runs(plans, notes, workers)
    except KeyboardInterrupt:
        raise experiment.Interrupted("interrupted (the runs in progress checkpoint as they stop)") from None
    finally:
        if joined:
            ray.shutdown()


def finished_runs(plans: list[tuple], notes: Path, workers: int):
    """Build the caches, submit every run whose cache and folder are fine, yield each as it ends."""
    broken = build_caches([job.cfg for _, job, _, _ in plans])
    cpus, gpus = share_per_run(workers)
    pending = {}
    for index, job, folder, how in plans:
        why = broken.get(experiment.cache_key(job.cfg)) or (unwritable(folder) if how == "trained" else None)
        if why:
            yield index, "failed", folder, {"status": "failed", "error": why}, 0.0
            continue
        task = run_in_worker.options(num_cpus=cpus, num_gpus=gpus if job.cfg.device != "cpu" else 0,
                                     max_retries=WORKER_RETRIES)
        ref = task.remote(dataclasses.asdict(job.cfg), str(Path(folder).resolve()), how,
                          str(Path(notes).resolve()), str(activations_dir().resolve()))
        pending[ref] = (index, folder, time.perf_counter())
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending))
            index, folder, submitted = pending.pop(ref)
            how, info, wall_s = outcome(ref, submitted)
            yield index, how, folder, info, wall_s
    finally:  # Ctrl-C, or the caller stopped: the running runs checkpoint (their SIGINT handler)
        for ref in pending:
            ray.cancel(ref)
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=STOP_WAIT_S)


def unwritable(folder: Path) -> str | None:
    """Why a new run cannot go to `folder` (as execute would refuse it), or None. Checked here,
    so that a folder a task finds was left by that task's own earlier attempt."""
    try:
        check_writable(folder)
    except HarnessError as exc:
        return str(exc)
    return None


def build_caches(cfgs: list) -> dict[str, str]:
    """Harvest each activation cache the runs read, here and once (N workers starting together
    would each harvest the same one), the largest first: a smaller budget of the same text then
    reads its first rows; returns cache key -> why, for each that could not be built."""
    broken = {}
    with Progress(console=console) as progress:
        for key, cfg in {experiment.cache_key(cfg): cfg for cfg in sorted(cfgs, key=lambda c: -c.tokens)}.items():
            try:
                build_cache(cfg, progress)
            except HarnessError as exc:
                broken[key] = str(exc)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the model's memory goes back to the GPU a worker will use
    return broken


def build_cache(cfg, progress) -> None:
    """The model on this machine's device, then the cache (read back, if it exists, to check it)."""
    model = experiment.checked_model(cfg, kernels.resolve_device(cfg.device))
    experiment.activation_data(cfg, model, progress)


def share_per_run(workers: int) -> tuple[float, int]:
    """(CPUs, GPUs) each run asks Ray for: the cluster's CPUs over the runs at once (`workers`,
    else one per GPU, else one per node), and one GPU where the cluster has any. Ray takes a
    share of at least one CPU in whole CPUs, and a fraction in at most four decimals."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    cpus = total["CPU"] / (workers or gpus or sum(node["Alive"] for node in ray.nodes()))
    return (math.floor(cpus) if cpus >= 1 else math.floor(cpus * 1e4) / 1e4), min(gpus, 1)


# The models a worker process has loaded, by name and device (experiment.checked_model): its next
# run reuses them, as run_jobs's runs in one process do. Ray keeps a CPU run's worker for the
# command's next runs (its workers end with the command, so no run reads a plugin module imported
# before an earlier command changed its file); a GPU run gets a fresh process (Ray's default for
# a task that asks for a GPU, max_calls 1): a process reads CUDA_VISIBLE_DEVICES once, and its
# next task may be given another GPU.
LOADED_MODELS: dict = {}


@ray.remote
def run_in_worker(fields: dict, folder: str, how: str, notes: str, activations: str) -> tuple[str, dict, float]:
    """One run in a Ray worker, as run_jobs runs it in the process: (how, final_info, wall seconds).
    The folder did not exist (how "trained") or held a checkpoint of an unfinished run ("resumed")
    when the run was submitted; anything else in it now was left by an attempt of this task whose
    worker died, and Ray's retry continues from there."""
    import cluster  # the worker's own modules: Ray ships this function by value, and
    import experiment  # `python experiment.py`'s experiment is __main__
    import studies

    started = time.perf_counter()
    os.environ["SAE_HARNESS_ACTIVATIONS"] = activations  # the cache the driver built
    cfg, run_dir = experiment.RunConfig(**fields), Path(folder)
    try:
        with claimed(run_dir, wait=False):  # no other process trains there now: what is there was this task's
            plugin = experiment.find_plugin(cfg.plugin)
            left, info = left_in(run_dir, plugin.source_hash(), studies.is_config_of(cfg))
            if left in ("trained", "resumed"):
                info = experiment.execute(cfg, plugin, run_dir, Path(notes), resume=left == "resumed",
                                          loaded_models=cluster.LOADED_MODELS)
    except HarnessError as exc:
        return "failed", {"status": "failed", "error": str(exc)}, time.perf_counter() - started
    # a run completed by this task's attempt whose worker died after it is what the task asked for
    return (how if left == "reused" else left), info, time.perf_counter() - started


def outcome(ref, submitted: float) -> tuple[str, dict, float]:
    """A finished task's (how, final_info, wall seconds); a task that raised, or whose worker died
    on every try, as a failed run (its wall time counted from submission)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        why = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
        return "failed", {"status": "failed", "error": f"{type(why).__name__}: {why}"}, time.perf_counter() - submitted
