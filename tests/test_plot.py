"""plot.py on real tiny runs: every figure whose data exists is written and opens as an image,
none is drawn from absent data, a failed run is marked as failed (never a zero) without breaking
plotting, the latest run of each plugin is used unless one is picked, runs are found at any depth
and named by what they recorded, compare_table highlights each column's best value and shows deltas
against the parent plugin's latest run, and plot.py imports nothing that imports it back."""

import ast
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from helpers import imported_modules, tiny_run
from matplotlib.collections import PathCollection
from safetensors.numpy import save_file
from typer.testing import CliRunner

import experiment
import plot
from runs import find_runs, latest_run, read_run, run_index

pytestmark = pytest.mark.e2e  # on real tiny runs, trained once for the module

STAMP = "20250101-000000"
PLUGINS = ["zscore_ortho/run_1_initial", "zscore_ortho/run_2_stable_init", "topk_ortho/run_1_topk_pairs"]
EVAL_FIGURES = {"absorption_scores", "feature_splits", "absorption_metrics", "letter_absorption",
                "scr_threshold_comparison"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Three tiny runs, trained once for the whole module, in the runs/<study>/<plugin>/<stamp> layout."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAE_HARNESS_ACTIVATIONS", str(root / "activations"))
        for plugin in PLUGINS:
            tiny_run(plugin, root / "runs" / plugin / STAMP, root / "notes.md")
    return root / "runs"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def runs(trained, tmp_path) -> Path:
    """A private copy of the trained runs, for a test to add to."""
    return Path(shutil.copytree(trained, tmp_path / "runs"))


def edit_info(run_dir: Path, edit) -> dict:
    info = json.loads((run_dir / "final_info.json").read_text())
    edit(info)
    (run_dir / "final_info.json").write_text(json.dumps(info))
    return info


def relabel_config(run_dir: Path, plugin: str) -> None:
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(config | {"plugin": plugin}))


def copy_run(source: Path, folder: Path, plugin: str, recorded: bool = True) -> Path:
    """A copy of a run folder as if `plugin` (study/stem) had run there: config.json's plugin and
    final_info.json's `run` say so; recorded=False leaves `run` out, as in folders written before
    runs recorded it."""
    shutil.copytree(source, folder)
    relabel_config(folder, plugin)

    def edit(info):
        info.pop("run", None)
        if recorded:
            info["run"] = experiment.find_plugin(plugin).identity()
    edit_info(folder, edit)
    return folder


def add_failed_run(runs: Path) -> None:
    """zscore_ortho run 3 as execute() leaves a run that hit a non-finite loss: two log lines,
    no metrics, status failed."""
    source = runs / PLUGINS[0] / STAMP
    plugin = "zscore_ortho/run_3_reduced_ortho_lr"
    folder = runs / plugin / STAMP
    folder.mkdir(parents=True)
    shutil.copy(source / "config.json", folder / "config.json")
    relabel_config(folder, plugin)
    log = (source / "train_log.jsonl").read_text().splitlines()[:2]
    (folder / "train_log.jsonl").write_text("\n".join(log) + "\n")
    info = dict(run=experiment.find_plugin(plugin).identity(), training_steps=0, final_loss=None, layer=1,
                dict_size=256, learning_rate=1e-3, sparsity_penalty=0.04, status="failed",
                error="non-finite loss: l2_loss became nan at step 12")
    (folder / "final_info.json").write_text(json.dumps(info))


def add_evals(run_dir: Path, eval_seed: int = 42) -> None:
    """sae_bench absorption and SCR results, as evals.<eval_type_id>, drawn with eval_seed."""
    absorption = {"eval_type_id": "absorption_first_letter", "eval_config": {"random_seed": eval_seed},
                  "eval_result_metrics": {"mean": {"mean_absorption_fraction_score": 0.12,
                                                   "mean_full_absorption_score": 0.05,
                                                   "mean_num_split_features": 1.4}},
                  "eval_result_details": [{"first_letter": c, "mean_absorption_fraction": 0.1 * i,
                                           "num_split_features": 1} for i, c in enumerate("abc")]}
    scr = {"eval_type_id": "scr", "eval_config": {"random_seed": eval_seed}, "eval_result_metrics": {"scr_metrics": {
        f"scr_metric_threshold_{k}": 0.01 * k for k in (2, 5, 10, 20)} | {"scr_metric_threshold_50": None}}}
    edit_info(run_dir, lambda info: info.update(evals={"absorption_first_letter": absorption, "scr": scr}))


