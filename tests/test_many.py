"""study and sweep: many runs in one command, each reused where a completed run of the same
config and plugin source exists and resumed where an interrupted one does, so the same command
again trains nothing, and after a kill finishes the rest."""

import dataclasses
import json
import os
import signal
import sys
import threading

import pytest
import typer
from helpers import claimed_by_another_process, cli, ctrl_c_raises

import experiment
import studies
import evals
import plot
import runs as run_folders
from common import HarnessError, one_line_errors

TINY = ["--preset", "tiny", "--tokens", "2048"]


@pytest.mark.e2e
def test_sweep_trains_the_grid_times_seeds_once_and_then_reuses_it(tmp_path):
    runs, notes = tmp_path / "runs", tmp_path / "notes.md"
    args = ["sweep", "--plugin", "run_0_baseline", *TINY, "--grid", "sparsity_penalty=0.01,0.16", "--seeds", "2",
            "--runs", str(runs), "--notes", str(notes)]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    (manifest_path,) = runs.glob("sweeps/*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["asked"]["grid"] == ["sparsity_penalty=0.01,0.16"] and manifest["asked"]["seeds"] == 2
    assert sorted(r["run"] for r in manifest["finished"]) == [
        "sparsity_penalty=0.01,seed=42", "sparsity_penalty=0.01,seed=43",
        "sparsity_penalty=0.16,seed=42", "sparsity_penalty=0.16,seed=43"]
    assert {r["how"] for r in manifest["finished"]} == {"trained"}
    configs = [json.loads((manifest_path.parent / r["run"] / "config.json").read_text()) for r in manifest["finished"]]
    assert sorted((c["sparsity_penalty"], c["seed"]) for c in configs) == [(0.01, 42), (0.01, 43), (0.16, 42), (0.16, 43)]
    figures = manifest_path.parent / "figures"
    assert {p.name for p in figures.glob("*.png")} == {f"frontier_{m}.png" for m in plot.FRONTIER}
    assert "at L0" in (figures / "README.md").read_text()  # each caption reads the data
    summary = notes.read_text().split("## Sweep summary: run_0_baseline on tiny, sparsity_penalty=0.01,0.16 × 2 seeds")
    assert len(summary) == 2 and "| sparsity_penalty=0.16 | 2 | " in summary[1]  # the seeds pooled, once
    notes_before = notes.read_text()
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert {r["how"] for r in json.loads(manifest_path.read_text())["finished"]} == {"reused"}
    assert notes.read_text() == notes_before  # nothing trained, nothing noted

    rebuilt = tmp_path / "rebuilt.md"  # the notebook rebuilt from the run folders: one entry per setting
    assert cli("notes", "--out", str(rebuilt), "--runs", str(runs)).exit_code == 0
    settings = [line.split(" · ")[2] for line in rebuilt.read_text().splitlines() if line.startswith("Study: ")]
    assert sorted(settings) == [f"Setting: tokens=2048, sparsity_penalty={p}{seed}"  # TINY's --tokens too
                                for p in (0.01, 0.16) for seed in ("", ", seed 43")]
    assert "{'" not in rebuilt.read_text()  # no dict dumps
    refused = cli("notes", "--out", str(rebuilt), "--runs", str(runs))
    assert refused.exit_code == 2 and "pass --replace" in refused.output


@pytest.mark.e2e
def test_a_run_is_reused_under_another_preset_name_that_gives_it_the_same_values(tmp_path, monkeypatch):
    monkeypatch.setitem(experiment.PRESETS, "tiny-2048", {**experiment.PRESETS["tiny"], "tokens": 2048})
    runs, notes = tmp_path / "runs", tmp_path / "notes.md"
    args = ["sweep", "--plugin", "run_0_baseline", "--grid", "sparsity_penalty=0.01", "--runs", str(runs),
            "--notes", str(notes)]
    assert cli(*args, *TINY).exit_code == 0
    again = cli(*args, "--preset", "tiny-2048")
    assert again.exit_code == 0, again.output
    (manifest,) = runs.glob("sweeps/*/manifest.json")  # the same runs: the same sweep folder, its one run reused
    kept = json.loads(manifest.read_text())
    assert kept["asked"]["preset"] == "tiny-2048" and [r["how"] for r in kept["finished"]] == ["reused"]


def test_a_sweep_s_folder_is_that_of_its_runs_code_and_configs_however_they_were_asked_for(tmp_path, monkeypatch):
    """A sweep asked again after its plugin changed must not land in the folder of the old code's runs
    (whose completed or checkpointed runs it can neither reuse nor continue); the same runs asked
    with the preset's value spelled out share one."""
    monkeypatch.setattr(studies, "run_jobs", lambda *a, **k: [])
    plugin, folders = experiment.find_plugin("run_0_baseline"), []
    for source, overrides in (("a", {}), ("b", {}), ("a", {"evals": ("core",)}), ("a", {"tokens": 4096})):
        monkeypatch.setattr(experiment.Plugin, "source_hash", lambda self, source=source: source * 64)
        folders.append(studies.sweep_runs(plugin, ["sparsity_penalty=0.01"], 1, "tiny", dict(seed=42, **overrides),
                                          tmp_path / "runs", tmp_path / "notes.md")[1])
    assert folders[0] == folders[2] and len({folders[0], folders[1], folders[3]}) == 3
    manifest = json.loads((folders[1] / "manifest.json").read_text())
    assert manifest["asked"]["plugin_source_sha256"] == "b" * 64


def test_a_sweep_s_manifest_keeps_what_another_command_recorded_of_runs_this_one_has_not_reached(tmp_path):
    def row(label, how):
        return dict(label=label, how=how, info={"status": "completed"}, folder=str(tmp_path / label))
    asked, spread = {"grid": ["k=1,2"]}, {"L0": {"sd": 0.5, "dof": 2}}
    studies.write_manifest(tmp_path, asked, [row("k=1,seed=42", "trained"), row("k=2,seed=42", "trained")], spread)
    studies.write_manifest(tmp_path, asked, [])  # the same sweep asked again (or by a second process), just begun
    studies.write_manifest(tmp_path, asked, [row("k=2,seed=42", "reused")])
    kept = json.loads((tmp_path / "manifest.json").read_text())
    assert {r["run"]: r["how"] for r in kept["finished"]} == {"k=1,seed=42": "trained", "k=2,seed=42": "reused"}
    assert kept["seed_spread"] == spread
    two_plugins = [row("k=1,seed=42", "trained"), row("k=1,seed=42", "trained")]  # an analysis's sweep: one label,
    two_plugins[1]["folder"] = str(tmp_path / "run_2" / "k=1,seed=42")  # a folder per plugin
    studies.write_manifest(tmp_path, asked, two_plugins)
    assert len(json.loads((tmp_path / "manifest.json").read_text())["finished"]) == 3
    inside = dict(row("k=3,seed=42", "trained"), folder=str(experiment.ROOT / "runs" / "sweeps" / "p" / "k=3,seed=42"))
    studies.write_manifest(tmp_path, asked, [inside])  # a run in the repository's runs/: named relative to it
    assert json.loads((tmp_path / "manifest.json").read_text())["finished"][0]["folder"] == "runs/sweeps/p/k=3,seed=42"


def test_a_manifest_write_waits_for_another_command_writing_it_and_keeps_both_rows(tmp_path):
    def row(label):
        return dict(label=label, how="trained", info={"status": "completed"}, folder=str(tmp_path / label))
    asked = {"grid": ["k=1,2"]}
    with run_folders.locked(tmp_path / "manifest.json"):  # another command between reading it and writing it
        writer = threading.Thread(target=studies.write_manifest, args=(tmp_path, asked, [row("k=2,seed=42")]))
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive(), "the write did not wait for the manifest's other writer"
        (tmp_path / "manifest.json").write_text(json.dumps(dict(asked=asked, finished=[
            dict(run="k=1,seed=42", how="trained", status="completed", folder=str(tmp_path / "k=1,seed=42"))])))
    writer.join()
    kept = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(r["run"] for r in kept["finished"]) == ["k=1,seed=42", "k=2,seed=42"]


@pytest.mark.parametrize("grid, message", [
    ("nope=1,2", "--grid nope"),
    ("sparsity_penalty", "must look like key=value1,value2"),
    ("k=4", "--grid k"),
    ("seed=42,43", "seeds come from --seed and --seeds"),
    ("sparsity_penalty=0.01,0.01", "names a value twice"),
])
def test_a_bad_grid_is_refused_before_any_work(tmp_path, grid, message, monkeypatch):
    monkeypatch.setattr(studies, "execute", lambda *a, **k: pytest.fail("work started"))
    result = cli("sweep", "--plugin", "run_0_baseline", *TINY, "--grid", grid, "--runs", str(tmp_path / "r"))
    assert result.exit_code == 2 and result.output.count("error:") == 1 and message in result.output


@pytest.mark.e2e
def test_a_killed_sweep_run_again_reuses_the_finished_resumes_the_interrupted_and_trains_the_rest(tmp_path, monkeypatch):
    plugin, runs = experiment.find_plugin("run_0_baseline"), tmp_path / "runs"
    overrides = dict(tokens=4096, seed=42, device="cpu", evals=("core",))
    jobs = studies.sweep_jobs(plugin, "tiny", ["sparsity_penalty=0.01,0.04,0.16"], 1, dict(overrides), runs / "s")
    for job in jobs:
        job.cfg.checkpoint_every = 5
    real_save = experiment.save_checkpoint

    def killed_in_the_second_run(run_dir, step, *args):
        real_save(run_dir, step, *args)
        if run_dir == jobs[1].run_dir and step == 9:
            raise experiment.Interrupted("killed")
    monkeypatch.setattr(experiment, "save_checkpoint", killed_in_the_second_run)
    with pytest.raises(experiment.Interrupted):
        studies.run_jobs(jobs, tmp_path / "notes.md", runs)
    monkeypatch.setattr(experiment, "save_checkpoint", real_save)
    rows = studies.run_jobs(jobs, tmp_path / "notes.md", runs)
    assert [row["how"] for row in rows] == ["reused", "resumed", "trained"]
    assert all(row["info"]["status"] == "completed" and row["info"]["training_steps"] == 16 for row in rows)


@pytest.mark.e2e
def test_a_sweep_killed_in_a_runs_evaluation_evaluates_it_again_without_training_and_notes_it_once(tmp_path,
                                                                                                     monkeypatch):
    plugin, runs, notes = experiment.find_plugin("run_0_baseline"), tmp_path / "runs", tmp_path / "notes.md"
    overrides = dict(tokens=4096, seed=42, device="cpu", evals=("core",))
    jobs = studies.sweep_jobs(plugin, "tiny", ["sparsity_penalty=0.01,0.16"], 1, dict(overrides), runs / "s")
    real_evaluate = evals.evaluate

    def killed_in_the_second_evaluation(info, sae, model, tokens, cfg, device, run_dir, *args):
        if run_dir == jobs[1].run_dir:
            raise KeyboardInterrupt  # as Ctrl-C or a kill lands: no final_info.json is written
        return real_evaluate(info, sae, model, tokens, cfg, device, run_dir, *args)
    monkeypatch.setattr(evals, "evaluate", killed_in_the_second_evaluation)
    with pytest.raises(KeyboardInterrupt):
        studies.run_jobs(jobs, notes, runs)
    assert not (jobs[1].run_dir / "final_info.json").exists()
    monkeypatch.setattr(evals, "evaluate", real_evaluate)
    real_batches = experiment.prefetched_batches

    def no_training(data, order, cfg, steps, *args):
        assert len(steps) == 0, f"trained steps {steps} again"
        return real_batches(data, order, cfg, steps, *args)
    monkeypatch.setattr(experiment, "prefetched_batches", no_training)
    rows = studies.run_jobs(jobs, notes, runs)
    assert [row["how"] for row in rows] == ["reused", "resumed"]
    assert all(row["info"]["status"] == "completed" and row["info"]["training_steps"] == 16 for row in rows)
    assert notes.read_text().count("## Run 0:") == 2 and not (jobs[1].run_dir / experiment.CHECKPOINT).exists()


@pytest.mark.e2e
def test_a_run_another_process_is_training_is_waited_for_then_reused_not_trained_twice(tmp_path, monkeypatch, capsys):
    plugin, runs, notes = experiment.find_plugin("run_0_baseline"), tmp_path / "runs", tmp_path / "notes.md"
    overrides = dict(tokens=2048, seed=42, device="cpu", evals=("core",))
    jobs = studies.sweep_jobs(plugin, "tiny", ["sparsity_penalty=0.04"], 1, overrides, runs / "s")
    studies.run_jobs(jobs, notes, runs)  # what the other process trains
    info_path = jobs[0].run_dir / "final_info.json"
    saved, noted, real_earlier_runs, looks = info_path.read_text(), notes.read_text(), studies.earlier_runs, []

    def planned_before_it_finished(root):  # the first look finds nothing there yet
        looks.append(root)
        return {} if len(looks) == 1 else real_earlier_runs(root)
    monkeypatch.setattr(studies, "earlier_runs", planned_before_it_finished)
    with claimed_by_another_process(jobs[0].run_dir) as other:
        threading.Timer(3, other.kill).start()  # it finishes (or dies) while this one waits
        (ours,) = studies.run_jobs(jobs, notes, runs)
    assert "waiting for another process, which is training or evaluating" in capsys.readouterr().err
    assert ours["how"] == "reused" and ours["folder"] == str(jobs[0].run_dir)
    assert info_path.read_text() == saved and notes.read_text() == noted  # not trained or noted a second time


@pytest.mark.e2e
def test_a_sweep_asked_twice_at_once_shares_the_work_each_process_leaving_a_held_run_for_last(tmp_path, capsys):
    plugin, runs, notes = experiment.find_plugin("run_0_baseline"), tmp_path / "runs", tmp_path / "notes.md"
    overrides = dict(tokens=2048, seed=42, device="cpu", evals=("core",))
    jobs = studies.sweep_jobs(plugin, "tiny", ["sparsity_penalty=0.04,0.08"], 1, overrides, runs / "s")
    finished = []
    with claimed_by_another_process(jobs[0].run_dir) as other:  # the other process is on the first point
        threading.Timer(3, other.kill).start()
        rows = studies.run_jobs(jobs, notes, runs, on_done=lambda done: finished.append(
            next(row["label"] for row in done if row["label"] not in finished)))
    assert finished == [jobs[1].label, jobs[0].label]  # the free point first, then the held one, waited for
    assert [row["how"] for row in rows] == ["trained", "trained"]
    assert "this one goes on and comes back to it" in " ".join(capsys.readouterr().err.split())


def test_a_run_folder_held_by_another_process_is_refused_without_waiting_and_free_once_that_process_dies(tmp_path):
    folder = tmp_path / "runs" / "sweeps" / "k=1,seed=42"
    with claimed_by_another_process(folder) as other:
        with pytest.raises(HarnessError, match="another process is training .*k=1,seed=42; run this again once"):
            with run_folders.claimed(folder, wait=False):
                pass
        other.kill()
        other.wait()
        with run_folders.claimed(folder, wait=False):
            pass
    assert list(folder.parent.iterdir()) == []  # no lock file left behind


def test_ctrl_c_while_waiting_for_a_held_run_folder_ends_the_command_in_one_line_with_exit_130(tmp_path, capsys):
    folder = tmp_path / "runs" / "sweeps" / "k=1,seed=42"
    with claimed_by_another_process(folder), ctrl_c_raises():
        threading.Timer(1, os.kill, (os.getpid(), signal.SIGINT)).start()  # as Ctrl-C in the terminal
        with pytest.raises(typer.Exit) as stopped, one_line_errors():
            with run_folders.claimed(folder):
                pass
    assert stopped.value.exit_code == 130
    said = " ".join(capsys.readouterr().err.split())
    assert f"interrupted while waiting for {folder}, before writing there; run the same command again" in said
    assert not folder.exists()


@pytest.mark.e2e
def test_a_run_whose_process_died_before_its_first_checkpoint_is_trained_afresh_in_its_folder(tmp_path):
    plugin, runs, notes = experiment.find_plugin("run_0_baseline"), tmp_path / "runs", tmp_path / "notes.md"
    overrides = dict(tokens=2048, seed=42, device="cpu", evals=("core",))
    jobs = studies.sweep_jobs(plugin, "tiny", ["sparsity_penalty=0.04"], 1, overrides, runs / "s")
    jobs[0].run_dir.mkdir(parents=True)  # as a killed process leaves it: its config, no checkpoint yet
    (jobs[0].run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(jobs[0].cfg)))
    (row,) = studies.run_jobs(jobs, notes, runs)
    assert row["how"] == "trained" and row["info"]["status"] == "completed"


