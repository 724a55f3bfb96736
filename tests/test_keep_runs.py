"""scripts/keep_runs.py: runs/ kept in git without its weights, and put back on a machine that lost
it, where the study reuses every run, judges against the kept baselines as before, and refuses in
one line what needs the weights."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, cli

SCRIPT = ROOT / "scripts" / "keep_runs.py"
TINY = ["--preset", "tiny", "--tokens", "2048"]


def keep(command: str, runs: Path, kept: Path) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), command, "--runs", str(runs), "--kept", str(kept)],
                          capture_output=True, text=True, check=True)
    return done.stdout


def test_kept_files_are_a_completed_runs_records_without_weights_and_nothing_of_an_unfinished_run(tmp_path):
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    done, unfinished = runs / "s" / "run_1_x" / "a", runs / "s" / "run_1_x" / "b"
    for folder in (done, unfinished):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "plugin_state.safetensors").write_bytes(b"weights")
    (done / "final_info.json").write_text(json.dumps({"status": "completed"}))
    (done / "dashboard").mkdir()
    (done / "dashboard" / "index.html").write_text("<html>")
    (unfinished / "checkpoint.pt").write_bytes(b"state")
    (runs / "notes-embedded-4m.md").write_text("# notes")
    (runs / "sweeps").mkdir()
    (runs / "sweeps" / "manifest.json").write_text("{}")
    (runs / "sweeps" / "manifest.json.lock").write_text("")
    keep("save", runs, kept)
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        "notes-embedded-4m.md", "s/run_1_x/a/config.json", "s/run_1_x/a/final_info.json", "sweeps/manifest.json"]


def test_restore_never_overwrites_what_runs_holds(tmp_path):
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.md").write_text("kept")
    (kept / "other.md").write_text("kept")
    runs.mkdir()
    (runs / "notes.md").write_text("newer")
    assert "1 files restored" in keep("restore", runs, kept) and "1 left as runs/ has them" in keep("restore", runs, kept)
    assert (runs / "notes.md").read_text() == "newer" and (runs / "other.md").read_text() == "kept"


@pytest.mark.e2e
def test_a_study_restored_from_kept_records_reuses_every_run_with_the_same_verdicts_and_no_weights(tmp_path):
    runs, kept, notes = tmp_path / "runs", tmp_path / "kept", tmp_path / "notes.md"
    args = ["study", "topk_ortho", *TINY, "--cover-cap", "1", "--runs", str(runs), "--notes", str(notes),
            "--figures", str(tmp_path / "figures")]
    assert cli(*args).exit_code == 0
    verdicts = {p.relative_to(runs): json.loads(p.read_text())["verdict"] for p in runs.rglob("final_info.json")}
    keep("save", runs, kept)
    shutil.rmtree(runs)  # the machine reset
    keep("restore", runs, kept)
    notes_before = notes.read_text()
    again = cli(*args)
    assert again.exit_code == 0 and again.output.count(": reused") == 3, again.output
    assert notes.read_text() == notes_before  # the same verdicts: the summary is not noted twice
    assert {p.relative_to(runs): json.loads(p.read_text())["verdict"] for p in runs.rglob("final_info.json")} == verdicts
    assert not list(runs.rglob("plugin_state.safetensors")) and not list(runs.rglob("sae_weights.safetensors"))
    (run_dir,) = runs.glob("topk_ortho/run_1_topk_pairs/*")
    for refused in (cli("eval", str(run_dir), "--evals", "core", "--notes", str(notes)), cli("dashboard", str(run_dir))):
        assert refused.exit_code == 2 and "holds no trained SAE" in refused.output, refused.output
