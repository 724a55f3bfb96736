"""Run folders: the one place that reads and writes them.

    runs/<study>/<plugin>/<timestamp>/      (or wherever `run --out` says)
        config.json              the RunConfig the run was built from
        train_log.jsonl          the logged training steps
        final_info.json          status, metrics, verdicts, warnings, provenance
        feature_metrics.json     per-latent evaluation numbers
        sae_weights.safetensors, cfg.json    the SAE as SAELens loads it (SAE.load_from_disk)
        plugin_state.safetensors the plugin's whole state, for exact reloading
        eval_contexts.safetensors each evaluation context's rows of the headline scores (paired verdicts)
        eval_tokens.pt, checkpoint.pt, artifacts.safetensors

A run folder is any folder under a runs root, at any depth, that holds a final_info.json, and it
says itself which plugin it ran: final_info.json's `run`, or for older folders config.json's
`plugin`. `runs_table` lists them as a pandas DataFrame for one's own analysis.
"""

from __future__ import annotations

from common import ROOT, HarnessError, Interrupted, console  # first: its import guards

import importlib.metadata
import itertools
import json
import ast
import collections
import contextlib
import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
import torch

from kernels import cpu_model

CHECKPOINT = "checkpoint.pt"  # an unfinished run's resumable state; removed once the run is completed


@dataclass
class Run:
    folder: Path
    study: str
    plugin: str  # file stem, e.g. run_7_adaptive_ln
    number: int
    title: str  # the plugin docstring's first line
    parent: str | None
    info: dict  # final_info.json
    config: dict  # config.json
    log: list[dict]  # train_log.jsonl
    color: str = "#7f7f7f"  # plot.py gives each run its colour

    @property
    def failed(self) -> bool:
        return self.info.get("status") == "failed"

    @property
    def label(self) -> str:
        """'Run 7: Adaptive Layer Normalization': the title up to its colon, shortened."""
        name = re.sub(r"\s+Implementation$", "", self.title.split(":")[0].rstrip(". "))
        short = re.sub(r"\s+(and|with|for|of|the|to|in|on|by|from)$", "", textwrap.shorten(name, 36, placeholder=""))
        return f"Run {self.number}: {short}{'…' if short != name else ''}"

    @property
    def setting(self) -> str:
        c = self.config
        return (f"{c.get('preset')} preset · {c.get('model')} layer {c.get('layer')} · "
                f"{c.get('dict_size')} latents · {c.get('tokens', 0):,} tokens")


def stamp_time(folder: Path) -> float:
    try:
        return time.mktime(time.strptime(folder.name[:15], "%Y%m%d-%H%M%S"))  # a study's <stamp>-seed<seed> too
    except ValueError:
        return folder.stat().st_mtime


def read_json(path: Path) -> dict:
    """The JSON object in path, {} if there is no such file; HarnessError if it holds no object."""
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HarnessError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise HarnessError(f"{path} holds {type(value).__name__}, not a JSON object")
    return value


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def find_runs(root: Path) -> list[Path]:
    """Every folder at any depth under root (root included) that holds a final_info.json, oldest
    first: by the folder's timestamp name, else its modification time. Runs still training, or
    interrupted before they finished, have none."""
    folders = {path.parent for path in root.rglob("final_info.json") if path.is_file()}
    return sorted(folders, key=lambda folder: (stamp_time(folder), str(folder)))


def identify(folder: Path, info: dict) -> dict:
    """The study, plugin (file stem), number, title and parent of the run in folder, as the run
    recorded them in final_info.json's `run`; for a folder written before runs recorded that,
    config.json's `plugin` (study/stem), titled from the file name, parent unknown."""
    run = info.get("run") if isinstance(info.get("run"), dict) else {}
    if run.get("study") and run.get("plugin"):
        study, plugin = str(run["study"]), str(run["plugin"])
    else:
        run = {}
        study, _, plugin = str(read_json(folder / "config.json").get("plugin", "")).rpartition("/")
    found = re.match(r"run_(\d+)", plugin)
    if not study or not found:
        raise HarnessError(f"{folder} does not say which plugin it ran (no `run` in its final_info.json, "
                           "no study/run_<n>_<slug> `plugin` in its config.json)")
    recorded = run.get("number")
    return dict(study=study, plugin=plugin, number=recorded if isinstance(recorded, int) else int(found.group(1)),
                title=run.get("title") or plugin.split("_", 2)[-1].replace("_", " "), parent=run.get("parent"))