def figures(runs: Path, study: str, make=plot.study_figures) -> dict:
    """name -> figure, unsaved, to look inside."""
    with plt.rc_context({"figure.max_open_warning": 0}):
        return {name: fig for name, fig, _ in make(plot.select_runs(runs, study)[study])}


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def test_every_figure_with_data_is_written_and_opens(runs, tmp_path):
    out = tmp_path / "figures"
    written = plot.plot_all(runs, out)
    by_study = {s: {p.stem for p in written if p.parent.name == s} for s in ("zscore_ortho", "topk_ortho")}
    assert set(written) == {out / s / f"{n}.png" for s, names in by_study.items() for n in names}
    for study, names in by_study.items():
        log_keys = {k for p in PLUGINS if p.startswith(study)
                    for line in (runs / p / STAMP / "train_log.jsonl").read_text().splitlines()
                    for k in json.loads(line)} - {"step", "tokens"}
        expected = ({f"{m}_evolution" for m in plot.EVOLUTION} | {f"{k}_comparison" for k in log_keys}
                    | {f"frontier_{m}" for m in plot.FRONTIER}
                    | {"key_metrics_combined", "final_losses", "training_loss_comparison", "reconstruction_metrics"})
        assert names == expected | ({"final_metrics_comparison"} if study == "topk_ortho" else set())
        assert {"total_loss_comparison", "l2_loss_comparison", "sparsity_loss_comparison",
                "ortho_loss_comparison"} <= names
    assert {"active_features_comparison", "unique_features_in_pairs_comparison", "max_pair_correlation_comparison",
            "mean_pair_correlation_comparison"} <= by_study["topk_ortho"]
    for path in written:  # no evals, no artifacts: none of their figures
        assert not any(path.stem.startswith(n) for n in EVAL_FIGURES | {"feature_frequencies", "frequency_ordering"})
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 200 and image.std() > 0
    readme = (out / "README.md").read_text()
    listed = {line.split("`")[1] for line in readme.splitlines() if line.startswith("- `")}
    assert listed == {str(p.relative_to(out)) for p in written}
    assert "Run 2: Improved Initialization and Training…" in readme and f"run_2_stable_init/{STAMP}" in readme


def test_eval_and_frequency_figures_only_for_runs_with_that_data(runs, tmp_path):
    zscore = runs / "zscore_ortho"
    add_evals(zscore / "run_2_stable_init" / STAMP)
    save_file({"feature_frequencies": np.linspace(0.5, 0.0, 256, dtype=np.float32)},
              zscore / "run_1_initial" / STAMP / "artifacts.safetensors")
    out = tmp_path / "figures"
    result = CliRunner().invoke(plot.app, ["--runs", str(runs), "--out", str(out), "--study", "zscore_ortho"])
    assert result.exit_code == 0, result.output
    names = {p.stem for p in out.glob("*.png")}  # one study: no study folder
    assert EVAL_FIGURES | {"feature_frequencies_run_1_initial", "frequency_ordering_run_1_initial"} <= names
    assert not {"feature_frequencies_run_2_stable_init", "final_metrics_comparison"} & names
    assert not (out / "topk_ortho").exists()
    for name in names:
        assert matplotlib.image.imread(out / f"{name}.png").ndim == 3

    figs = figures(runs, "zscore_ortho", plot.eval_figures)
    ticks = [t.get_text() for t in figs["absorption_scores.png"].axes[0].get_xticklabels()]
    assert ticks == ["Run 2: Improved Initialization and Training…"]  # run 1 has no absorption result: not drawn at all
    assert list(figs["absorption_scores.png"].axes[0].containers[0].datavalues) == [pytest.approx(0.12)]
    scr_line, *_ = scr_lines = figs["scr_threshold_comparison.png"].axes[0].get_lines()
    assert list(scr_line.get_xdata()) == [2, 5, 10, 20]  # the None at threshold 50 is left out

    add_evals(zscore / "run_1_initial" / STAMP, eval_seed=43)  # read with another instrument: not beside run 2's
    figs = figures(runs, "zscore_ortho", plot.eval_figures)
    assert [t.get_text() for t in figs["absorption_scores.png"].axes[0].get_xticklabels()] == ticks
    assert len(figs["scr_threshold_comparison.png"].axes[0].get_lines()) == len(scr_lines)

    (zscore / "run_1_initial" / STAMP / "artifacts.safetensors").unlink()
    plot.plot_all(runs, out, "zscore_ortho")  # figures from data that is gone do not linger
    assert not (out / "feature_frequencies_run_1_initial.png").exists()
    assert (out / "absorption_scores.png").exists()


