"""What `experiment.py run` must do on the tiny preset: train, evaluate with sae_bench, write a
complete run folder and notebook entry, reuse cached activations, and refuse or stop loudly on
bad input, never leaving stale numbers behind."""

import dataclasses
import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import cli, read_log, tiny_model_with_tokenizer
from rich.progress import Progress

import experiment
import kernels
import studies
import sources
import evals
from common import HarnessError, RemainingOrDone, console
from runs import HEADLINE

NOTEBOOK_KEYS = {"training_steps", "final_loss", "layer", "dict_size", "learning_rate", "sparsity_penalty"}
CORE_GROUPS = {"model_behavior_preservation", "model_performance_preservation", "reconstruction_quality",
               "shrinkage", "sparsity"}


def finite_numbers(tree):
    if isinstance(tree, dict):
        return all(finite_numbers(v) for v in tree.values())
    return not isinstance(tree, float) or math.isfinite(tree)


def test_run_writes_complete_run_folder(run_tiny):
    info, run_dir = run_tiny("run_0_baseline")
    assert NOTEBOOK_KEYS <= info.keys()
    assert info["training_steps"] == 8192 // 256 and info["status"] == "completed"
    assert CORE_GROUPS <= info["metrics"].keys() and finite_numbers(info["metrics"])
    assert info["metrics"]["sparsity"]["l0"] > 0
    assert set(info["final_loss_terms"]) == {"l2_loss", "sparsity_loss", "total_loss"}
    prov = info["provenance"]
    assert prov["seed"] == 42 and len(prov["plugin_source_sha256"]) == 64
    assert prov["package_versions"]["sae-bench"] and prov["config"]["tokens"] == 8192
    assert prov["cpu"] == kernels.cpu_model() and prov["torch_threads"] >= 1  # what its last digits depend on
    for name in ("config.json", "train_log.jsonl", "sae_weights.safetensors", "cfg.json",
                 "plugin_state.safetensors", "feature_metrics.json"):
        assert (run_dir / name).exists(), name


def test_train_log_records_every_loss_term_l0_dead_fraction_and_lr(run_tiny):
    _, run_dir = run_tiny("run_0_baseline")
    log = read_log(run_dir)
    assert [r["step"] for r in log] == list(range(0, 32, 10)) + [31]
    for record in log:
        assert {"l2_loss", "sparsity_loss", "total_loss", "l0", "dead_fraction", "lr"} <= record.keys()
    assert log[0]["lr"] < log[-1]["lr"]  # linear warm-up
    assert log[-1]["total_loss"] < log[0]["total_loss"]


def test_saved_sae_loads_in_sae_lens_and_matches_the_evaluated_sae(run_tiny):
    from safetensors.torch import load_file
    from sae_lens import SAE

    _, run_dir = run_tiny("run_0_baseline")
    loaded = SAE.load_from_disk(str(run_dir))
    cfg = experiment.build_config("tiny", "baseline/run_0_baseline")
    state = load_file(run_dir / "plugin_state.safetensors")
    scale = state.pop("activation_scale").item()
    sae = experiment.SAE(64, 256, experiment.Hyperparams(), cfg)
    sae.load_state_dict(state)
    x = torch.randn(16, 64) * 3
    expected = evals.ScaledSAE(sae, scale)(x)
    torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)


def test_decoder_rows_start_nonzero_and_stay_unit_norm(run_tiny):
    from safetensors.torch import load_file

    cfg = experiment.build_config("tiny", "baseline/run_0_baseline")
    fresh = experiment.SAE(64, 256, experiment.Hyperparams(), cfg)
    assert fresh.W_enc.abs().sum() > 0 and fresh.W_dec.abs().sum() > 0
    _, run_dir = run_tiny("run_0_baseline")
    w_dec = load_file(run_dir / "plugin_state.safetensors")["W_dec"]
    assert w_dec.shape == (256, 64)  # one row per latent
    torch.testing.assert_close(w_dec.norm(dim=1), torch.ones(256), rtol=0, atol=1e-5)


