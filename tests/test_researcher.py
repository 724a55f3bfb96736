"""A researcher's own day: a new study from one file (`new`), runs loaded back for one's own
analysis (`load_run`, `runs_table`), and every command refusing malformed input in one line
before any work."""

import shutil
import subprocess
import sys

import pytest
import torch
import typer
from helpers import cli

import experiment
from runs import runs_table

STUDY = "researcher_test_study"


@pytest.fixture
def new_study():
    """A study folder with no __init__.py, as a researcher starts one; removed afterwards."""
    folder = experiment.PLUGINS_DIR / STUDY
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
    for name in [m for m in sys.modules if m.startswith(f"plugins.{STUDY}")]:
        del sys.modules[name]


@pytest.mark.e2e
def test_new_writes_a_plugin_that_trains_unchanged_in_a_study_of_one_file(tmp_path, new_study):
    written = cli("new", f"{STUDY}/run_1_first_try", "--parent", "run_0_topk")
    assert written.exit_code == 0, written.output
    assert sorted(p.name for p in new_study.iterdir()) == ["run_1_first_try.py"]
    plugin = experiment.find_plugin(f"{STUDY}/run_1_first_try")
    assert plugin.parent == "run_0_topk" and plugin.hyperparams_class().k == 64  # the parent's, unchanged
    assert "run_1_first_try" in cli("list").output
    notes, out = tmp_path / "notes.md", tmp_path / "run"
    trained = cli("run", "--plugin", "run_1_first_try", "--preset", "tiny", "--tokens", "2048", "--out", str(out),
                  "--notes", str(notes))
    assert trained.exit_code == 0, trained.output
    assert f"# Title: {STUDY}\n" in notes.read_text() and "## Run 1: First try" in notes.read_text()


def test_new_refuses_a_file_that_exists_a_taken_run_number_and_a_malformed_name(new_study):
    assert cli("new", f"{STUDY}/run_1_first_try").exit_code == 0
    before = (new_study / "run_1_first_try.py").read_text()
    for name, why in ((f"{STUDY}/run_1_first_try", "exists"), (f"{STUDY}/run_1_other", "already has run 1"),
                      ("NoStudy", "name it STUDY/run_N_slug")):
        refused = cli("new", name)
        assert refused.exit_code == 2 and why in refused.output and len(refused.output.strip().splitlines()) == 1
    assert (new_study / "run_1_first_try.py").read_text() == before


def test_a_new_study_takes_its_title_from_its_folder_and_its_description_from_its_first_run(new_study):
    assert cli("new", f"{STUDY}/run_2_second").exit_code == 0
    assert cli("new", f"{STUDY}/run_1_first").exit_code == 0
    header = experiment.find_plugin(f"{STUDY}/run_2_second").study_header
    assert header.startswith(f"# Title: {STUDY}\n# Experiment description: First\n")


def test_load_run_gives_back_the_sae_that_was_evaluated_and_runs_table_lists_the_run(run_tiny):
    info, folder = run_tiny("run_0_baseline", seed=3)
    run = experiment.load_run(folder)
    assert run.config.seed == 3 and run.plugin.name == "run_0_baseline" and run.info == info
    x = torch.randn(5, 7, run.sae.cfg.d_in)
    assert torch.equal(run.sae(x), run.sae.decode(run.sae.encode(x)))  # any leading shape, the model's scale
    table = runs_table(folder.parent)
    assert list(table["plugin"]) == ["run_0_baseline"] and table["L0"][0] == info["metrics"]["sparsity"]["l0"]


def numeric_options() -> list[tuple[str, str]]:
    """(command, --option) for every option of every command that takes a number."""
    group = typer.main.get_command(experiment.app)
    return [(name, param.opts[0]) for name, command in group.commands.items() for param in command.params
            if param.opts[0].startswith("--") and param.bare_type() in ("int", "float")]


REQUIRED = {"run": ["--plugin", "run_0_baseline"], "study": ["baseline"], "sweep": ["--plugin", "run_0_baseline"],
            "eval": ["RUN"], "dashboard": ["RUN"], "notes": ["--out", "NOTES"], "analyse": ["zscore_ortho"]}


@pytest.mark.parametrize("command, option", numeric_options(), ids="{0[0]} {0[1]}".format)
def test_every_number_a_command_takes_is_checked_in_one_line_before_any_work(tmp_path, command, option, monkeypatch):
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("work started"))
    args = [a.replace("RUN", str(tmp_path)).replace("NOTES", str(tmp_path / "n.md")) for a in REQUIRED.get(command, [])]
    refused = cli(command, *args, option, "many")
    assert refused.exit_code == 2 and refused.output.count("\n") == 1 and refused.output.startswith("error:")
    assert list(tmp_path.iterdir()) == []


MALFORMED = [
    ("run", "--plugin", "run_0_baseline", "--tokens", "-5"),
    ("run", "--plugin", "run_0_baseline", "--layer", "-1"),
    ("run", "--plugin", "run_0_baseline", "--dtype", "fp8"),
    ("run", "--plugin", "run_0_baseline", "--device", "tpu"),
    ("run", "--plugin", "run_0_baseline", "--evals", "nope"),
    ("run", "--plugin", "run_0_baseline", "--dataset", "missing.txt"),
    ("run", "--plugin", "run_0_baseline", "--notes", "TMP"),
    ("run", "--plugin", "run_0_baseline", "--set", "nope=1"),
    ("run", "--resume", "TMP/nothing"),
    ("study", "baseline", "--runs", "FILE"),
    ("study", "baseline", "--workers", "-1"),
    ("sweep", "--plugin", "run_0_baseline", "--grid", "lr=abc"),
    ("sweep", "--plugin", "run_0_baseline", "--grid", "dict_size=1.5"),
    ("sweep", "--plugin", "run_0_topk", "--grid", "k=x"),
    ("sweep", "--plugin", "run_0_baseline", "--grid", "lr=0.1", "--seeds", "0"),
    ("eval", "TMP"),
    ("dashboard", "TMP"),
    ("notes", "--out", "TMP/n.md", "--runs", "TMP/none"),
    ("compare", "--runs", "TMP/none"),
    ("analyse", "no_study"),
    ("new", "BadName"),
]


@pytest.mark.parametrize("args", MALFORMED, ids=" ".join)
def test_a_malformed_value_is_refused_in_one_line_with_nothing_written(tmp_path, args, monkeypatch):
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "file").write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    refused = cli(*(a.replace("TMP", str(tmp_path)).replace("FILE", str(tmp_path / "file")) for a in args),
                  *(["--preset", "tiny"] if args[0] in ("run", "study", "sweep") and "--resume" not in args else []))
    assert refused.exit_code == 2, refused.output
    assert refused.output.count("\n") == 1 and refused.output.startswith("error:"), refused.output
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.e2e
@pytest.mark.parametrize("script, args", [("bench.py", ["--steps", "many"]), ("plot.py", ["--runs"])])
def test_the_side_scripts_refuse_malformed_input_in_one_line(script, args):
    done = subprocess.run([sys.executable, str(experiment.ROOT / script), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error:"), done.stderr
