"""Shared fixtures: every test gets its own activation cache, runs folder and notes.md, and runs
the `tiny` preset (a random 2-layer TransformerLens model on synthetic tokens) unless it says
otherwise."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_run, word_level_tokenizer

import experiment


def pytest_collection_modifyitems(items):
    """A test that asks for run_tiny trains and evaluates a run: it is end to end (`e2e`), left out
    of the fast check `-m "not e2e"`. Other end-to-end tests carry the mark themselves."""
    for item in items:
        if "run_tiny" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """The activation cache of module- and session-scoped fixtures (set up before any test's own):
    the session's, never the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAE_HARNESS_ACTIVATIONS", str(tmp_path_factory.mktemp("activations")))
        yield


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


@pytest.fixture
def run_tiny(tmp_path, notes):
    counter = iter(range(1000))

    def run(plugin: str, **kwargs) -> tuple[dict, Path]:
        out = tmp_path / "runs" / f"{plugin.replace('/', '_')}_{next(counter)}"
        return tiny_run(plugin, out, kwargs.pop("notes", notes), **kwargs), out
    return run


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


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A word-level tokenizer for the tiny model (helpers.VOCAB), for the evaluations that need words."""
    return word_level_tokenizer(tmp_path_factory.mktemp("tokenizer"))