def test_notes_get_study_header_once_then_one_entry_per_run(run_tiny, notes):
    run_tiny("run_0_baseline")
    run_tiny("run_0_baseline")
    text = notes.read_text()
    assert text.count("# Title: Baseline Sparse Autoencoder") == 1
    assert text.count("# Experiment description:") == 1
    assert text.count("## Run 0: Baseline") == 2
    entry = text.split("## Run 0:")[1]
    assert "Results:\n- training steps: 32\n- CE-loss score: " in entry and "Description: Baseline" in entry
    assert "{'" not in entry  # no dict dumps: final_info.json holds those
    assert "Study: baseline" in entry and "Run folder:" in entry


@pytest.mark.e2e
def test_a_notebook_entry_lists_each_headline_metric_with_its_change_against_the_parent(tmp_path, notes):
    runs = tmp_path / "runs"
    for plugin in ("run_0_baseline", "run_1_initial"):
        out = runs / "s" / plugin / "1"
        assert cli("run", "--preset", "tiny", "--plugin", plugin, "--tokens", "2048", "--out", str(out),
                   "--notes", str(notes)).exit_code == 0
    entry = notes.read_text().split("## Run 1:")[1]
    for label in HEADLINE:
        line = next(line for line in entry.splitlines() if line.startswith(f"- {label[0]}: "))
        assert line.endswith(" vs run_0_baseline)") and (" (+" in line or " (-" in line), line
    assert "- dead latents at the end of training (not fired in the last tenth of its tokens" in entry


def test_second_run_reuses_cached_activations_without_running_the_llm(run_tiny, monkeypatch):
    first, _ = run_tiny("run_0_baseline")
    assert first["activations_from_cache"] is False

    def no_harvest(*args, **kwargs):
        raise AssertionError("the LLM was run again for training data")
    monkeypatch.setattr(experiment, "harvest", no_harvest)
    second, _ = run_tiny("run_0_baseline", lr=2e-3)
    assert second["activations_from_cache"] is True


def test_a_cache_the_disk_cannot_hold_is_refused_before_it_is_filled(tmp_path, monkeypatch):
    rows, width = 5_000_000, 640  # 12.8 GB of float32
    monkeypatch.setattr(sources.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**10))

    def fill(out):
        raise AssertionError("the harvest started")

    with pytest.raises(HarnessError, match=r"the cache of activations needs 12.8 GB in .*, which has 10.0 GB free"):
        sources.cached_activations(tmp_path / "cache", (rows, width), "float32", fill, "activations")
    assert not (tmp_path / "cache" / "train_acts.partial.npy").exists()


def test_a_smaller_budget_reads_the_first_rows_of_a_larger_cache_the_bytes_its_own_harvest_gives(tmp_path,
                                                                                                  monkeypatch):
    docs = tmp_path / "docs.txt"
    rng = random.Random(0)
    docs.write_text("\n\n".join(" ".join(f"word{rng.randrange(300)}" for _ in range(60)) for _ in range(200)))
    model = tiny_model_with_tokenizer()

    def data(tokens, cache, harvesting=True):
        monkeypatch.setenv("SAE_HARNESS_ACTIVATIONS", str(tmp_path / cache))
        cfg = experiment.build_config("tiny", "baseline/run_0_baseline", dataset=str(docs), tokens=tokens)
        with Progress(console=console) as progress:
            return experiment.activation_data(cfg, model if harvesting else None, progress)

    data(4096, "shared")
    smaller = data(1500, "shared", harvesting=False)  # no model: a harvest would fail
    fresh = data(1500, "alone")
    assert smaller.from_cache and not fresh.from_cache
    assert np.asarray(smaller.train).tobytes() == np.asarray(fresh.train).tobytes()
    assert smaller.scale == fresh.scale and torch.equal(smaller.eval_tokens, fresh.eval_tokens)
    assert smaller.prefix_of.parent == tmp_path / "shared" and fresh.prefix_of is None
    (larger,) = (tmp_path / "shared").glob("*/train_acts.npy")
    larger.write_bytes(larger.read_bytes()[:-8])  # damaged: not read, the smaller run harvests its own
    assert not data(1500, "shared").from_cache
    zipf = experiment.build_config("tiny", "baseline/run_0_baseline", tokens=4096)  # the tiny model's own text
    monkeypatch.setenv("SAE_HARNESS_ACTIVATIONS", str(tmp_path / "zipf"))
    with Progress(console=console) as progress:
        experiment.activation_data(zipf, model, progress)
        smaller = experiment.activation_data(dataclasses.replace(zipf, tokens=1500), model, progress)
    assert not smaller.from_cache  # harvested: its held-out contexts come after its training ones


