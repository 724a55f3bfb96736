"""What the harness guarantees when things go wrong: interrupted runs resume to the same weights,
earlier runs and notes.md survive any kill, concurrent runs both get their notebook entry, a
corrupted activation cache is rebuilt, suspicious results are flagged, and every bad input is
refused with exit code 2 and nothing written."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli, tiny_model_with_tokenizer

import common
import evals
import experiment
import frontier
from runs import checkpoint_source, run_index
import sources
import studies

ROOT = Path(experiment.__file__).parent
LONG_TINY = ["--preset", "tiny", "--plugin", "zscore_ortho/run_1_initial", "--tokens", "65536",
             "--checkpoint-every", "20", "--evals", "core"]


def start_cli(args, tmp_path):
    env = {**os.environ, "SAE_HARNESS_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "experiment.py"), "run", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.e2e
def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("earlier entry\n")
    whole = start_cli([*LONG_TINY, "--out", str(tmp_path / "whole"), "--notes", str(notes)], tmp_path)
    assert whole.wait(900) == 0, whole.stdout.read()

    killed_dir = tmp_path / "killed"
    killed = start_cli([*LONG_TINY, "--out", str(killed_dir), "--notes", str(notes)], tmp_path)
    wait_for(killed_dir / "checkpoint.pt", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (killed_dir / "final_info.json").exists()
    assert notes.read_text().startswith("earlier entry\n") and notes.read_text().count("## Run 1") == 1

    resumed = start_cli(["--resume", str(killed_dir), "--notes", str(notes)], tmp_path)
    assert resumed.wait(900) == 0, resumed.stdout.read()
    assert (killed_dir / "sae_weights.safetensors").read_bytes() == (tmp_path / "whole" / "sae_weights.safetensors").read_bytes()
    a = json.loads((killed_dir / "final_info.json").read_text())
    b = json.loads((tmp_path / "whole" / "final_info.json").read_text())
    assert a["metrics"] == b["metrics"] and a["final_loss"] == b["final_loss"]
    log_steps = [json.loads(line)["step"] for line in (killed_dir / "train_log.jsonl").read_text().splitlines()]
    assert log_steps == sorted(set(log_steps))  # no step logged twice after the resume
    assert notes.read_text().count("## Run 1") == 2


def killed_after_training(run_tiny, notes, monkeypatch) -> Path:
    """A tiny ReLU run killed between its training (its last step checkpointed) and its save: its folder."""
    def killed(*args):
        raise RuntimeError("killed after training")
    with monkeypatch.context() as patch:
        patch.setattr(experiment, "save_trained", killed)
        with pytest.raises(RuntimeError, match="killed after training"):
            run_tiny("run_0_baseline", checkpoint_every=8)
    return sorted((notes.parent / "runs").iterdir())[-1]


def test_a_run_killed_after_its_last_checkpointed_step_resumes_to_its_final_loss(run_tiny, notes, monkeypatch):
    """A checkpoint on the very last step leaves nothing to train on resume: the run must still
    finish with that step's losses, not fail for want of them, and its wall time counts the
    training before the kill."""
    done, _ = run_tiny("run_0_baseline", checkpoint_every=8)  # 32 steps: the last is checkpointed
    run_dir = killed_after_training(run_tiny, notes, monkeypatch)
    cfg, plugin = experiment.saved_config(run_dir, "--resume")
    state = torch.load(run_dir / experiment.CHECKPOINT, weights_only=False)
    assert 0 < state["wall_time_s"] < 1000
    torch.save({**state, "wall_time_s": 1000.0}, run_dir / experiment.CHECKPOINT)  # as if training took that long
    resumed = experiment.execute(cfg, plugin, run_dir, notes, resume=True)
    assert resumed["status"] == "completed" and resumed["final_loss_terms"] == done["final_loss_terms"]
    assert 1000 < resumed["provenance"]["wall_time_s"] < 1000 + 600  # the time before the kill counts


def test_a_checkpoint_is_continued_only_by_the_code_that_trained_it(run_tiny, notes, monkeypatch, tmp_path):
    """A resume on edited plugin code would train its last steps on other code than its first: `run
    --resume` refuses it in one line before any work, and a study trains that run afresh instead."""
    run_dir = killed_after_training(run_tiny, notes, monkeypatch)
    cfg, plugin = experiment.saved_config(run_dir, "--resume")
    assert checkpoint_source(run_dir) == plugin.source_hash()
    job = studies.Job(cfg, plugin, tmp_path / "new", "its study's run")
    assert studies.previous_run(job, studies.earlier_runs(run_dir.parent)) == (run_dir, "resumed")

    monkeypatch.setattr(experiment.Plugin, "source_hash", lambda self: "e" * 64)  # the plugin edited since
    monkeypatch.setattr(experiment, "checked_model", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(common.HarnessError, match="trained by other code of its plugin .* start a new run"):
        experiment.execute(cfg, plugin, run_dir, notes, resume=True)
    assert studies.previous_run(job, studies.earlier_runs(run_dir.parent)) == (None, "trained")


def test_a_checkpoint_without_a_code_hash_resumes_with_a_warning_and_an_unreadable_one_trains_again(
        run_tiny, notes, monkeypatch, tmp_path, capsys):
    run_dir = killed_after_training(run_tiny, notes, monkeypatch)
    cfg, plugin = experiment.saved_config(run_dir, "--resume")
    job, checkpoint = studies.Job(cfg, plugin, tmp_path / "new", "its study's run"), run_dir / experiment.CHECKPOINT
    state = torch.load(checkpoint, weights_only=False)
    torch.save({k: v for k, v in state.items() if k != "plugin_source_sha256"}, checkpoint)  # as saved before
    assert studies.previous_run(job, studies.earlier_runs(run_dir.parent)) == (run_dir, "resumed")
    checkpoint.write_bytes(b"not a checkpoint")
    assert studies.previous_run(job, studies.earlier_runs(run_dir.parent)) == (None, "trained")
    assert "cannot be read" in " ".join(capsys.readouterr().err.split())
    torch.save({k: v for k, v in state.items() if k != "plugin_source_sha256"}, checkpoint)
    resumed = experiment.execute(cfg, plugin, run_dir, notes, resume=True)
    assert resumed["status"] == "completed"
    assert "predates keeping its plugin's code hash" in " ".join(capsys.readouterr().err.split())


@pytest.mark.e2e
def test_ctrl_c_checkpoints_and_exits_130_with_one_line(tmp_path):
    out = tmp_path / "run"
    proc = start_cli([*LONG_TINY, "--out", str(out), "--notes", str(tmp_path / "notes.md")], tmp_path)
    wait_for(out / "train_log.jsonl", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    output = " ".join(proc.communicate(timeout=120)[0].split())
    assert proc.returncode == 130, output
    assert "checkpoint saved; continue with: python experiment.py run --resume" in output
    assert (out / "checkpoint.pt").exists() and not (tmp_path / "notes.md").exists()


def _append_many(notes, worker):
    plugin = experiment.find_plugin("run_0_baseline")
    for i in range(30):
        experiment.append_notes(Path(notes), plugin.study_header, f"## Run 0: worker {worker} entry {i}\n" + "x" * 5000 + "\n\n")


@pytest.mark.e2e
def test_two_processes_appending_to_notes_both_get_complete_entries(tmp_path):
    notes = tmp_path / "notes.md"
    workers = [multiprocessing.get_context("fork").Process(target=_append_many, args=(notes, w)) for w in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    text = notes.read_text()
    assert text.count("# Title: Baseline Sparse Autoencoder") == 1
    for w in (1, 2):
        for i in range(30):
            assert f"## Run 0: worker {w} entry {i}\n" + "x" * 5000 + "\n\n" in text


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_activation_cache_is_detected_and_rebuilt(run_tiny, isolated_cache, damage):
    first, _ = run_tiny("run_0_baseline")
    acts = next(isolated_cache.glob("*/train_acts.npy"))
    data = bytearray(acts.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-100] ^= 0xFF
    acts.write_bytes(bytes(data))
    second, _ = run_tiny("run_0_baseline")
    assert second["activations_from_cache"] is False
    assert second["metrics"] == first["metrics"]


def test_an_unchanged_activation_cache_is_not_read_whole_again(run_tiny, isolated_cache, monkeypatch):
    run_tiny("run_0_baseline")
    hashed = []
    monkeypatch.setattr(sources, "file_sha256", lambda path: hashed.append(path) or common.file_sha256(path))
    second, _ = run_tiny("run_0_baseline")
    assert second["activations_from_cache"] is True and hashed == []
    acts = next(isolated_cache.glob("*/train_acts.npy"))
    os.utime(acts, ns=(acts.stat().st_atime_ns, acts.stat().st_mtime_ns + 10**9))  # touched: read whole again
    third, _ = run_tiny("run_0_baseline")
    assert third["activations_from_cache"] is True and hashed == [acts]
    shutil.copy2(acts, acts.with_name("copy"))  # a copy keeps the size and mtime, not the inode or ctime
    os.replace(acts.with_name("copy"), acts)
    fourth, _ = run_tiny("run_0_baseline")
    assert fourth["activations_from_cache"] is True and hashed == [acts, acts]


def test_suspicious_results_are_flagged(run_tiny, tmp_path, monkeypatch):
    info, run_dir = run_tiny("run_0_baseline")
    assert info["warnings"] == []
    # A child run whose metrics equal its parent's latest run on the same data is flagged.
    runs = tmp_path / "layout"
    parent_dir, child_dir = runs / "s" / "run_1_initial" / "1", runs / "s" / "run_2_stable_init" / "1"
    for d, stem in ((parent_dir, "run_1_initial"), (child_dir, "run_2_stable_init")):
        shutil.copytree(run_dir, d)  # the baseline's run folder, relabelled as the plugin's
        copied = json.loads((d / "final_info.json").read_text())
        copied["run"] = experiment.find_plugin(stem).identity()
        (d / "final_info.json").write_text(json.dumps(copied))
    child = experiment.find_plugin("run_2_stable_init")
    warnings = frontier.suspicious(info, child_dir, child.parent, run_index(runs))
    assert any("identical to the last digit to parent run_1_initial" in w for w in warnings)
    zero = {**info, "metrics": {**info["metrics"], "sparsity": {"l0": 0.0, "l1": 0.0},
                                "reconstruction_quality": {"explained_variance": -0.78}}}
    warnings = frontier.suspicious(zero, run_dir, None, [])
    assert any("L0 is 0" in w for w in warnings) and any("explained_variance is negative" in w for w in warnings)


def test_a_run_short_of_its_models_verdict_budget_is_warned(run_tiny, monkeypatch):
    monkeypatch.setitem(experiment.PRESETS, "tiny-verdict", {**experiment.PRESETS["tiny"], "tokens": 10**6})
    monkeypatch.setattr(frontier, "VERDICT_PRESETS", ("tiny-verdict",))
    info, _ = run_tiny("run_0_baseline")
    assert any("under --preset tiny-verdict's 1,000,000" in w and "a first look" in w for w in info["warnings"])


# ---- the bad-input matrix: exit 2, one clear line, runs/ and notes.md untouched ----------------

def refused(tmp_path, *args):
    notes = tmp_path / "notes.md"
    notes.write_text("earlier entry\n")
    listing = lambda: sorted(p.name for p in tmp_path.iterdir() if p.name != "activations")  # noqa: E731
    before = listing()
    result = cli("run", "--notes", str(notes), *args)
    assert result.exit_code == 2, result.output
    assert notes.read_text() == "earlier entry\n"
    assert listing() == before
    return " ".join(result.output.split())


@pytest.mark.e2e
def test_an_evaluation_crash_keeps_the_trained_sae_and_eval_run_dir_completes_it(tmp_path, monkeypatch):
    """A crash inside an eval (a sae_bench bug, say) after an hour of training must not cost the
    training: the SAE is saved, the run is marked failed at evaluation with the traceback, the
    notebook is untouched, and `eval RUN_DIR` finishes the run with its notebook entry."""
    notes, out = tmp_path / "notes.md", tmp_path / "runs" / "r"
    notes.write_text("# earlier entries\n")
    real_core = evals.evaluate_core

    def crashing_core(*args, **kwargs):
        raise KeyError(23)
    monkeypatch.setattr(evals, "evaluate_core", crashing_core)
    result = cli("run", "--preset", "tiny", "--plugin", "run_0_baseline", "--out", str(out), "--notes", str(notes))
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert "evaluation failed after training (KeyError: 23)" in result.output and f"eval {out}" in result.output
    info = json.loads((out / "final_info.json").read_text())
    assert info["status"] == "failed" and info["failed_at"] == "evaluation" and "KeyError" in info["traceback"]
    assert "metrics" not in info  # no stale or default numbers
    assert info["training_steps"] > 0 and (out / "sae_weights.safetensors").exists()
    assert notes.read_text() == "# earlier entries\n"

    monkeypatch.setattr(evals, "evaluate_core", real_core)
    torch.use_deterministic_algorithms(False)  # a fresh process: eval sets the run's kernels itself
    assert cli("eval", str(out), "--evals", "core", "--notes", str(notes)).exit_code == 0
    assert torch.are_deterministic_algorithms_enabled(), "re-scored on other kernels than the run's"
    info = json.loads((out / "final_info.json").read_text())
    assert info["status"] == "completed" and "error" not in info and info["metrics"]["sparsity"]["l0"] > 0
    assert "## Run 0: Baseline" in notes.read_text() and notes.read_text().startswith("# earlier entries\n")


def test_plugin_with_syntax_error_names_file_and_line(tmp_path, scratch_study):
    (scratch_study / "run_1_broken.py").write_text('"""Broken."""\ndef oops(:\n')
    out = refused(tmp_path, "--preset", "tiny", "--plugin", "run_1_broken", "--out", str(tmp_path / "r"))
    assert "run_1_broken.py has a syntax error" in out and ":2:" in out


def test_plugin_with_import_error_names_file_and_line(tmp_path, scratch_study):
    (scratch_study / "run_1_broken.py").write_text('"""Broken."""\nimport not_a_module_anywhere\n')
    out = refused(tmp_path, "--preset", "tiny", "--plugin", "run_1_broken", "--out", str(tmp_path / "r"))
    assert "failed to import" in out and "run_1_broken.py:2" in out and "not_a_module_anywhere" in out


@pytest.mark.e2e
def test_plugin_breaking_the_sae_contract_is_refused_before_training(tmp_path, scratch_study):
    (scratch_study / "run_1_shape.py").write_text(
        '"""Wrong shape."""\nfrom experiment import SAE as Base, Hyperparams\n\n\n'
        'class SAE(Base):\n    def decode(self, f):\n        return f\n')
    out = refused(tmp_path, "--preset", "tiny", "--plugin", "run_1_shape", "--out", str(tmp_path / "r"))
    assert "decode returned shape (8, 256), expected (8, 64)" in out


def test_ambiguous_plugin_name_lists_candidates(tmp_path, scratch_study):
    (scratch_study / "run_0_baseline.py").write_text('"""Dup."""\nfrom experiment import SAE, Hyperparams\n')
    out = refused(tmp_path, "--preset", "tiny", "--plugin", "run_0_baseline", "--out", str(tmp_path / "r"))
    assert "ambiguous" in out and "baseline/run_0_baseline" in out and "scratch_test_study/run_0_baseline" in out


def test_unwritable_out_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    out = refused(tmp_path, "--preset", "tiny", "--plugin", "run_0_baseline", "--out", str(tmp_path / "a_file" / "r"))
    assert "is not a writable folder" in out


def test_out_where_nothing_can_be_created_is_refused_before_any_work(tmp_path, monkeypatch):
    """/proc passes a permission check (as root) but holds no new folder: refused in one line
    before the model is even loaded, not with a traceback after training."""
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("work started"))
    out = refused(tmp_path, "--preset", "tiny", "--plugin", "run_0_baseline", "--out", "/proc/forbidden/run")
    assert "cannot create run folder /proc/forbidden/run: /proc is not a writable folder" in out


def test_existing_out_folder_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    out = refused(tmp_path, "--preset", "tiny", "--plugin", "run_0_baseline", "--out", str(tmp_path / "r"))
    assert "already exists" in out


def test_resume_of_a_folder_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "not_a_run").mkdir()
    out = refused(tmp_path, "--resume", str(tmp_path / "not_a_run"))
    assert "is not a run folder" in out


@pytest.mark.parametrize("content, message", [("", "dataset too short"), ("a few words\n", "dataset too short")])
def test_empty_or_too_short_local_dataset_is_refused(tmp_path, content, message, monkeypatch):
    data = tmp_path / "data.txt"
    data.write_text(content)
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: tiny_model_with_tokenizer())
    out = refused(tmp_path, "--preset", "tiny", "--plugin", "run_0_baseline", "--dataset", str(data),
                  "--out", str(tmp_path / "r"))
    assert message in out


@pytest.mark.e2e
def test_a_loss_term_too_small_to_move_the_model_is_flagged(tmp_path, scratch_study, monkeypatch):
    (scratch_study / "run_1_whisper.py").write_text(
        '"""Whisper: an extra term a millionth of the loss."""\nfrom plugins.baseline import run_0_baseline as parent\n\n\n'
        'class SAE(parent.SAE):\n    def aux_losses(self, fwd):\n'
        '        return {"whisper_loss": 1e-6 * fwd.f.mean(), "spoken_loss": 0.1 * fwd.f.abs().sum(-1).mean()}\n')
    run_dir = tmp_path / "run"
    result = cli("run", "--preset", "tiny", "--plugin", "run_1_whisper", "--tokens", "2048", "--out", str(run_dir),
                 "--notes", str(tmp_path / "notes.md"))
    assert result.exit_code == 0, result.output
    warnings = json.loads((run_dir / "final_info.json").read_text())["warnings"]
    assert [w.split(" is a median")[0] for w in warnings if "cannot change the model" in w] == ["whisper_loss"]
    assert "Warning: whisper_loss is a median" in (tmp_path / "notes.md").read_text()


@pytest.mark.e2e
def test_a_run_whose_decoder_barely_moved_from_its_parents_is_flagged(tmp_path, scratch_study):
    """A change that reaches the loss but not the model: the decoder ends within float noise (relative)
    of the parent's, trained on the same activations and seed."""
    (scratch_study / "run_1_nudge.py").write_text(
        '"""Nudge: an extra term too weak to matter."""\nfrom plugins.baseline import run_0_baseline as parent\n\n\n'
        'class SAE(parent.SAE):\n    def aux_losses(self, fwd):\n        return {"nudge_loss": 1e-9 * fwd.f.sum()}\n')
    runs, notes = tmp_path / "runs", tmp_path / "notes.md"
    for plugin in ("run_0_baseline", "run_1_nudge"):
        out = runs / "s" / plugin / "1"
        result = cli("run", "--preset", "tiny", "--plugin", plugin, "--tokens", "2048", "--out", str(out),
                     "--notes", str(notes))
        assert result.exit_code == 0, result.output
    warnings = json.loads((runs / "s" / "run_1_nudge" / "1" / "final_info.json").read_text())["warnings"]
    assert any("from parent run_0_baseline's on the same activations and seed" in w for w in warnings)
    baseline = json.loads((runs / "s" / "run_0_baseline" / "1" / "final_info.json").read_text())["warnings"]
    assert not any("barely reached" in w for w in baseline)
