"""scripts/keep_runs.py: runs/ kept in git without its weights, and put back on a machine that lost
it, where the study reuses every run, judges against the kept baselines as before, and refuses in
one line what needs the weights."""

import gzip
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


def run_folder(folder: Path, status: str | None, **files: str) -> Path:
    """A run folder: its config, a final_info of `status` (none: still training), weights, other files."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "plugin_state.safetensors").write_bytes(b"weights")
    if status is not None:
        (folder / "final_info.json").write_text(json.dumps({"status": status}))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def kept_names(kept: Path) -> list[str]:
    return sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())


def test_kept_files_are_a_completed_runs_records_without_weights_and_nothing_of_an_unfinished_run(tmp_path):
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    done = run_folder(runs / "s" / "run_1_x" / "a", "completed",
                      **{"train_log.jsonl": "{}", ".final_info.json.1.tmp": "", "eval_tokens.pt": "tokens"})
    (done / "dashboard").mkdir()
    (done / "dashboard" / "index.html").write_text("<html>")
    run_folder(runs / "s" / "run_1_x" / "b", None, **{"checkpoint.pt": "state", "train_log.jsonl": "{}"})
    run_folder(runs / "s" / "run_1_x" / "c", "failed")
    (runs / "notes-embedded-4m.md").write_text("# notes")
    (runs / "sweeps").mkdir()
    (runs / "sweeps" / "manifest.json").write_text("{}")
    (runs / "sweeps" / "manifest.json.lock").write_text("")
    (runs / "sweeps" / "figures").mkdir()
    (runs / "sweeps" / "figures" / "frontier.png").write_bytes(b"png")
    keep("save", runs, kept)
    assert kept_names(kept) == ["folder_times.json", "notes-embedded-4m.md.gz", "s/run_1_x/a/config.json.gz",
                                "s/run_1_x/a/final_info.json.gz", "s/run_1_x/a/train_log.jsonl.gz", "sweeps/manifest.json.gz"]
    assert gzip.decompress((kept / "s/run_1_x/a/train_log.jsonl.gz").read_bytes()) == b"{}"
    packed = {name: (kept / name).read_bytes() for name in kept_names(kept)}
    keep("save", runs, kept)  # the same records again: the same bytes (git sees no change)
    assert {name: (kept / name).read_bytes() for name in kept_names(kept)} == packed
    assert json.loads((kept / "folder_times.json").read_text()) == {"s/run_1_x/a": done.stat().st_mtime}


def test_restore_puts_back_each_kept_run_with_its_folder_time_and_never_overwrites_what_runs_holds(tmp_path):
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    kept_at = run_folder(tmp_path / "old" / "sweeps" / "p" / "k=1", "completed", **{"train_log.jsonl": "whole"})
    run_folder(tmp_path / "old" / "sweeps" / "p" / "k=2", "completed", **{"train_log.jsonl": "whole"})
    (tmp_path / "old" / "notes.md").write_text("kept")
    (tmp_path / "old" / "other.md").write_text("kept")
    keep("save", tmp_path / "old", kept)
    run_folder(runs / "sweeps" / "p" / "k=1", None, **{"train_log.jsonl": "cut short", "checkpoint.pt": "state"})
    newer = run_folder(runs / "sweeps" / "p" / "k=2", "completed", **{"train_log.jsonl": "newer"})
    (newer / "final_info.json").write_text(json.dumps({"status": "completed", "newer": True}))
    (runs / "notes.md").write_text("newer")
    said = keep("restore", runs, kept)
    assert "2 runs and files restored" in said and "2 left as runs/ has them" in said, said
    interrupted = runs / "sweeps" / "p" / "k=1"  # an interrupted attempt gives way to the kept completed run
    assert (interrupted / "train_log.jsonl").read_text() == "whole" and not (interrupted / "checkpoint.pt").exists()
    assert interrupted.stat().st_mtime == kept_at.stat().st_mtime
    assert (newer / "train_log.jsonl").read_text() == "newer"  # a completed run runs/ has stays as it is
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


def test_a_study_says_when_kept_holds_runs_that_runs_lacks(tmp_path, capsys):
    import studies
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    run_folder(tmp_path / "old" / "sweeps" / "p" / "k=1", "completed")
    keep("save", tmp_path / "old", kept)  # as save keeps it
    run_folder(runs / "sweeps" / "p" / "k=2", "completed")
    studies.say_what_kept_holds(runs, kept)
    said = " ".join(capsys.readouterr().err.split())
    assert "holds 1 runs that" in said and "`python scripts/keep_runs.py restore` first reuses them" in said
    run_folder(runs / "sweeps" / "p" / "k=1", "completed")
    studies.say_what_kept_holds(runs, kept)
    assert capsys.readouterr().err == ""
