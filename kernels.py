"""The SAE's training step, computed faster than its formula reads, with the same numbers.

experiment.SAE is  pre = (x − b_dec) W_enc + b_enc,  f = activation(pre),  x̂ = f W_dec + b_dec.
`SAE.training_pass` takes one of two paths where a plugin kept the pieces that these compute:

- dense, `pre_activation`: the formula's values exactly, with b_dec's gradient routed through a
  zero-valued term, so that autograd gets it from a vector-matrix product instead of a
  (B × d_sae) × (d_sae × d_in) input-gradient matmul: five matmuls per step instead of six.
- sparse, while few latents fire (`use_sparse_step`), as the TopK kernels of OpenAI's
  sparse_autoencoder and EleutherAI's sparsify do: the encoder's forward stays one dense matmul
  (top-k needs every pre-activation), but its backward (`SparseBackwardPre`) and the decoder
  forward and backward (`decode` over `ActiveDecode`) read only the active (token, latent) sites.
  `embedding_bag` with per-sample weights is the sparse × dense product there: each output row
  is a weighted sum of a few gathered rows. The same gradients as the dense path (tested).

Whether the sparse step is faster depends on the machine and the shapes, so the switch point is
measured on the machine, once per shape, and cached (`sparse_below`).

Shapes: x (B, d_in), W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in),
pre and f (B, d_sae), x̂ (B, d_in).
"""

from __future__ import annotations

from common import HarnessError, cache_dir, console  # first: its import guards

import atexit
import fcntl
import functools
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The sampled product's CSR site list is torch's one "beta" sparse layout; it is used read-only.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Device types where the sparse step is measured and may be taken. Not CUDA: unmeasured there,
# and `nonzero` would sync the host every step.
SPARSE_DEVICES = ("cpu",)
CHECK_EVERY = 10  # steps between density checks
SPARSE_CACHE = "sparse_step.json"  # the measured switch points, under the harness's cache dir
DENSITIES = (0.01, 0.2)  # where the sparse pass is timed for the switch point
MEASURE_BUDGET_S = 1.5  # timed rounds stop once the passes took this long...
MEASURE_ROUNDS = 5  # ...or after this many