def read_run(folder: Path) -> Run:
    info = read_json(folder / "final_info.json")
    who = identify(folder, info)
    return Run(folder, who["study"], who["plugin"], who["number"], who["title"], who["parent"], info,
               read_json(folder / "config.json"), read_json_lines(folder / "train_log.jsonl"))


Index = list[tuple[Path, dict, dict]]  # (folder, identify()'s answer, final_info) of each run, oldest first


def run_index(root: Path) -> Index:
    """Every run under root, oldest first, with who it is; a folder that cannot say which plugin it
    ran (or whose final_info.json is unreadable) is passed over with a note."""
    index = []
    for folder in find_runs(root):
        try:
            info = read_json(folder / "final_info.json")
            index.append((folder, identify(folder, info), info))
        except HarnessError as exc:
            console.print(f"[yellow]note:[/yellow] {exc}; passed over")
    return index


def newest(index: Index, plugin_name: str, same_data_as: dict | None = None) -> dict | None:
    """final_info of the newest completed run in index of plugin_name (its stem, any study; or
    study/stem), optionally only among runs on the same activations as same_data_as."""
    for _, who, info in reversed(index):
        if plugin_name not in (who["plugin"], f"{who['study']}/{who['plugin']}") or info.get("status") != "completed":
            continue
        if same_data_as is None or info.get("activation_cache") == same_data_as.get("activation_cache"):
            return info
    return None