def test_failed_run_is_marked_failed_not_zero(runs, tmp_path):
    add_failed_run(runs)
    figs = figures(runs, "zscore_ortho")
    label = "Run 3: Reduced Orthogonality Penalty…"

    fig = figs["explained_variance_evolution.png"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][2] == label
    assert "failed" in texts(fig)
    assert math.isnan(ax.get_lines()[0].get_ydata()[2])  # a break in the line, no point at 0
    points = next(c for c in ax.collections if isinstance(c, PathCollection)).get_offsets()
    assert sorted(points[:, 0]) == [0, 1]

    fig = figs["final_losses.png"]
    assert len(fig.axes[0].containers[0]) == 2 and "failed" in texts(fig)  # no bar for the failed run
    assert "failed" in texts(figs["training_loss_comparison.png"])

    ax = figs["total_loss_comparison.png"].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"{label} (failed; × where it stopped)" in legend
    assert [len(line.get_xdata()) for line in ax.get_lines()][-2:] == [2, 1]  # its 2 logged steps, then ×

    written = plot.plot_all(runs, tmp_path / "figures", "zscore_ortho")
    readme = (tmp_path / "figures" / "README.md").read_text()
    assert written and "**failed**: non-finite loss: l2_loss became nan at step 12" in readme

    cells = [str(list(column.cells)[2]) for column in plot.compare_table(runs, "zscore_ortho").columns]
    assert cells[0].startswith(label) and "failed: non-finite loss" in cells[0]
    assert set(cells[1:-1]) == {"failed"} and cells[-1] == ""  # and no verdict


def test_latest_run_is_used_unless_another_is_picked(runs):
    plugin = runs / PLUGINS[0]
    newer = plugin / "20250102-000000"
    shutil.copytree(plugin / STAMP, newer)
    edit_info(newer, lambda info: info["metrics"]["reconstruction_quality"].update(explained_variance_whole_set=0.99))
    (plugin / "20250103-000000").mkdir()  # still training: config.json only, no final_info.json
    shutil.copy(newer / "config.json", plugin / "20250103-000000" / "config.json")

    def chosen(**kwargs):
        return {r.plugin: r.folder for r in plot.select_runs(runs, "zscore_ortho", **kwargs)["zscore_ortho"]}

    assert chosen()["run_1_initial"] == newer
    swept = runs / "sweeps" / "analysis_zscore_ortho" / "run_1_initial" / "20250104-000000"
    shutil.copytree(newer, swept)  # a later sweep's run: the study's own run still stands for the plugin
    assert chosen()["run_1_initial"] == newer
    aside = shutil.move(plugin, runs.parent / "aside")  # unless the plugin has no other
    assert chosen()["run_1_initial"] == swept
    shutil.move(aside, plugin)
    shutil.rmtree(runs / "sweeps")
    assert chosen(picks=[plugin / STAMP])["run_1_initial"] == plugin / STAMP
    with pytest.raises(plot.HarnessError, match="not a finished run folder"):
        chosen(picks=[plugin / "20250103-000000"])
    colours = {r.plugin: r.color for rs in plot.select_runs(runs).values() for r in rs}
    assert colours["run_1_initial"] == colours["run_1_topk_pairs"] == plot.PALETTE[1]  # colour = run number
    assert colours["run_2_stable_init"] == plot.PALETTE[2]

    # A run from before runs recorded their plugin (its plugin file since removed) is still shown,
    # labelled from config.json's plugin name.
    copy_run(plugin / STAMP, runs / "old" / "folder", "zscore_ortho/run_12_removed_idea", recorded=False)
    last = plot.select_runs(runs, "zscore_ortho")["zscore_ortho"][-1]
    assert (last.label, last.parent, last.color) == ("Run 12: removed idea", None, plot.PALETTE[12])