def pre_activation(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """(x − b_dec) W_enc + b_enc, valued exactly so; b_dec's gradient is −Σ_tokens ∂pre · W_encᵀ.
    The zero-valued term joins b_enc as one (d_sae,) bias before the batch sees it: one add over
    the (B, d_sae) pre-activations forward and one sum backward, as for b_enc alone."""
    fixed = b_dec.detach()
    return (x - fixed) @ W_enc + (b_enc - (b_dec - fixed) @ W_enc)


def token_starts(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    """(B,) where each token's sites begin in a token-sorted site list (embedding_bag's offsets)."""
    return torch.searchsorted(tokens, torch.arange(batch, device=tokens.device))


def sum_by_latent(tokens: torch.Tensor, latents: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                  d_sae: int) -> torch.Tensor:
    """(d_sae, d): row j is Σ_sites (t, j) weight · rows[t], i.e. Sᵀ rows for the sparse (B × d_sae)
    matrix S holding `weights` at the sites (tokens, latents)."""
    by_latent = stable_order(latents, d_sae)
    latent_starts = torch.searchsorted(latents[by_latent], torch.arange(d_sae, device=latents.device))
    return F.embedding_bag(tokens[by_latent], rows, latent_starts, mode="sum", per_sample_weights=weights[by_latent])


def stable_order(keys: torch.Tensor, below: int) -> torch.Tensor:
    """argsort(keys, stable=True) for keys in [0, below). On CPU by numpy's single-threaded sort (a
    radix sort for 16-bit keys): torch's parallel radix sort often stalls while other processes
    keep the cores busy (on the shared 2-core machine, 65k keys took a median 195-250 ms there
    against 0.4 ms here). Keys on a GPU are sorted there, by torch."""
    if keys.device.type != "cpu":
        return torch.argsort(keys, stable=True)
    keys = keys.numpy()
    return torch.from_numpy(np.argsort(keys.astype(np.uint16) if below <= 2**16 else keys, kind="stable"))


class SparseBackwardPre(torch.autograd.Function):
    """pre = (x − b_dec) W_enc + b_enc, valued exactly as `pre_activation`, whose backward reads
    only the non-zeros of ∂loss/∂pre: after a top-k (or any activation that passes no gradient to
    the latents it zeroes) those are the selected sites, and AuxK's. Each parameter gradient is
    then a sum over those sites instead of a (B × d_in × d_sae) matmul."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec):
        x_c = x - b_dec
        ctx.save_for_backward(x_c, W_enc)
        return x_c @ W_enc + b_enc  # the dense path's operations, so the same values bit for bit

    @staticmethod
    def backward(ctx, grad_pre):
        x_c, W_enc = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        tokens, latents = grad_pre.nonzero(as_tuple=True)  # sorted by token
        grad = grad_pre[tokens, latents]
        grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, latents, grad)
        grad_x = None  # training activations need none
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(latents, W_enc.T.contiguous(), token_starts(tokens, len(x_c)), mode="sum",
                                     per_sample_weights=grad)
        grad_W_enc = sum_by_latent(tokens, latents, grad, x_c, d_sae).T
        return grad_x, grad_W_enc, grad_b_enc, -(W_enc @ grad_b_enc)  # b_dec: x_c's gradient summed over tokens


class ActiveDecode(torch.autograd.Function):
    """f W over the non-zeros of f only: (B, m) × (m, d) -> (B, d). The backward gives f's gradient
    at f's non-zeros only (a sampled product, (∂out Wᵀ) read at those sites), zero elsewhere: exact
    for the parameters wherever a latent at 0 passes no gradient back to them, as after a ReLU or
    a ReLU'd top-k (for AuxK's raw top-k values, all but a value landing on exactly 0.0)."""

    @staticmethod
    def forward(ctx, f, weight):
        tokens, latents = f.nonzero(as_tuple=True)  # sorted by token
        values = f[tokens, latents]
        starts = token_starts(tokens, len(f))
        ctx.save_for_backward(weight, tokens, latents, starts, values)
        ctx.f_shape = f.shape
        return F.embedding_bag(latents, weight, starts, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad_out):
        weight, tokens, latents, starts, values = ctx.saved_tensors
        grad_f = grad_weight = None
        if ctx.needs_input_grad[0]:
            row_starts = torch.cat([starts, starts.new_tensor([len(latents)])])
            sites = torch.sparse_csr_tensor(row_starts, latents, torch.zeros_like(values), size=ctx.f_shape,
                                            check_invariants=False)  # built from nonzero(): valid
            at_sites = torch.sparse.sampled_addmm(sites, grad_out, weight.T).values()
            grad_f = torch.zeros(ctx.f_shape, dtype=values.dtype, device=values.device)
            grad_f.index_put_((tokens, latents), at_sites)
        if ctx.needs_input_grad[1]:
            grad_weight = sum_by_latent(tokens, latents, values, grad_out, weight.shape[0])
        return grad_f, grad_weight


def decode(f: torch.Tensor, weight: torch.Tensor, sparse: bool) -> torch.Tensor:
    """f @ weight, (B, m) × (m, d): over f's non-zeros only on the sparse step (`ActiveDecode`)."""
    return ActiveDecode.apply(f, weight) if sparse else f @ weight


def use_sparse_step(latents: torch.Tensor, d_in: int, step: int, current: bool, cache_dir: Path,
                    measure=None) -> bool:
    """Whether the coming steps should take the sparse step: every CHECK_EVERY steps, this step's
    latent density (B, d_sae) against the density below which it measured faster on this machine
    at these shapes (`sparse_below`; `measure` as there)."""
    if latents.device.type not in SPARSE_DEVICES:
        return False
    if step % CHECK_EVERY:
        return current
    batch, d_sae = latents.shape
    density = (latents.detach() > 0).float().mean().item()
    return density < sparse_below(batch, d_in, d_sae, cache_dir, measure)


def machine_key(batch: int, d_in: int, d_sae: int) -> str:
    """What the switch point depends on: the CPU, torch, its threads and whether its kernels are the
    deterministic ones (every CPU run's; index_put_ then adds up in one thread), and the step's shapes."""
    mode = "deterministic" if torch.are_deterministic_algorithms_enabled() else "default"
    return (f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {mode} kernels, "
            f"batch {batch} x d_in {d_in} x d_sae {d_sae}")


def cpu_model() -> str:
    """The CPU's model name, as Linux reports it, with its family, model and stepping where it names
    them (a VM's name, "AMD EPYC", can hide two generations whose kernels round differently)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    first = {}
    for key, _, value in (line.partition(":") for line in lines):
        first.setdefault(key.strip(), value.strip())
    name = first.get("model name") or platform.processor() or platform.machine()
    ids = ", ".join(f"{key} {first[key]}" for key in ("cpu family", "model", "stepping") if first.get(key))
    return f"{name} ({ids})" if ids else name


def sparse_below(batch: int, d_in: int, d_sae: int, cache_dir: Path, measure=None) -> float:
    """The latent density below which the sparse step is faster here: read from
    cache_dir/SPARSE_CACHE, or measured once (`measure(batch, d_in, d_sae)` -> a dict with
    `sparse_below`, default `measure_sparse_below`) and stored there, so that every later run on
    this machine takes the same decisions. One process measures at a time (a file lock)."""
    key, path = machine_key(batch, d_in, d_sae), Path(cache_dir) / SPARSE_CACHE
    known = read_measurements(path)
    if key not in known:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            known = read_measurements(path)  # another process may have measured meanwhile
            if key not in known:
                known[key] = (measure or measure_sparse_below)(batch, d_in, d_sae)
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(json.dumps(known, indent=2))
                os.replace(tmp, path)
    return float(known[key]["sparse_below"])


def read_measurements(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def measure_sparse_below(batch: int, d_in: int, d_sae: int) -> dict:
    """This machine's switch point at these shapes, timed (`switch_point` of `loss_pass_timer`)."""
    return switch_point(loss_pass_timer(batch, d_in, d_sae))


def switch_point(time_pass) -> dict:
    """The latent density below which the sparse pass is faster than the dense one, with the
    timings; `time_pass(sparse, density)` -> seconds. The sparse pass's time grows about linearly
    with the density (its sums run over the active sites), the dense one's not at all: both are
    timed, the sparse one at the two DENSITIES, in turn, so that load from elsewhere hits all
    three alike, each the best of the rounds after a warm-up round; the crossing of the sparse
    line with the dense time is the switch point (0 where sparse is slower even at the lower
    density, at most 1). Rounds go on until MEASURE_BUDGET_S are spent (at least one timed
    round, at most MEASURE_ROUNDS)."""
    low, high = DENSITIES
    best, spent = {}, 0.0
    for timed_round in range(MEASURE_ROUNDS + 1):
        for setting in ((False, low), (True, low), (True, high)):
            seconds = time_pass(*setting)
            spent += seconds
            if timed_round:  # the first round warms up
                best[setting] = min(best.get(setting, seconds), seconds)
        if timed_round and spent > MEASURE_BUDGET_S:
            break
    dense, sparse_low, sparse_high = best[False, low], best[True, low], best[True, high]
    if sparse_low >= dense:
        below = 0.0
    elif sparse_high <= sparse_low:  # no growth measurable: faster across the densities timed
        below = high
    else:
        below = min(1.0, low + (dense - sparse_low) * (high - low) / (sparse_high - sparse_low))
    return dict(sparse_below=round(below, 4), dense_ms=round(dense * 1e3, 3),
                sparse_ms={str(low): round(sparse_low * 1e3, 3), str(high): round(sparse_high * 1e3, 3)})


def loss_pass_timer(batch: int, d_in: int, d_sae: int):
    """`time_pass(sparse, density)`: seconds for the base SAE's loss forward and backward (ReLU,
    random unit-norm weights and inputs of these shapes), b_enc placed so that this fraction of
    the latents fires, on the dense or the sparse path."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=gen)
    W_dec = F.normalize(torch.randn(d_sae, d_in, generator=gen), dim=1).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc, b_dec = torch.zeros(d_sae, requires_grad=True), torch.zeros(d_in, requires_grad=True)
    params = (W_enc, b_enc, W_dec, b_dec)
    with torch.no_grad():
        pre_sample = (x @ W_enc).flatten()[:1_000_000]  # torch.quantile's size limit is 16M

    @functools.cache
    def firing_above(density: float) -> torch.Tensor:
        return torch.quantile(pre_sample, 1 - density)

    def time_pass(sparse: bool, density: float) -> float:
        with torch.no_grad():
            b_enc.copy_(-firing_above(density))
        for param in params:  # as the trainer's zero_grad(set_to_none=True)
            param.grad = None
        start = time.perf_counter()
        if sparse:
            pre = SparseBackwardPre.apply(x, W_enc, b_enc, b_dec)
        else:
            pre = pre_activation(x, W_enc, b_enc, b_dec)
        x_hat = decode(torch.relu(pre), W_dec, sparse) + b_dec
        (x - x_hat).pow(2).sum(-1).mean().backward()
        return time.perf_counter() - start
    return time_pass


# ----------------------------------------------------------------------------------------------
# The device a run takes and how its kernels compute: precision, determinism, processes.

STEP_DTYPES = ("fp32", "bf16")  # --dtype


def checked_dtype(name: str) -> str:
    if name not in STEP_DTYPES:
        raise HarnessError(f"unknown --dtype '{name}'; use {' or '.join(STEP_DTYPES)}")
    return name


def step_autocast(dtype: str, device: torch.device):
    """The SAE step's forward and loss terms under autocast to bf16 for --dtype bf16 (as SAELens's
    `autocast` flag; CPU autocast too): matmuls in bf16, their results promoted back to fp32 where
    fp32 biases are added, so pre, f, x̂ and the loss terms are fp32. The backward, Adam and the
    decoder-norm constraint run outside it, on the fp32 weights and gradients."""
    return torch.autocast(device.type, torch.bfloat16, enabled=checked_dtype(dtype) == "bf16")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda but no CUDA device is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def all_rows(x: torch.Tensor) -> torch.Tensor:
    """(B / world, d) on each rank -> (B, d): every rank's shard of the batch, on every rank."""
    shards = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(shards, x.contiguous())
    return torch.cat(shards)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on
    GPUs, gloo on CPU. Rank 0 harvests, logs, evaluates and writes; every rank trains on its
    own shard of each batch and DistributedDataParallel all-reduces the gradients."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def configure_kernels(cfg, device: torch.device) -> None:
    """Deterministic kernels where asked (and on every CPU run), TF32 matmuls on CUDA otherwise."""
    # On CPU too: an indexing's backward (index_put_ with accumulate) adds rows in thread order,
    # so a plugin gathering decoder rows got different bytes per process from the same seed.
    torch.use_deterministic_algorithms(cfg.deterministic or device.type == "cpu")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the SAE step's fp32 matmuls on tensor cores


