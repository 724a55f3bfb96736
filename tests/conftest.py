"""Shared fixtures: every test gets its own activation cache, runs folder and notes.md, and runs
the `tiny` preset (a random 2-layer TransformerLens model on synthetic tokens) unless it says
otherwise."""

import functools
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import experiment
import sources


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Activations are cached per test; the dequantised embedded model stays in the user cache."""
    monkeypatch.setenv("SAE_HARNESS_ACTIVATIONS", str(tmp_path / "activations"))
    return tmp_path / "activations"


@pytest.fixture(autouse=True)
def kernel_settings():
    """A run sets deterministic mode (every CPU run does) and TF32 for the whole process: each test
    gets them back as they were, so a CUDA test does not inherit a CPU run's deterministic mode."""
    deterministic, tf32 = torch.are_deterministic_algorithms_enabled(), torch.backends.cuda.matmul.allow_tf32
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture
def notes(tmp_path) -> Path:
    return tmp_path / "notes.md"


def tiny_run(plugin: str, out: Path, notes: Path, *, hyperparams=None, **overrides) -> dict:
    """Train and evaluate `plugin` on the tiny preset; returns final_info.json's content."""
    found = experiment.find_plugin(plugin)
    cfg = experiment.build_config("tiny", f"{found.study}/{found.name}", **overrides)
    cfg.hyperparams = hyperparams or {}
    experiment.execute(cfg, found, out, notes)
    return json.loads((out / "final_info.json").read_text())


@pytest.fixture
def run_tiny(tmp_path, notes):
    counter = iter(range(1000))

    def run(plugin: str, **kwargs) -> tuple[dict, Path]:
        out = tmp_path / "runs" / f"{plugin.replace('/', '_')}_{next(counter)}"
        return tiny_run(plugin, out, kwargs.pop("notes", notes), **kwargs), out
    return run


def cli(*args: str):
    """Invoke the CLI in-process; returns the result (exit_code, output)."""
    return CliRunner().invoke(experiment.app, list(args))


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture
def scratch_study():
    """A throwaway study folder inside plugins/ for deliberately broken plugin files."""
    folder = experiment.PLUGINS_DIR / "scratch_test_study"
    folder.mkdir()
    (folder / "__init__.py").write_text('TITLE = "Scratch"\nDESCRIPTION = "Broken plugins for tests."\n')
    yield folder
    shutil.rmtree(folder)
    for name in [m for m in sys.modules if m.startswith("plugins.scratch_test_study")]:
        del sys.modules[name]


@functools.cache
def tiny_model_activations(n_contexts: int) -> torch.Tensor:
    """Real activations of the tiny model at blocks.1.hook_resid_post on synthetic text, BOS
    dropped as in harvest: (n_contexts, 31, 64), in the model's own scale."""
    model = sources.load_model("tiny", torch.device("cpu"))
    contexts = sources.synthetic_contexts(n_contexts, 32, model.cfg.d_vocab)
    hook = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(contexts, names_filter=[hook])
    return cache[hook][:, 1:].float()


def assert_same_state(module, twin) -> None:
    """The same state-dict keys, and every tensor equal to the last bit."""
    twin_state = twin.state_dict()
    assert module.state_dict().keys() == twin_state.keys()
    for name, value in module.state_dict().items():
        assert torch.equal(value, twin_state[name]), name