def test_compare_table_highlights_best_and_shows_delta_against_parent(runs):
    def set_metrics(plugin, ev, l2_ratio, mse):
        def edit(info):
            info["metrics"]["reconstruction_quality"].update(explained_variance_whole_set=ev, mse=mse)
            info["metrics"]["shrinkage"]["l2_ratio"] = l2_ratio
            info["verdict"] = {"run_0_topk": {"metrics": {"ce_loss_score": {"word": "better" if ev > 0.6 else "tied"}}},
                               "run_0_gated": {"metrics": {"ce_loss_score": {"word": "outside the baseline sweep"}}}}
        edit_info(runs / plugin / STAMP, edit)

    set_metrics("zscore_ortho/run_1_initial", ev=0.50, l2_ratio=0.95, mse=0.30)
    set_metrics("zscore_ortho/run_2_stable_init", ev=0.70, l2_ratio=1.20, mse=0.20)
    set_metrics("topk_ortho/run_1_topk_pairs", ev=0.60, l2_ratio=0.80, mse=0.25)
    table = plot.compare_table(runs)
    headers = [c.header for c in table.columns]
    assert headers[:2] == ["study", "run"] and {"explained_variance ↑", "mse ↓", "l2_ratio →1", "final_loss ↓"} <= set(headers)
    column = {c.header: list(c.cells) for c in table.columns}
    assert [str(c) for c in column["study"]] == ["topk_ortho", "zscore_ortho", "zscore_ortho"]

    def best(header):
        return [i for i, cell in enumerate(column[header]) if "bold" in str(cell.style)]

    assert best("explained_variance ↑") == [2] and best("mse ↓") == [2] and best("l2_ratio →1") == [1]
    assert str(column["explained_variance ↑"][2]) == "0.7 (+0.2)"  # run 2 against its parent, run 1
    assert str(column["mse ↓"][2]) == "0.2 (-0.1)"
    assert str(column["explained_variance ↑"][1]) == "0.5" and str(column["explained_variance ↑"][0]) == "0.6"
    assert len(best("final_loss ↓")) == 1
    assert [str(c) for c in column["CE-loss score against the baselines at its L0"]] == [
        "run_0_topk: tied; run_0_gated: outside its sweep", "run_0_topk: tied; run_0_gated: outside its sweep",
        "run_0_topk: better; run_0_gated: outside its sweep"]