def test_same_seed_and_config_give_identical_weights_and_metrics(run_tiny):
    a, dir_a = run_tiny("run_0_baseline")
    b, dir_b = run_tiny("run_0_baseline")
    assert a["metrics"] == b["metrics"] and a["final_loss"] == b["final_loss"]
    assert (dir_a / "sae_weights.safetensors").read_bytes() == (dir_b / "sae_weights.safetensors").read_bytes()
    c, _ = run_tiny("run_0_baseline", seed=7)
    assert c["final_loss"] != a["final_loss"]


def test_a_cpu_run_adds_up_gathered_rows_gradients_in_the_same_order_every_time():
    """An indexing's backward (index_put_ with accumulate) adds rows in thread order unless
    deterministic kernels are on: zscore_ortho's gathered decoder rows gave other bytes per process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the race needs two threads
    try:
        kernels.configure_kernels(experiment.build_config("tiny", "run_0_baseline"), torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
        rows = torch.randn(256, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        picked = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
        weights = torch.rand(4096, generator=torch.Generator().manual_seed(2))
        gradients = set()
        for _ in range(20):
            (gradient,) = torch.autograd.grad(rows[picked].pow(2).sum(-1).mul(weights).sum(), rows)
            gradients.add(gradient.numpy().tobytes())
        assert len(gradients) == 1
    finally:
        torch.set_num_threads(threads)


def test_non_finite_loss_stops_training_and_marks_run_failed(run_tiny, notes, monkeypatch):
    original = experiment.SAE.loss

    def exploding(self, x, step):
        out = original(self, x, step)
        if step == 3:
            out.terms["sparsity_loss"] = out.terms["sparsity_loss"] * float("nan")
        return out
    monkeypatch.setattr(experiment.SAE, "loss", exploding)
    with pytest.raises(experiment.HarnessError, match="sparsity_loss became nan at step 3"):
        run_tiny("run_0_baseline")
    failed = next((notes.parent / "runs").iterdir())
    info = json.loads((failed / "final_info.json").read_text())
    assert info["status"] == "failed" and "metrics" not in info
    assert not notes.exists()


def test_reading_losses_a_step_late_logs_the_same_and_still_stops_at_the_non_finite_step(run_tiny, notes,
                                                                                         monkeypatch):
    """On CUDA the host reads each step's losses one step late (no sync in the step); on CPU at
    once. Same log either way, and a NaN is still reported at its own step, never checkpointed."""
    prompt, prompt_dir = run_tiny("run_0_baseline")
    monkeypatch.setitem(experiment.REPORT_LAG, "cpu", 1)
    lagged, lagged_dir = run_tiny("run_0_baseline")
    assert read_log(lagged_dir) == read_log(prompt_dir)
    assert lagged["final_loss_terms"] == prompt["final_loss_terms"]

    original = experiment.SAE.loss

    def exploding(self, x, step):
        out = original(self, x, step)
        if step == 19:  # the last step before the checkpoint after step 19
            out.terms["l2_loss"] = out.terms["l2_loss"] * float("inf")
        return out
    monkeypatch.setattr(experiment.SAE, "loss", exploding)
    with pytest.raises(experiment.HarnessError, match="l2_loss became inf at step 19"):
        run_tiny("run_0_baseline", checkpoint_every=20)
    failed = sorted((notes.parent / "runs").iterdir())[-1]
    assert not (failed / experiment.CHECKPOINT).exists()
    assert read_log(failed)[-1]["step"] == 10


def test_compiled_loss_trains_to_the_eager_losses(run_tiny):
    from torch._dynamo.utils import counters

    eager, _ = run_tiny("run_0_baseline")
    counters.clear()
    compiled, compiled_dir = run_tiny("run_0_baseline", compile=True)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did compile the loss
    assert json.loads((compiled_dir / "config.json").read_text())["compile"] is True
    for name, value in eager["final_loss_terms"].items():
        assert compiled["final_loss_terms"][name] == pytest.approx(value, rel=1e-3)


# ---- bad input: one line naming the problem, exit code 2, nothing written --------------------

@pytest.mark.parametrize("args, message", [
    (["--plugin", "run_0_basline"], "unknown plugin 'run_0_basline'; did you mean run_0_baseline"),
    (["--plugin", "run_0_baseline", "--tokens", "100"], "gives zero training steps"),
    (["--plugin", "run_0_baseline", "--lr", "0"], "--lr must be positive"),
    (["--plugin", "run_0_baseline", "--dict-size", "-4"], "--dict-size must be positive"),
    (["--plugin", "run_0_baseline", "--preset", "huge"], "unknown preset 'huge'"),
    (["--plugin", "run_0_baseline", "--evals", "core,vibes"], "unknown eval vibes"),
    (["--plugin", "run_0_baseline", "--device", "tpu"], "unknown device 'tpu'"),
    (["--plugin", "run_1_initial", "--set", "nope=1"], "has no hyperparameter 'nope'"),
    (["--plugin", "run_1_initial", "--set", "tau=high"], "--set tau=high: expected float"),
    (["--plugin", "run_0_baseline", "--layer", "5"], "--layer 5 is outside tiny"),
])
def test_bad_input_is_refused_with_a_clear_error(tmp_path, args, message):
    notes, out = tmp_path / "notes.md", tmp_path / "run"
    notes.write_text("earlier entry\n")
    result = cli("run", "--preset", "tiny", "--out", str(out), "--notes", str(notes), *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert notes.read_text() == "earlier entry\n"


def test_cuda_without_cuda_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = cli("run", "--preset", "tiny", "--plugin", "run_0_baseline", "--device", "cuda",
                 "--out", str(tmp_path / "r"), "--notes", str(tmp_path / "n.md"))
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_list_shows_every_plugin_with_title_parent_and_hyperparameters():
    result = cli("list")
    assert result.exit_code == 0
    for key in experiment.plugin_files():
        assert key.split("/")[1] in result.output
    assert "run_6_layer_norm" in result.output and "strength_init=0.0" in result.output


# ---- hub models and datasets: the same code path, with the loaders injected -----------------

@pytest.mark.e2e
def test_hub_model_and_dataset_path_with_injected_loaders(tmp_path, notes):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    class CharTokenizer:
        bos_token_id, eos_token_id, pad_token_id, padding_side = 0, 1, 2, "right"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (ord(c) % 500) for c in text]}

    def hub_model(name, device, dtype):
        assert name == "EleutherAI/pythia-70m-deduped"
        model = HookedTransformer(HookedTransformerConfig(**sources.TINY_MODEL, seed=0, dtype=dtype))
        model.tokenizer = CharTokenizer()
        return model

    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog " * 3 for i in range(400)]

    def hub_dataset(name):
        assert name in ("monology/pile-uncopyrighted", "Skylion007/openwebtext")
        return ({"text": t} for t in texts)

    plugin = experiment.find_plugin("run_0_baseline")
    cfg = experiment.build_config("pythia-70m", "baseline/run_0_baseline", layer=1, dict_size=128,
                                  tokens=4096, batch_size=512, context_size=32, warmup_steps=2,
                                  eval_reconstruction_batches=1, eval_sparsity_batches=1,
                                  eval_batch_prompts=4, cache_dtype="float32")
    info = experiment.execute(cfg, plugin, tmp_path / "hub_run", notes,
                              model_loader=hub_model, dataset_loader=hub_dataset)
    assert info["training_steps"] == 8 and finite_numbers(info["metrics"])


def test_missing_hub_model_or_dataset_names_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    with pytest.raises(experiment.HarnessError, match="not available offline.*--preset embedded"):
        sources.load_model("google/gemma-2-2b", torch.device("cpu"), model_loader=offline)
    with pytest.raises(experiment.HarnessError, match="dataset 'monology/pile-uncopyrighted' is not available offline"):
        list(sources.hub_documents("monology/pile-uncopyrighted", dataset_loader=offline))


def test_local_dataset_files_are_read(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert sources.local_documents(tmp_path / "a.txt") == ["first doc", "second doc"]
    assert sources.local_documents(tmp_path / "b.jsonl") == ["one", "two"]
    with pytest.raises(experiment.HarnessError, match="does not exist"):
        sources.local_documents(tmp_path / "missing.txt")


def test_harvest_drops_every_bos_position(tmp_path):
    from rich.progress import Progress

    cfg = experiment.build_config("tiny", "baseline/run_0_baseline", tokens=100, batch_size=50)
    model = sources.load_model("tiny", torch.device("cpu"))
    contexts = sources.synthetic_contexts(8, 32, model.cfg.d_vocab)
    contexts[:, 10] = sources.TINY_BOS  # a document separator inside every context
    out = torch.zeros(100, 64).numpy()
    with Progress(disable=True) as progress:
        experiment.harvest(model, contexts, cfg, out, progress)
    _, cache = model.run_with_cache(contexts[:4], names_filter=[cfg.hook_name], stop_at_layer=2)
    expected = cache[cfg.hook_name][contexts[:4] != sources.TINY_BOS][:100]
    torch.testing.assert_close(torch.from_numpy(out), expected)


def test_eval_of_a_run_folder_reproduces_its_core_metrics_and_notes_it(run_tiny, notes):
    info, run_dir = run_tiny("run_1_initial")
    models = {}  # kept for the next re-scoring in this process
    rescored = studies.rescore(run_dir, "core", "cpu", notes, loaded_models=models)
    assert rescored["metrics"] == info["metrics"] and list(models) == [("tiny", "cpu")]
    assert json.loads((run_dir / "final_info.json").read_text())["metrics"] == info["metrics"]
    assert f"Re-scored run 1 (zscore_ortho/run_1_initial, {run_dir}) with core; its results now:\n" in notes.read_text()
    assert "{'" not in notes.read_text()  # the results as lines a person reads, no dict
    with pytest.raises(experiment.HarnessError, match="not a run folder"):
        studies.rescore(run_dir.parent, "core", "cpu", notes)
    noted, saved = notes.read_text(), (run_dir / "final_info.json").read_text()
    read = []  # what another process evaluated while this one waited is kept, not evaluated again
    kept = studies.rescore(run_dir, "core", "cpu", notes, wait=True, unless=lambda found: read.append(found) or True)
    assert kept == read[0] == json.loads(saved) and notes.read_text() == noted


def test_a_missing_eval_requirement_is_refused_before_training(tmp_path, notes, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    plugin = experiment.find_plugin("run_0_baseline")
    cfg = experiment.build_config("embedded", "baseline/run_0_baseline", evals=("core", "autointerp"))
    monkeypatch.setattr(experiment, "load_model", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(experiment.HarnessError, match="OPENAI_API_KEY"):
        experiment.execute(cfg, plugin, tmp_path / "run", notes)
    assert not (tmp_path / "run").exists()


def test_a_progress_bar_shows_its_eta_while_running_and_done_once_finished():
    with Progress(disable=True) as progress:
        running, finished = progress.add_task("train", total=2), progress.add_task("eval", total=1)
        progress.advance(running)
        progress.advance(finished)
        shown = {task.id: RemainingOrDone().render(task).plain for task in progress.tasks}
    assert shown[running].startswith("ETA ") and shown[finished] == "done"