def test_what_a_claimed_run_folder_holds_decides_how_its_run_goes_on(tmp_path):
    def folder(name, **files):
        path = tmp_path / name
        path.mkdir()
        for file, content in files.items():
            (path / f"{file}.json").write_text(json.dumps(content))
        return path
    def config(saved):  # the job's config, as studies.is_config_of reads one
        return saved == {"seed": 42}
    assert run_folders.left_in(tmp_path / "none", "code", config) == ("trained", {})
    died = folder("died", config={"seed": 42})
    assert run_folders.left_in(died, "code", config) == ("trained", {}) and not died.exists()
    failed = {"status": "failed", "error": "the loss became non-finite"}
    how, info = run_folders.left_in(folder("failed", final_info=failed), "code", config)
    assert how == "failed" and info["error"] == ("the loss became non-finite (an earlier attempt; move the folder "
                                                 "away to train it again)")
    unevaluated = {**failed, "failed_at": "evaluation", "error": "sae_bench crashed"}
    assert "`python experiment.py eval " in run_folders.left_in(folder("unevaluated", final_info=unevaluated),
                                                                "code", config)[1]["error"]
    completed = {"status": "completed", "provenance": {"plugin_source_sha256": "code"}}
    assert run_folders.left_in(folder("completed", final_info=completed), "code", config) == ("reused", completed)
    with pytest.raises(HarnessError, match="holds a completed run of other code of its plugin"):
        run_folders.left_in(tmp_path / "completed", "edited code", config)
    with pytest.raises(HarnessError, match="holds a run of another config; move it away"):
        run_folders.left_in(folder("other", config={"seed": 43}), "code", config)
    (folder("garbled") / experiment.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(HarnessError, match="checkpoint.pt cannot be read .*; move the folder away"):
        run_folders.left_in(tmp_path / "garbled", "code", config)


def test_run_and_eval_refuse_in_one_line_a_run_folder_another_process_holds(run_tiny, notes, tmp_path):
    _, trained = run_tiny("baseline/run_0_baseline")
    new = tmp_path / "runs" / "a study's run"
    for folder, args in ((new, ["run", "--plugin", "run_0_baseline", "--preset", "tiny", "--out", str(new)]),
                         (trained, ["eval", str(trained)])):
        with claimed_by_another_process(folder):
            result = cli(*args, "--notes", str(notes))
            assert result.exit_code == 2 and result.output.count("error:") == 1, result.output
            assert "another process is training" in result.output


def test_a_study_stopped_mid_widening_has_judged_its_runs_against_each_baseline_widened_before_the_stop(
        tmp_path, monkeypatch):
    rounds = iter([{"run_0_topk": ("k", [4]), "run_0_gated": ("sparsity_penalty", [9.0])}])
    monkeypatch.setattr(studies, "widening", lambda rows, cap, tried: next(rounds, {}))
    events = []

    def sweep_runs(plugin, grid, *args):
        if plugin.name == "run_0_gated":
            raise experiment.Interrupted("stopped")
        events.append(f"swept {grid[0]}")
        return [], tmp_path
    monkeypatch.setattr(studies, "sweep_runs", sweep_runs)
    monkeypatch.setattr(studies, "rejudge", lambda rows, runs_root: events.append("judged"))
    with pytest.raises(experiment.Interrupted):
        studies.cover([], "tiny", {}, 1, tmp_path, tmp_path / "notes.md", None, cap=6)
    assert events == ["swept k=4", "judged"]


@pytest.mark.e2e
def test_study_runs_the_baseline_then_each_run_in_order_and_again_trains_nothing(tmp_path):
    runs, notes, figures = tmp_path / "runs", tmp_path / "notes.md", tmp_path / "figures"
    args = ["study", "topk_ortho", *TINY, "--cover-cap", "1", "--runs", str(runs), "--notes", str(notes),
            "--figures", str(figures)]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    order = [line.split(":")[0].split("] ")[1] for line in first.output.splitlines() if line.startswith("[")]
    assert order == ["baseline/run_0_baseline", "topk_ortho/run_1_topk_pairs", "topk_ortho/run_2_adaptive_tau"]
    assert "## Study summary: topk_ortho" in notes.read_text() and (figures / "topk_ortho" / "README.md").exists()
    notes_before = notes.read_text()
    again = cli(*args)
    assert again.exit_code == 0 and again.output.count(": reused") == 3
    assert notes.read_text() == notes_before


def test_two_studies_at_two_seeds_started_in_one_second_plan_different_run_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(studies.time, "strftime", lambda *args: "20261207-120000")  # the same second
    overrides = dict(tokens=2048, device="cpu")
    first, second = (studies.study_jobs("topk_ortho", [], "tiny", {**overrides, "seed": seed}, tmp_path)
                     for seed in (42, 43))
    assert not {job.run_dir for job in first} & {job.run_dir for job in second}


def test_runs_are_found_oldest_first_by_their_folder_s_time_with_or_without_a_seed(tmp_path):
    names = ["20261207-120000-seed43", "20261207-115959", "20261207-120000-seed42", "20261207-120001"]
    for i, name in enumerate(names):
        (tmp_path / name).mkdir()
        (tmp_path / name / "final_info.json").write_text("{}")
        os.utime(tmp_path / name, (1e9 - i, 1e9 - i))  # modification times in the opposite order
    assert [f.name for f in run_folders.find_runs(tmp_path)] == [
        "20261207-115959", "20261207-120000-seed42", "20261207-120000-seed43", "20261207-120001"]


def test_an_unknown_study_is_refused_naming_the_studies(tmp_path):
    result = cli("study", "no_such_study", *TINY, "--runs", str(tmp_path))
    assert result.exit_code == 2 and "unknown study 'no_such_study'" in result.output and "topk_ortho" in result.output


@pytest.mark.e2e
def test_a_run_gets_a_verdict_against_each_baseline_swept_on_the_same_activations(tmp_path):
    runs, notes = tmp_path / "runs", tmp_path / "notes.md"
    swept = cli("sweep", "--plugin", "run_0_baseline", *TINY, "--grid", "sparsity_penalty=0.01,0.16",
                "--runs", str(runs), "--notes", str(notes))
    assert swept.exit_code == 0, swept.output
    out = runs / "zscore_ortho" / "run_1_initial" / "one"
    assert cli("run", "--plugin", "run_1_initial", *TINY, "--out", str(out), "--notes", str(notes)).exit_code == 0
    verdict = json.loads((out / "final_info.json").read_text())["verdict"]["run_0_baseline"]
    assert verdict["knob"] == "sparsity_penalty" and verdict["points"] == 2
    assert set(verdict["metrics"]) == {"ce_loss_score", "kl_div_score", "explained_variance"}
    assert all(entry["word"] for entry in verdict["metrics"].values())
    assert all(entry["uncertainty_parts"]["contexts"] and entry["pairing"] == "paired over 16 evaluation contexts"
               for entry in verdict["metrics"].values() if entry["delta"] is not None)  # the paired bootstrap
    line = next(line for line in notes.read_text().splitlines() if line.startswith("Against run_0_baseline"))
    assert line.startswith("Against run_0_baseline (sparsity_penalty, 2 runs)")
    words = {entry["word"] for entry in verdict["metrics"].values()}
    if words == {"outside the baseline sweep: widen it"}:  # then one sentence naming the penalty to add
        assert ": outside the baseline sweep: widen it: add sparsity_penalty=" in line
    else:
        assert " at this L0: ce_loss_score " in line


@pytest.mark.e2e
def test_a_run_that_fails_for_its_own_reasons_is_reported_the_rest_go_on_and_the_command_fails(tmp_path, monkeypatch):
    real_execute = experiment.execute

    def nan_for_one(cfg, plugin, run_dir, *args, **kwargs):
        if cfg.sparsity_penalty == 0.01:
            raise experiment.HarnessError("training stopped: l2_loss became nan at step 3")
        return real_execute(cfg, plugin, run_dir, *args, **kwargs)
    monkeypatch.setattr(studies, "execute", nan_for_one)
    result = cli("sweep", "--plugin", "run_0_baseline", *TINY, "--grid", "sparsity_penalty=0.01,0.16",
                 "--runs", str(tmp_path / "runs"), "--notes", str(tmp_path / "notes.md"))
    assert result.exit_code == 1 and "1 of 2 runs failed (sparsity_penalty=0.01,seed=42)" in result.output
    (manifest,) = (tmp_path / "runs").glob("sweeps/*/manifest.json")
    assert [(r["run"], r["how"]) for r in json.loads(manifest.read_text())["finished"]] == [
        ("sparsity_penalty=0.01,seed=42", "failed"), ("sparsity_penalty=0.16,seed=42", "trained")]


def test_a_run_on_a_cluster_has_its_warnings_shown_by_the_driver_whose_console_is_the_only_one_seen(tmp_path, capsys):
    plugin = experiment.find_plugin("baseline/run_0_baseline")
    job = studies.Job(studies.job_config(plugin, "tiny", {}, {}), plugin, tmp_path / "run", "the run")
    infos = [{"status": "completed", "warnings": ["decoder did not move"], "metrics": {}},
             {"status": "failed", "error": "worker died", "warnings": None}]

    def remote(plans, notes):  # as cluster.run_on_ray yields a worker's finished run
        yield from ((i, "trained", folder, info, 1.0) for (i, _, folder, _), info in zip(plans, infos))
    studies.run_jobs([job, dataclasses.replace(job, label="another")], tmp_path / "notes.md", tmp_path / "runs",
                     remote=remote)
    assert "warning: decoder did not move" in capsys.readouterr().err


def test_a_runs_setting_names_only_what_it_changed_even_where_a_default_is_a_tuple_saved_as_a_list():
    plugin = experiment.find_plugin("run_0_matryoshka")
    saved = json.loads(json.dumps(dataclasses.asdict(plugin.hyperparams_class())))  # as config.json holds them
    info = {"provenance": {"config": {"preset": "embedded", "seed": 42, "hyperparams": saved}}}
    assert experiment.setting(plugin, info) == "the preset's"
    info["provenance"]["config"]["hyperparams"] = {**saved, "k": 16}
    assert experiment.setting(plugin, info) == "k=16"


PLUGIN = '''"""A scratch run: {title}"""

from dataclasses import dataclass

from plugins.baseline import run_0_baseline as parent


@dataclass
class Hyperparams(parent.Hyperparams):
    weight: float = {weight}  # {comment}
'''


def imported_afresh(name: str) -> experiment.Plugin:
    """A scratch plugin as a new process finds it (this one keeps what it imported)."""
    for module in [m for m in sys.modules if m.startswith("plugins.scratch_test_study")]:
        del sys.modules[module]
    return experiment.find_plugin(f"scratch_test_study/{name}")


def test_a_plugins_identity_is_its_code_not_its_prose(scratch_study):
    path = scratch_study / "run_1_scratch.py"
    path.write_text(PLUGIN.format(title="first words", weight=0.5, comment="why"))
    first = imported_afresh("run_1_scratch").source_hash()
    path.write_text(PLUGIN.format(title="other words, a measurement: 0.123", weight=0.5, comment="another why"))
    assert imported_afresh("run_1_scratch").source_hash() == first
    path.write_text(PLUGIN.format(title="first words", weight=0.25, comment="why"))
    assert imported_afresh("run_1_scratch").source_hash() != first


CHILD = '''"""A scratch run on run_1_scratch."""

from plugins.scratch_test_study import run_1_scratch as parent


class Hyperparams(parent.Hyperparams):
    pass
'''


def test_a_plugin_whose_parent_is_edited_after_its_import_keeps_the_identity_of_the_code_it_runs(scratch_study):
    parent, original = scratch_study / "run_1_scratch.py", PLUGIN.format(title="first words", weight=0.5, comment="why")
    parent.write_text(original)
    (scratch_study / "run_2_child.py").write_text(CHILD)
    child = imported_afresh("run_2_child")  # and its parent with it
    parent.write_text(PLUGIN.format(title="first words", weight=0.25, comment="why"))  # edited mid-study
    found_since = experiment.find_plugin("scratch_test_study/run_2_child")
    hashes = child.source_hash(), found_since.source_hash(), experiment.find_plugin("run_1_scratch").source_hash()
    assert found_since.hyperparams_class().weight == 0.5  # what this process runs
    parent.write_text(original)
    assert hashes == (imported_afresh("run_2_child").source_hash(),) * 2 + (
        experiment.find_plugin("run_1_scratch").source_hash(),)
    parent.write_text(PLUGIN.format(title="first words", weight=0.25, comment="why"))
    assert imported_afresh("run_2_child").source_hash() != hashes[0]  # a new process: the edit


@pytest.mark.e2e
def test_study_reuses_a_run_whose_plugin_docstring_changed_and_retrains_one_whose_code_changed(tmp_path, scratch_study):
    path, runs = scratch_study / "run_1_scratch.py", tmp_path / "runs"
    args = ["study", "scratch_test_study", *TINY, "--cover-cap", "1", "--runs", str(runs),
            "--notes", str(tmp_path / "notes.md"), "--figures", str(tmp_path / "figures")]
    path.write_text(PLUGIN.format(title="first words", weight=0.5, comment="why"))
    assert cli(*args).exit_code == 0
    path.write_text(PLUGIN.format(title="new words", weight=0.5, comment="why"))
    imported_afresh("run_1_scratch")  # each command below as a new process runs it
    reused = cli(*args)
    assert reused.exit_code == 0 and "run_1_scratch: reused" in reused.output
    path.write_text(PLUGIN.format(title="new words", weight=0.25, comment="why"))
    imported_afresh("run_1_scratch")
    retrained = cli(*args)
    assert retrained.exit_code == 0 and "run_1_scratch: trained" in retrained.output


@pytest.mark.e2e
def test_a_study_loads_its_model_once_for_all_its_runs(tmp_path, monkeypatch):
    loads = []
    real_load = experiment.load_model
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    result = cli("study", "topk_ortho", *TINY, "--cover-cap", "1", "--runs", str(tmp_path / "runs"),
                 "--notes", str(tmp_path / "n.md"), "--figures", str(tmp_path / "figures"))
    assert result.exit_code == 0, result.output
    assert result.output.count(": trained") == 3 and loads == ["tiny"]  # the baseline and both runs


SPARSER = '''"""A scratch run: four times the L1 penalty, so its L0 lies below the baseline's."""

from plugins.baseline import run_0_baseline as parent


class SAE(parent.SAE):
    def sparsity_coefficient(self, fwd):
        return 4 * super().sparsity_coefficient(fwd)
'''


@pytest.mark.e2e
def test_a_study_at_two_seeds_widens_its_baseline_to_cover_its_run_and_judges_the_seeds_together(tmp_path,
                                                                                                   scratch_study):
    (scratch_study / "run_1_sparser.py").write_text(SPARSER)
    runs, notes = tmp_path / "runs", tmp_path / "notes.md"
    args = ["study", "scratch_test_study", *TINY, "--seeds", "2", "--cover-cap", "2", "--runs", str(runs),
            "--notes", str(notes), "--figures", str(tmp_path / "figures")]
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert "widening run_0_baseline's sweep on these activations: sparsity_penalty=" in first.output
    widened = [json.loads(p.read_text()) for p in runs.glob("sweeps/*/*/final_info.json")]
    assert sorted(info["provenance"]["seed"] for info in widened) == [42, 43]  # one knob value, at both seeds
    (manifest,) = runs.glob("sweeps/*/manifest.json")
    assert set(json.loads(manifest.read_text())["seed_spread"]) == {"ce_loss_score", "kl_div_score",
                                                                     "explained_variance"}
    for path in runs.glob("scratch_test_study/run_1_sparser/*/final_info.json"):
        info = json.loads(path.read_text())
        assert info["convergence"]["threshold"] == 0.1 and (path.parent / "eval_contexts.safetensors").exists()
        entry = info["verdict"]["run_0_baseline"]["metrics"]["ce_loss_score"]
        assert entry["seeds"]["run"] == [42, 43]  # each seed's verdict pools both, once both have finished
        assert entry["word"] == "outside the baseline sweep: widen it" or entry["pairing"].startswith("paired over")
    summary = notes.read_text().split("## Study summary: scratch_test_study")[1]
    assert "Coverage (a baseline covers a run whose L0 lies inside its sweep):" in summary
    before = notes.read_text()
    again = cli(*args)
    assert again.exit_code == 0 and ": trained" not in again.output and "widening" not in again.output
    assert notes.read_text() == before  # the same verdicts: the summary is not noted twice
    other = tmp_path / "other.md"  # a new notebook gets the study's summary, though nothing was trained
    assert cli(*args[:-4], "--notes", str(other), *args[-2:]).exit_code == 0
    assert other.read_text().count("## Study summary: scratch_test_study") == 1