def test_cli_refuses_missing_runs_and_unknown_study(runs, tmp_path):
    result = CliRunner().invoke(plot.app, ["--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "f")])
    assert result.exit_code == 2 and "no finished run folders" in result.output
    result = CliRunner().invoke(plot.app, ["--runs", str(runs), "--out", str(tmp_path / "f"), "--study", "nope"])
    assert result.exit_code == 2 and "zscore_ortho" in result.output


def test_the_baseline_is_every_study_s_run_0_when_trained_on_the_same_activations(runs):
    baseline = copy_run(runs / PLUGINS[0] / STAMP, runs / "baseline" / "run_0_baseline" / STAMP,
                        "baseline/run_0_baseline")

    def plugins(study):
        return [r.plugin for r in plot.select_runs(runs, study)[study]]

    assert plugins("zscore_ortho") == ["run_0_baseline", "run_1_initial", "run_2_stable_init"]
    assert plugins("baseline") == ["run_0_baseline"]
    edit_info(baseline, lambda info: info.update(activation_cache="other-activations"))
    assert plugins("zscore_ortho") == ["run_1_initial", "run_2_stable_init"]


def test_every_baseline_architecture_is_run_0_of_every_study_on_the_same_activations(runs):
    copy_run(runs / PLUGINS[0] / STAMP, runs / "baseline" / "run_0_topk" / STAMP, "baseline/run_0_topk", recorded=False)
    copy_run(runs / PLUGINS[0] / STAMP, runs / "baseline" / "run_0_baseline" / STAMP, "baseline/run_0_baseline")
    zscore = [r.plugin for r in plot.select_runs(runs, "zscore_ortho")["zscore_ortho"]]
    assert zscore == ["run_0_baseline", "run_0_topk", "run_1_initial", "run_2_stable_init"]
    colours = [r.color for r in plot.select_runs(runs, "zscore_ortho")["zscore_ortho"]]
    assert len(set(colours)) == len(colours)


def test_a_broken_run_s_score_is_drawn_off_scale_not_flattening_the_others(runs):
    """One run at explained variance -700 (or a KL score of -inf) must not squash the others onto a
    line: it sits on the -1 floor as ▼ with its true value written."""
    broken = runs / PLUGINS[1] / STAMP
    edit_info(broken, lambda info: (info["metrics"]["reconstruction_quality"].update(explained_variance_whole_set=-700.0),
                                    info["metrics"]["model_behavior_preservation"].update(kl_div_score=-math.inf)))
    fig = figures(runs, "zscore_ortho")["key_metrics_combined.png"]
    ev, _, kl = fig.axes
    assert ev.get_ylim()[0] > -2 and kl.get_ylim()[0] > -2
    assert "-700 (off scale)" in texts(fig) and "-inf (off scale)" in texts(fig)
    on_scale, off_scale = [c.get_offsets() for c in ev.collections if isinstance(c, PathCollection)]
    assert list(off_scale[:, 0]) == [1] and list(off_scale[:, 1]) == [-1.0] and list(on_scale[:, 0]) == [0]


def test_a_run_anywhere_under_runs_is_found_and_named_by_what_it_ran(trained, tmp_path, notes, monkeypatch):
    """`experiment.py run --out DIR/name` can put a run anywhere: plot finds every folder holding a
    final_info.json at any depth and names it by the study and plugin the run recorded, not by its path."""
    monkeypatch.setenv("SAE_HARNESS_ACTIVATIONS", str(trained.parent / "activations"))  # the module's cache
    root = tmp_path / "some"
    info = tiny_run(PLUGINS[1], root / "where" / "name", notes)
    shutil.copytree(trained / PLUGINS[0] / STAMP, root / "else" / "deeper" / "copy")  # its parent, run 1

    runs = plot.select_runs(root)["zscore_ortho"]
    assert list(plot.select_runs(root)) == ["zscore_ortho"]
    assert [(r.study, r.plugin, r.folder) for r in runs] == [
        ("zscore_ortho", "run_1_initial", root / "else" / "deeper" / "copy"),
        ("zscore_ortho", "run_2_stable_init", root / "where" / "name")]
    assert runs[1].label == "Run 2: Improved Initialization and Training…" and runs[1].parent == "run_1_initial"
    ticks = figures(root, "zscore_ortho")["explained_variance_evolution.png"].axes[0].get_xticklabels()
    assert [t.get_text() for t in ticks] == [r.label for r in runs]

    assert latest_run(root, "run_2_stable_init") == info == latest_run(root, PLUGINS[1])
    assert latest_run(root, "run_2_stable_init", same_data_as={"activation_cache": "elsewhere"}) is None
    assert latest_run(root, "run_3_reduced_ortho_lr") is None
    column = {c.header: [str(cell) for cell in c.cells] for c in plot.compare_table(root).columns}
    assert "(" in column["explained_variance ↑"][1]  # run 2's change against run 1, found at another depth

    out = tmp_path / "figures"
    result = CliRunner().invoke(plot.app, ["--runs", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    readme = (out / "README.md").read_text()
    assert "## zscore_ortho" in readme
    assert f"- {runs[1].label} (`run_2_stable_init`): `{root / 'where' / 'name'}`" in readme
    assert (out / "explained_variance_evolution.png").exists()

    # --run takes any folder holding a final_info.json, named by its own files too.
    result = CliRunner().invoke(plot.app, ["--runs", str(tmp_path / "empty"), "--out", str(out),
                                           "--run", str(root / "where" / "name")])
    assert result.exit_code == 0, result.output
    assert f"(`run_2_stable_init`): `{root / 'where' / 'name'}`" in (out / "README.md").read_text()


def test_plot_imports_no_project_module_that_imports_it_back():
    """plot.py is a leaf: experiment.py may import it, never the other way round (reference_baselines
    reads the baselines' plugins, so experiment, only when it is called)."""
    root = Path(plot.__file__).resolve().parent
    code = ("import json, pathlib, sys; import plot; root = pathlib.Path(plot.__file__).resolve().parent; "
            "files = {n: pathlib.Path(getattr(m, '__file__', None) or '/').resolve() "
            "for n, m in list(sys.modules.items())}; "
            "print(json.dumps({n: str(f) for n, f in files.items() "
            "if f.is_file() and (f.parent == root or root / 'plugins' in f.parents)}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "plot" in loaded and "experiment" not in loaded and not any(n.startswith("plugins") for n in loaded)
    for name, path in loaded.items():
        if name != "plot":
            assert "plot" not in imported_modules(ast.parse(Path(path).read_text())), name


def sweep_copy(runs: Path, source: Path, plugin: str, name: str, l0: float, ce: float, se: float, **config) -> Path:
    """A copy of a run as one point of a sweep of `plugin`: its L0, CE-loss score and bootstrap SE."""
    folder = copy_run(source, runs / "sweeps" / name, plugin)

    def edit(info):
        info["metrics"]["sparsity"]["l0"] = l0
        info["metrics"]["model_performance_preservation"]["ce_loss_score"] = ce
        info["metrics"]["bootstrap_se"]["ce_loss_score"] = se
        info["provenance"]["config"].update(config)
    edit_info(folder, edit)
    return folder


def test_the_frontier_draws_each_baseline_sweep_as_a_curve_and_pools_a_plugin_s_seeds(runs):
    source = runs / PLUGINS[0] / STAMP
    for i, (l0, ce) in enumerate([(10.0, 0.5), (40.0, 0.7), (160.0, 0.9)]):
        sweep_copy(runs, source, "baseline/run_0_baseline", f"base{i}", l0, ce, 0.01, sparsity_penalty=0.1 * i)
    for seed, (l0, ce), preset in zip((1, 2), [(30.0, 0.80), (50.0, 0.84)], ("tiny", "tiny-named-otherwise")):
        sweep_copy(runs, source, "zscore_ortho/run_1_initial", f"z{seed}", l0, ce, 0.5, seed=seed, lr=0.5,
                   preset=preset)  # two seeds of one setting, whatever its preset was called: one point
    fig = figures(runs, "zscore_ortho", make=lambda rs: plot.frontier_figures(rs, [
        read_run(f) for f in find_runs(runs)]))["frontier_ce_loss_score.png"]
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    curves = {c.get_label(): c for c in ax.containers}  # one errorbar container per series
    base = curves["run_0_baseline"].lines[0]
    assert base.get_linestyle() == "--" and list(base.get_xdata()) == [10.0, 40.0, 160.0]
    initial = next(c for label, c in curves.items() if label.startswith("Run 1"))
    pooled = list(initial.lines[0].get_xdata()).index(40.0)  # beside the trained run's own point
    assert initial.lines[0].get_ydata()[pooled] == pytest.approx(0.82)
    # the pooled point's error bar is the standard error across its two seeds (0.02), not their bootstrap 0.5
    segment = initial.lines[2][0].get_segments()[pooled]
    assert segment[1][1] - segment[0][1] == pytest.approx(2 * 0.02)


def test_a_baseline_run_off_its_plugin_s_defaults_is_neither_on_its_curve_nor_run_0(runs, tmp_path):
    """A calibration at another setting on the same activations is out of the baseline's sweep for the
    verdicts (frontier.at_defaults), so another study's figures leave it out too, however new it is;
    the baseline study's own figures show it."""
    source, topk = runs / PLUGINS[0] / STAMP, experiment.find_plugin("baseline/run_0_topk")
    defaults = dataclasses.asdict(topk.hyperparams_class())
    for name, l0, k in (("topk_a", 10.0, 16), ("topk_b", 40.0, 64)):
        sweep_copy(runs, source, "baseline/run_0_topk", name, l0, 0.6, 0.01, hyperparams={**defaults, "k": k})
    stray = sweep_copy(runs, source, "baseline/run_0_topk", "topk_stray", 80.0, 0.9, 0.01,
                       hyperparams={**defaults, "k": 128, "aux_loss_coefficient": 0.5})
    index = run_index(runs)
    assert [folder.name for folder, _, _ in plot.reference_baselines(index)] == ["topk_a", "topk_b"]
    shown = [r.folder for r in plot.select_runs(runs, "zscore_ortho")["zscore_ortho"] if r.plugin == "run_0_topk"]
    assert shown == [runs / "sweeps" / "topk_b"]

    def frontier_caption(study: str, out: str) -> str:
        return plot.plot_all(runs, tmp_path / out, study)[tmp_path / out / "frontier_ce_loss_score.png"]
    assert "run_0_topk: 0.600 ± 0.01 at L0 10 → 0.600 ± 0.01 at L0 40." in frontier_caption("zscore_ortho", "a")
    assert "0.900 ± 0.01 at L0 80" in frontier_caption("baseline", "b")
    edit_info(stray, lambda info: info["provenance"]["config"]["hyperparams"].update(
        aux_loss_coefficient=defaults["aux_loss_coefficient"]))
    assert "0.900 ± 0.01 at L0 80" in frontier_caption("zscore_ortho", "c")
    again = sweep_copy(runs, source, "baseline/run_0_topk", "topk_b_again", 40.0, 0.7, 0.01, sparsity_penalty=9.0,
                       hyperparams={**defaults, "k": 64})  # topk_b again, at a setting TopK does not read
    failed = sweep_copy(runs, source, "baseline/run_0_topk", "topk_b_failed", 40.0, 0.7, 0.01, sparsity_penalty=8.0,
                        hyperparams={**defaults, "k": 64})
    edit_info(failed, lambda info: info.update(status="failed"))
    relu = [sweep_copy(runs, source, "baseline/run_0_baseline", f"relu_{penalty}", 10.0 / penalty, 0.5, 0.01,
                       sparsity_penalty=penalty, hyperparams={"b_dec_init": "geometric_median"}) for penalty in (1, 2)]
    index = run_index(runs)
    kept = [folder for folder, _, _ in plot.reference_baselines(index)]
    assert set(kept) == {runs / "sweeps" / "topk_a", stray, again, *relu}  # ReLU's own knob: two points
    assert kept == [folder for folder, _, _ in index if folder in kept]  # oldest first, as the index


def test_differences_far_below_the_noise_are_not_drawn_as_a_slope(runs):
    for i, plugin in enumerate(PLUGINS[:2]):
        edit_info(runs / plugin / STAMP, lambda info, i=i: (
            info["metrics"]["reconstruction_quality"].update(explained_variance_whole_set=0.5 + 3e-7 * i),
            info["metrics"]["bootstrap_se"].update(explained_variance_whole_set=0.004)))
    fig = figures(runs, "zscore_ortho")["explained_variance_evolution.png"]
    low, high = fig.axes[0].get_ylim()
    assert high - low >= 4 * 0.004  # four standard errors, not 3e-7
    assert not fig.axes[0].yaxis.get_offset_text().get_text()