def latest_run(runs_root: Path, plugin_name: str, same_data_as: dict | None = None) -> dict | None:
    """final_info of the newest completed run of plugin_name under runs_root (any study, any
    depth), optionally only among runs on the same activations (same `activation_cache`)."""
    return newest(run_index(runs_root), plugin_name, same_data_as)


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on `.<name>.lock` beside `path`, for a read-modify-write of a file several
    processes share (a sweep's manifest). The lock file stays (removing it would race a waiter); the
    kernel drops the lock if the process dies."""
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks
            raise HarnessError(f"cannot lock {handle.name} ({exc.strerror}); put --runs on a local disk") from None
        yield


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # its own: two processes may write one manifest
    tmp.write_text(text)
    os.replace(tmp, path)


def runs_root(run_dir: Path, plugin_name: str) -> Path:
    """Where a run's sibling runs live: <root> of <root>/<study>/<plugin>/<timestamp>, else the
    folder holding an --out folder."""
    if len(run_dir.parents) > 2 and run_dir.parent.name == plugin_name:
        return run_dir.parents[2]
    return run_dir.parent


HEADLINE = (  # what a notebook entry lists, and where final_info.json holds it
    ("CE-loss score", ("metrics", "model_performance_preservation", "ce_loss_score")),
    ("KL score", ("metrics", "model_behavior_preservation", "kl_div_score")),
    ("explained variance (whole set)", ("metrics", "reconstruction_quality", "explained_variance_whole_set")),
    ("MSE", ("metrics", "reconstruction_quality", "mse")),
    ("L0", ("metrics", "sparsity", "l0")),
    ("L1", ("metrics", "sparsity", "l1")),
    ("L2 ratio", ("metrics", "shrinkage", "l2_ratio")),
    ("dead latents (never fire on the evaluation text)", ("metrics", "sparsity", "dead_fraction_eval")),
    ("final training loss", ("final_loss",)),
)


# A synthetic run's own headline (synthetic.py), listed first; it shares L0, explained variance,
# L2 ratio and dead latents with HEADLINE, and has none of the language model's scores.
GROUND_TRUTH_HEADLINE = tuple((label, ("metrics", "ground_truth", key)) for label, key in (
    ("MCC", "mcc"), ("F1", "f1"), ("precision", "precision"), ("recall", "recall"),
    ("feature uniqueness", "uniqueness")))
ALL_HEADLINES = (*GROUND_TRUTH_HEADLINE, *HEADLINE)

# The headline scores evaluation also gives a bootstrap standard error for (metrics.bootstrap_se).
HEADLINE_SE = {"CE-loss score": "ce_loss_score", "KL score": "kl_div_score",
               "explained variance (whole set)": "explained_variance_whole_set"}


def headline(info: dict | None, label: str) -> float | None:
    """A headline metric (ALL_HEADLINES' label) of a final_info, or None where the run has none."""
    tree = info
    for key in dict(ALL_HEADLINES)[label]:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree if isinstance(tree, (int, float)) else None


def runs_table(root: str | Path = ROOT / "runs"):
    """A pandas DataFrame of every run folder under root, oldest first: who it is, its status, the
    headline metrics (ALL_HEADLINES' labels), its verdict on the CE-loss score (MCC on a synthetic
    preset) against each baseline
    (`vs <baseline>`), and its settings (hyperparameters as `hp.<name>`)."""
    import pandas as pd

    rows = []
    for folder, who, info in run_index(Path(root)):
        config = info.get("provenance", {}).get("config") or read_json(folder / "config.json")
        row = dict(folder=str(folder), study=who["study"], plugin=who["plugin"], run=who["number"],
                   status=info.get("status"), **{label: headline(info, label) for label, _ in ALL_HEADLINES})
        for name, found in info.get("verdict", {}).items():
            judged_on = found.get("metrics", {}).get("mcc") or found.get("metrics", {}).get("ce_loss_score", {})
            row[f"vs {name}"] = judged_on.get("word", found.get("not_judged"))
        row.update({k: config.get(k) for k in ("preset", "model", "layer", "dict_size", "tokens", "lr",
                                               "sparsity_penalty", "seed")})
        row.update({f"hp.{k}": v for k, v in config.get("hyperparams", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


CONTEXT_ROWS = "eval_contexts.safetensors"  # each evaluation context's rows of the headline scores
# sae_bench's default random_seed. Its evals' probes, word samples and dataset draws are the
# measuring instrument, the same for every SAE whatever seed trained it: an instrument drawn per
# training seed would add its own spread to the seed-to-seed spread the verdicts read.
EVAL_SEED = 42


def same_instrument(result: dict | None) -> bool:
    """Whether a stored sae_bench result was drawn with EVAL_SEED (one drawn with another seed read
    its SAE with another probe, words or datasets)."""
    return (result or {}).get("eval_config", {}).get("random_seed") == EVAL_SEED


def save_context_rows(run_dir: Path, rows: dict) -> None:
    """What each headline score is computed from, per evaluation context (evals.context_rows), in
    float64: a verdict resamples the run's and its baseline's contexts together (frontier.paired_se)."""
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in rows.items()},
              run_dir / f".{CONTEXT_ROWS}.tmp")
    os.replace(run_dir / f".{CONTEXT_ROWS}.tmp", run_dir / CONTEXT_ROWS)


def load_context_rows(run_dir: Path) -> dict | None:
    """save_context_rows' rows as numpy arrays, or None for a run folder without them."""
    from safetensors.numpy import load_file

    path = Path(run_dir) / CONTEXT_ROWS
    return load_file(path) if path.exists() else None


def save_trained(info: dict, sae, scale: float, run_dir: Path) -> None:
    """The plugin's results and artifacts, and the SAE (the checkpoint stays until the run is finished)."""
    info.update(sae.final_info())
    artifacts = {k: v.detach().cpu().contiguous() for k, v in sae.artifacts().items()}
    if artifacts:
        from safetensors.torch import save_file
        save_file(artifacts, run_dir / "artifacts.safetensors")
    info["sae_lens_export"] = save_sae(sae, scale, run_dir)


def save_sae(sae, scale: float, run_dir: Path) -> dict[str, Any]:
    """The SAE for sae_lens (`SAE.load_from_disk(run_dir)`), in the model's own activation scale,
    where the plugin has a SAELens twin, and plugin_state.safetensors, the full plugin state for
    exact reloading (experiment.load_run).
    Returns what the export is (final_info.json's `sae_lens_export`)."""
    from safetensors.torch import save_file

    staging = run_dir / ".weights.tmp"  # written whole, then renamed into place
    staging.mkdir(exist_ok=True)
    export, exact = sae.sae_lens_export(scale) if hasattr(sae, "sae_lens_export") else (None, False)
    if export is not None:  # the baselines' plugins (and every plugin built on one) have a SAELens twin
        export.cfg.metadata.harness_export = "exact" if exact else (
            f"linear part only: {type(sae).__module__}'s own pieces are not in this {export.cfg.architecture()} "
            "SAE; experiment.load_run(run_dir) reloads the SAE that was evaluated")
        export.save_model(staging)
    state = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    save_file({**state, "activation_scale": torch.tensor(scale)}, staging / "plugin_state.safetensors")
    for path in staging.iterdir():
        os.replace(path, run_dir / path.name)
    staging.rmdir()
    return dict(architecture=export.cfg.architecture() if export is not None else None, exact=exact)


class NoWeights(HarnessError):
    """A run folder without its trained SAE: unfinished, or kept without its weights (scripts/keep_runs.py)."""


def check_weights(run_dir: Path) -> None:
    if not (run_dir / "plugin_state.safetensors").exists():
        raise NoWeights(f"{run_dir} holds no trained SAE (no plugin_state.safetensors): finish its run or, where "
                        "scripts/keep_runs.py kept it without its weights, move the folder away and train it again")


def code_without_prose(source: str) -> str:
    """A Python file's syntax tree with every docstring removed, dumped: what the code does."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def parent_module(module: types.ModuleType) -> types.ModuleType | None:
    """The plugin module a plugin module imports as `parent` (the run it builds on), if any."""
    parent = getattr(module, "parent", None)
    return parent if isinstance(parent, types.ModuleType) and parent.__name__.startswith("plugins.") else None


def plugin_source_sha256(module: types.ModuleType) -> str:
    """sha256 over a plugin module's code and every parent's (parent_module), each without prose
    (code_without_prose) and read once, when this process first asked (find_plugin asks right after
    importing it): the code its runs run, whatever the files hold later."""
    digest = hashlib.sha256()
    while module is not None:
        if not hasattr(module, "_harness_code"):
            module._harness_code = code_without_prose(Path(module.__file__).read_text())
        digest.update(module._harness_code.encode())
        module = parent_module(module)
    return digest.hexdigest()


def provenance(config: dict, plugin: str, source_sha256: str, device: torch.device, wall_time: float) -> dict:
    """What a run ran on and with: its config, plugin and source hash, commit, packages, device."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    versions = {}
    for pkg in ("torch", "transformer-lens", "transformers", "sae-lens", "sae-bench", "numpy", "datasets"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return dict(config=config, seed=config["seed"], plugin=plugin,
                plugin_source_sha256=source_sha256, git_commit=git("rev-parse", "HEAD") or None,
                git_dirty=bool(git("status", "--porcelain")), package_versions=versions,
                python=sys.version.split()[0], device=str(device),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                cpu=cpu_model(), torch_threads=torch.get_num_threads(), wall_time_s=round(wall_time, 2))


def save_checkpoint(run_dir: Path, step: int, sae, trainer, fired_at: torch.Tensor,
                    terms: dict[str, float], source_sha256: str, wall_time_s: float | None = None) -> None:
    """Everything needed to continue bit for bit: weights and buffers, optimizer and scheduler,
    the trainer's plugin state, dead-latent tracking, RNG states, the data position, the
    step's loss terms (the final ones, should the checkpoint fall on the last step), the hash
    of the plugin code that trained it (a resume on other code is refused: check_resumable) and
    the run's wall time so far (a resumed run's provenance counts it)."""
    state = dict(step=step, sae=sae.state_dict(), optimizer=trainer.optimizer.state_dict(),
                 plugin_source_sha256=source_sha256, wall_time_s=wall_time_s,
                 scheduler=trainer.scheduler.state_dict(), fired_at=fired_at, terms=terms,
                 trainer={k: v for k, v in vars(trainer).items() if k not in trainer.OWN},
                 rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)


def load_checkpoint(run_dir: Path, sae, trainer) -> tuple[int, torch.Tensor, dict[str, float]]:
    """Restore what save_checkpoint saved; (the next step, dead-latent tracking, the last loss terms)."""
    state = torch.load(run_dir / CHECKPOINT, weights_only=False, map_location=sae.W_dec.device)
    sae.load_state_dict(state["sae"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    for key, value in state["trainer"].items():
        setattr(trainer, key, value)
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"] + 1, state["fired_at"], state.get("terms", {})  # older checkpoints lack terms


def checkpoint_source(run_dir: Path) -> str | None:
    """The plugin source hash a run's checkpoint was trained with (None: saved before it was kept)."""
    return _checkpoint_header(run_dir).get("plugin_source_sha256")


def _checkpoint_header(run_dir: Path) -> dict:
    """The checkpoint's small entries, read without loading its tensors."""
    state = torch.load(run_dir / CHECKPOINT, weights_only=False, map_location="cpu", mmap=True)
    return {k: state.get(k) for k in ("plugin_source_sha256", "wall_time_s")}


def check_resumable(run_dir: Path, source_sha256: str) -> float:
    """Refuse to continue a checkpoint of other plugin code: the run would train its steps on two
    codes. Returns the wall time the run had spent at the checkpoint (0 where not kept)."""
    header = _checkpoint_header(run_dir)
    saved = header["plugin_source_sha256"]
    if saved is None:
        console.print(f"[yellow]{run_dir / CHECKPOINT} predates keeping its plugin's code hash: "
                      f"nothing checks that this resume runs the code it started with")
    elif saved != source_sha256:
        raise HarnessError(f"{run_dir / CHECKPOINT} was trained by other code of its plugin (source {saved[:12]}, "
                           f"now {source_sha256[:12]}); restore that code to continue it, or start a new run")
    return header["wall_time_s"] or 0.0


def check_runs_root(root: Path) -> None:
    """Refuse, before any work, a --runs that is a file or lies where no folder can be made."""
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise HarnessError(f"--runs {root}: {existing} is not a writable folder; pick another --runs")


@contextlib.contextmanager
def claimed(run_dir: Path, wait: bool = True):
    """run_dir held by this process while it trains there: an exclusive lock on `.<name>.lock`
    beside it, removed at the end (a killed process leaves the file, its lock dropped by the
    kernel). Where another process holds it this waits for that one or, with wait=False, refuses."""
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 holds it for all: only it writes there
        yield
        return
    lock = run_dir.with_name(f".{run_dir.name}.lock")
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a")
        except OSError as exc:
            if not run_dir.exists():
                check_writable(run_dir)  # names the folder that cannot be made and the flag to change
            raise HarnessError(f"cannot create {lock} ({exc.strerror}): its folder must be writable") from None
        try:
            if holds_lock(handle, lock, run_dir, wait):
                break
        except BaseException:
            handle.close()
            raise
        handle.close()  # its holder removed that file as it let go: lock the one there now
    try:
        yield
    finally:
        try:
            lock.unlink(missing_ok=True)
        finally:
            handle.close()


class Held(HarnessError):
    """A run folder another process holds, refused without waiting (`claimed(wait=False)`)."""


def holds_lock(handle, lock: Path, run_dir: Path, wait: bool) -> bool:
    """Lock the open lock file (waiting for its holder, or refusing, as `claimed` says); whether it
    is still the file at that path, which a holder removes as it lets go."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            raise Held(f"another process is training or evaluating {run_dir}; run this again once it has "
                       f"finished (its run is then reused)") from None
        console.print(f"waiting for another process, which is training or evaluating {run_dir}")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted while waiting for {run_dir}, before writing there") from None
    except OSError as exc:  # a file system without locks
        raise HarnessError(f"cannot lock {lock} ({exc.strerror}); put --runs on a local disk") from None
    try:
        return os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def left_in(run_dir: Path, source_sha256: str, is_its_config) -> tuple[str, dict]:
    """What a run folder this process has claimed holds for a run of this plugin code and of a config
    `is_its_config(saved config)` accepts, as (how the run goes on, its final_info): "reused" (completed),
    "resumed" (a checkpoint of this code, left in training or evaluation), "failed" (an attempt that
    ended so: its final_info says why) or "trained" (nothing there, or an attempt that died before
    its first checkpoint, removed here: every harness process writing a run folder claims it)."""
    saved = read_json(run_dir / "config.json")
    if saved and not is_its_config(saved):
        raise HarnessError(f"run folder {run_dir} holds a run of another config; move it away to train this one")
    info = read_json(run_dir / "final_info.json")
    if info.get("status") == "completed":
        if info["provenance"]["plugin_source_sha256"] != source_sha256:
            raise HarnessError(f"{run_dir} holds a completed run of other code of its plugin; move it away "
                               f"to train this code's")
        return "reused", info
    if (run_dir / CHECKPOINT).exists():
        try:
            check_resumable(run_dir, source_sha256)
        except HarnessError:
            raise
        except Exception as exc:  # unreadable, or its pickled plugin state names a module gone since
            raise HarnessError(f"{run_dir / CHECKPOINT} cannot be read ({type(exc).__name__}: {exc}); move the "
                               f"folder away to train the run again") from None
        return "resumed", info
    if info:
        fix = (f"`python experiment.py eval {run_dir}` evaluates its saved SAE" if info.get("failed_at") == "evaluation"
               else "move the folder away to train it again")
        return "failed", {**info, "error": f"{info.get('error', 'it failed')} (an earlier attempt; {fix})"}
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return "trained", info


def check_writable(run_dir: Path) -> None:
    """Refuse, before any work, a run folder that exists or cannot be created."""
    if run_dir.exists():
        raise HarnessError(f"run folder {run_dir} already exists; pick another --out")
    parent = run_dir.parent
    while not parent.exists():
        parent = parent.parent
    try:  # permissions alone do not tell (root may write anywhere, except where nothing can be made)
        tempfile.TemporaryDirectory(dir=parent, prefix=".write_check_").cleanup()
    except OSError as exc:
        raise HarnessError(f"cannot create run folder {run_dir}: {parent} is not a writable folder "
                           f"({exc.strerror}); pick another --out") from None


# ----------------------------------------------------------------------------------------------
# The training log (train_log.jsonl), written as the loop runs.

# A latent is dead if it has not fired in the last tenth of the run's tokens (the notebooks'
# 1M-token window on their 10M-token runs), at most 1M tokens; evaluation reports the latents
# that never fire on the held-out text beside it.
DEAD_WINDOW_SHARE, DEAD_WINDOW_TOKENS = 0.1, 1_000_000


def dead_window_steps(cfg) -> int:
    """Steps a latent may go without firing before it counts as dead (the log, TopK's AuxK)."""
    return max(1, min(DEAD_WINDOW_TOKENS, int(cfg.tokens * DEAD_WINDOW_SHARE)) // cfg.batch_size)


# Steps by which the host lags the device when it reads a step's losses (the non-finite check,
# the log): on CUDA one, so the host never waits for the step it has just queued; on CPU, where
# nothing is queued, none.
REPORT_LAG = {"cuda": 1}


# A run has converged when, over the last fifth of its training, neither its reconstruction loss nor
# its L0 moved by more than this share of its level there; beyond it a verdict describes how long
# the run trained, not its idea. Not the total loss: a plugin's scheduled term weights move it
# while the SAE itself has stopped changing.
CONVERGED_WITHIN = 0.10
LAST_SHARE = 0.2


def convergence(log: list[dict]) -> dict[str, Any]:
    """How much the reconstruction loss (l2_loss) and L0 moved over the last fifth of training (the
    train log's rows from the last one at or before 80% of the steps): the Theil–Sen slope (the
    median of the rows' pairwise slopes: a few outlier batches, as Gemma's huge-norm tokens give,
    cannot swing it) times the window's length, relative to the window's median level. {"l2_loss",
    "l0", "rows", "steps", "threshold", "converged"}; None for a quantity with under 3 rows or a
    level of 0, and then converged is None (unknown)."""
    end = log[-1]["step"] if log else 0
    start = max((i for i, row in enumerate(log) if row["step"] <= (1 - LAST_SHARE) * (end + 1)), default=0)
    window = log[start:]
    moved = {name: _relative_move(window, name) for name in ("l2_loss", "l0")}
    known = [abs(m) for m in moved.values() if m is not None]
    return dict(**moved, rows=len(window), steps=[window[0]["step"], end] if window else [],
                threshold=CONVERGED_WITHIN,
                converged=None if len(known) < len(moved) else max(known) <= CONVERGED_WITHIN)


def run_convergence(folder: Path | None, info: dict) -> dict[str, Any] | None:
    """A run's convergence by the current rule, from its train log where its folder has one, else
    as its final_info.json recorded it (None for runs saved before it was)."""
    if folder is not None and (log := Path(folder) / "train_log.jsonl").exists():
        return dict(_logged_convergence(str(log), log.stat().st_mtime_ns))
    return info.get("convergence")


@functools.lru_cache(maxsize=4096)
def _logged_convergence(log: str, modified_ns: int) -> dict[str, Any]:
    """convergence of one train log, read once per version of the file: every verdict of a study
    reads every baseline point's."""
    return convergence(read_json_lines(Path(log)))


def _relative_move(rows: list[dict], name: str) -> float | None:
    points = [(row["step"], row[name]) for row in rows if name in row]
    if len(points) < 3:
        return None
    slopes = [(b - a) / (t - s) for (s, a), (t, b) in itertools.combinations(points, 2) if t > s]
    level = abs(float(np.median([v for _, v in points])))
    change = float(np.median(slopes)) * (points[-1][0] - points[0][0])
    return change / level if level else None  # a level of 0 (a dead SAE's L0) has no relative change


class NonFiniteLoss(Exception):
    """A loss term became NaN or infinite: the run stops and is marked failed."""


BASE_TERMS = ("l2_loss", "sparsity_loss", "total_loss")  # every SAE's terms: the inert-term guard judges the others


def logged_step(step: int, cfg) -> bool:
    """Whether StepLog writes this step's row (every cfg.log_every steps and the last)."""
    return step % cfg.log_every == 0 or step == cfg.steps - 1


def term_gradients(out, sae, step: int, cfg) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """On a logged step, before the Trainer's backward: each extra loss term's own gradient,
    [(parameter, gradient)] over the parameters it reaches (none for a term without a graph)."""
    if not logged_step(step, cfg):
        return {}
    params = [p for p in sae.parameters() if p.requires_grad]
    found = {}
    for name, term in out.terms.items():
        if name in BASE_TERMS:
            continue
        grads = (torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                 if torch.is_tensor(term) and term.requires_grad else [None] * len(params))
        found[name] = [(p, g) for p, g in zip(params, grads) if g is not None]
    return found


@torch.no_grad()
def record_gradient_shares(found: dict, stats: dict) -> None:
    """After the Trainer's backward: stats[<term>_grad_share] = the largest, over the parameters the
    term reaches, of ‖term's gradient‖ / ‖the gradient the update uses‖ on the entries the term's
    gradient reaches (0 where it reaches none): AuxK, the only pull on its dead latents' rows, is all
    of their update, however small beside the live latents' and whatever it adds to b_dec's. A
    plugin whose backward applies a term otherwise (rescaled, projected) logs its own share, kept."""
    def share(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        reached = grad != 0
        update = (param.grad.double().pow(2) * reached).sum().sqrt()
        return (grad.double().pow(2).sum().sqrt() / update.clamp_min(1e-30)).float()

    for name, pairs in found.items():
        shares = [share(p, g) for p, g in pairs if p.grad is not None]
        stats.setdefault(f"{name}_grad_share", torch.stack(shares).max() if shares else torch.zeros(()))


class StepLog:
    """Reads each step's loss terms back (on CUDA one step late, so that the host never waits for
    the step it has just queued), stops on a non-finite one, and writes the logged steps to
    train_log.jsonl. Only the leader (rank 0) writes."""

    sinks: list = []  # callables also given each written row: `run --wandb` adds its wandb run's

    def __init__(self, path: Path, cfg, progress, start: int, final: dict, leader: bool):
        self.cfg, self.progress, self.start, self.final, self.leader = cfg, progress, start, final, leader
        if start and leader:  # resumed: the log keeps only the steps the checkpoint holds
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < start]
            atomic_write(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a") if leader else None
        self.unread: collections.deque = collections.deque()
        self.dead_window = dead_window_steps(cfg)
        self.task = progress.add_task("train SAE", total=cfg.steps, completed=start, status="")
        self.started = time.perf_counter()

    def queue(self, step: int, total: torch.Tensor, out, fired_at: torch.Tensor, lr: float) -> None:
        """Keep the step's tensors (not read yet) for read_back."""
        terms = {k: v.detach() for k, v in {**out.terms, "total_loss": total}.items()}
        record = dict(step=step, terms=terms, finite=torch.stack(list(terms.values())).isfinite().all(),
                      lr=lr, logged=None)
        if logged_step(step, self.cfg):
            record["logged"] = dict(
                l0=(out.latents.detach() > 0).float().sum(-1).mean(),
                dead_fraction=(fired_at <= step - min(step + 1, self.dead_window)).float().mean(),
                **{k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.stats.items()})
        self.unread.append(record)

    def read_back(self, until: int) -> None:
        """Check, and log, the queued steps before `until`."""
        while self.unread and self.unread[0]["step"] < until:
            record = self.unread.popleft()
            if not record["finite"]:
                name, value = next((k, v.item()) for k, v in record["terms"].items() if not torch.isfinite(v))
                raise NonFiniteLoss(f"{name} became {value} at step {record['step']}")
            self.final = {k: v.item() for k, v in record["terms"].items()}
            if self.leader and record["logged"]:
                self.write(record["step"], record["lr"], {k: float(v) for k, v in record["logged"].items()})

    def write(self, step: int, lr: float, logged: dict[str, float]) -> None:
        row = dict(step=step, tokens=(step + 1) * self.cfg.batch_size, lr=lr, **self.final, **logged)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for sink in self.sinks:
            sink(row)
        tok_s = (step + 1 - self.start) * self.cfg.batch_size / (time.perf_counter() - self.started)
        self.progress.update(self.task, status=f"{tok_s:,.0f} tok/s  loss {self.final['total_loss']:.4g}  "
                             f"L0 {logged['l0']:.1f}  dead {logged['dead_fraction']:.1%}")

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        try:
            if kind is not None and not issubclass(kind, (NonFiniteLoss, Interrupted)):
                self.read_back(self.cfg.steps)  # a non-finite loss in a step not yet read is the cause to report
        finally:
            if self.file is not None:
                self.file.close()