# ----------------------------------------------------------------------------------------------
# Each process its share of the cores. Harness processes on one machine (two commands side by
# side, a sweep's Ray workers, torchrun's ranks) that each run a thread per core make every
# parallel pass wait for the thread another process took the core from: many times slower than
# one thread each (measured in docs/benchmark.md, "Each process its share of the cores").

def take_thread_share(registry: Path | None = None, cores: int | None = None) -> int:
    """Set torch's threads to this process's share of the cores (`cores`, default those it may
    run on) among the live harness processes of this machine (`registry`, default
    `process_registry()`), itself included, and say so in one line; OMP_NUM_THREADS, where set
    (as Ray sets it for its workers and torchrun for its ranks), decides instead. Returns the
    threads."""
    cores, registry = cores or len(os.sched_getaffinity(0)), registry or process_registry()
    register_process(registry)
    running = live_processes(registry)
    asked = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]  # "4,2": 4 at the outer level
    if asked and not (asked.isdigit() and int(asked) > 0):
        raise HarnessError(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} is no number of threads; set a "
                           "whole number from 1, or unset it for this process's share of the cores")
    if asked:  # set again: a Ray worker kept for the next run sets it anew for each run
        threads, why = int(asked), "as OMP_NUM_THREADS sets"
    else:
        threads, why = max(1, cores // running), "this process's share (OMP_NUM_THREADS overrides)"
    torch.set_num_threads(threads)
    console.print(f"torch threads: {threads}, {why}; harness processes running on these {cores} cores: {running}")
    return threads


def process_registry() -> Path:
    """The live harness processes of this machine: a folder of the harness cache per host name,
    so that nodes sharing the cache count their own."""
    return cache_dir() / "processes" / platform.node()


def register_process(registry: Path) -> None:
    """Enter this process in the registry (once): a file named by its pid, holding its start time,
    removed when it exits."""
    mine, started = registry / str(os.getpid()), process_started(os.getpid()) or ""
    if entry_text(mine) != started:  # not registered yet, or an ended process of the same pid was
        registry.mkdir(parents=True, exist_ok=True)
        scratch = registry / f".{os.getpid()}.tmp"
        scratch.write_text(started)
        os.replace(scratch, mine)  # whole, so that no reader takes a half-written entry for stale
        atexit.register(unregister, mine, os.getpid())


def unregister(entry: Path, pid: int) -> None:
    if os.getpid() == pid:  # not a forked child that inherited the exit handler
        entry.unlink(missing_ok=True)


def live_processes(registry: Path) -> int:
    """How many registered harness processes are alive; an entry whose process has ended (killed
    before it could remove it) is removed. At least this one, where /proc cannot tell (not Linux)."""
    running = 0
    for entry in registry.iterdir():
        if not entry.name.isdigit():
            continue  # another process's entry being written
        text = entry_text(entry)
        if text is not None and text == process_started(int(entry.name)):
            running += 1
        elif text is not None:
            entry.unlink(missing_ok=True)
    return max(running, 1)


def entry_text(path: Path) -> str | None:
    """A registry entry's text, None where another process has just removed it."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def process_started(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc's stat field 22), or None where
    no such process runs: a pid is reused, a pid with its start time names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # after the command name: fields 3, 4, ...


# A harness process counts from its start, not from its run's: two commands started side by side
# are both registered before either, past its imports, takes its share. Where the cache cannot be
# written, take_thread_share says so when a run starts.
try:
    register_process(process_registry())
except OSError:
    pass
