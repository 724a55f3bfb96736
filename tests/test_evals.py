"""evals.py: --evals parsing, refusal of every missing requirement before any work, and each
sae_bench eval run end to end through the harness's wiring on the tiny model, with sae_bench's
dataset loader and OpenAI client replaced by small local fixtures (so a change in sae_bench's
interface breaks a test here, not a researcher's run). The tiny model has no tokenizer of its
own; these tests give it a small word-level one."""

import contextlib
import copy
import importlib.util
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import LETTERS, fake_load_dataset, text

import evals
import experiment
import runs
import sources
from common import activations_dir, file_sha256

@pytest.fixture
def model(tokenizer):
    model = sources.load_model("tiny", torch.device("cpu"))
    model.set_tokenizer(tokenizer)
    return model


@pytest.fixture
def cfg():
    return experiment.build_config("tiny", "baseline/run_0_baseline")


@pytest.fixture
def sae(cfg):
    torch.manual_seed(0)
    inner = experiment.SAE(sources.TINY_MODEL["d_model"], cfg.dict_size, experiment.Hyperparams(), cfg)
    return evals.ScaledSAE(inner.eval(), 1.0)


@pytest.fixture
def eval_tokens(tokenizer, cfg):
    """Held-out contexts as the harness makes them: BOS, then cfg.context_size - 1 tokens."""
    return sources.tokenize_contexts([text(random.Random(0), 16 * cfg.context_size)], tokenizer,
                                        sources.TINY_BOS, cfg.context_size, 16)


class FakeOpenAI:
    """openai.OpenAI as sae_bench's autointerp uses it; explains every latent alike and predicts
    that examples 1 and 2 activate."""

    requests: list = []

    def __init__(self, api_key):
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, model, messages, n, max_tokens, stream):
        FakeOpenAI.requests.append(messages)
        scoring = messages[-1]["content"].startswith("Here is the explanation")
        content = "1, 2" if scoring else "This neuron activates on words starting with b."
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=content))])


LOADERS = {"load_dataset": fake_load_dataset, "openai_client": FakeOpenAI}


def metric_values(result: dict) -> list:
    return [v for group in result["eval_result_metrics"].values() for v in group.values()]


# ----------------------------------------------------------------------------------------------
# Parsing and requirements.

def test_parse_evals_expands_all_and_refuses_unknown_names_listing_the_valid_ones():
    assert evals.parse_evals("all") == evals.EVAL_NAMES
    assert evals.parse_evals(" core, absorption,core ") == ("core", "absorption")
    with pytest.raises(experiment.HarnessError, match="unknown eval probing;.*sae_probes.*autointerp"):
        evals.parse_evals("core,probing")


@pytest.fixture
def offline(monkeypatch):
    """No hub, no API key, no WMDP corpus: the requirements a researcher may lack."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv(evals.FORGET_CORPUS_VAR, raising=False)


@pytest.mark.parametrize("name, preset, model, expected", [
    ("sparse_probing", "pythia-70m", None, "sparse_probing needs the Hugging Face hub datasets .*HF_HUB_OFFLINE"),
    ("scr", "pythia-70m", None, "scr needs .* datasets LabHC/bias_in_bios, canrager/amazon_reviews_mcauley_1and5"),
    ("tpp", "gemma-2-2b", None, "tpp needs the Hugging Face hub datasets"),
    ("unlearning", "gemma-2-2b", None, "instruction-tuned model .*not google/gemma-2-2b.*--model google/gemma-2-2b-it"),
    ("unlearning", "gemma-2-2b", "google/gemma-2-2b-it", "WMDP bio forget corpus.*WMDP_BIO_FORGET_CORPUS="),
    ("autointerp", "embedded", None, "autointerp needs an OpenAI API key.*set OPENAI_API_KEY"),
    ("absorption", "tiny", None, "the tiny model has no tokenizer"),
])
def test_each_missing_requirement_is_refused_in_one_line_naming_the_fix(offline, name, preset, model, expected):
    cfg = experiment.build_config(preset, "baseline/run_0_baseline", model=model)
    with pytest.raises(experiment.HarnessError, match=expected) as refused:
        evals.check_requirements((name,), cfg)
    assert "\n" not in str(refused.value)


def test_sae_probes_without_its_package_is_refused(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "sae_probes" else find_spec(name))
    with pytest.raises(experiment.HarnessError, match="sae_probes needs the package sae-probes: pip install"):
        evals.check_requirements(("core", "sae_probes"), experiment.build_config("embedded", "baseline/run_0_baseline"))


def test_every_missing_requirement_is_named_in_the_same_line(offline):
    cfg = experiment.build_config("embedded", "baseline/run_0_baseline")
    with pytest.raises(experiment.HarnessError, match="autointerp needs .*; tpp needs the Hugging Face hub") as refused:
        evals.check_requirements(("core", "tpp", "autointerp"), cfg)
    assert "\n" not in str(refused.value)


def test_unlearning_with_model_and_corpus_is_still_refused_without_the_hub(offline, monkeypatch, tmp_path):
    (tmp_path / "bio-forget-corpus.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.setenv(evals.FORGET_CORPUS_VAR, str(tmp_path / "bio-forget-corpus.jsonl"))
    cfg = experiment.build_config("gemma-2-2b", "baseline/run_0_baseline", model="google/gemma-2-2b-it")
    with pytest.raises(experiment.HarnessError, match="^unlearning needs .* hub datasets wikitext, cais/wmdp, cais/mmlu"):
        evals.check_requirements(("unlearning",), cfg)


def test_offline_evals_need_nothing_and_loaders_stand_in_for_the_hub_and_key(offline, monkeypatch, tmp_path):
    embedded = experiment.build_config("embedded", "baseline/run_0_baseline")
    evals.check_requirements(("core", "sae_probes", "absorption"), embedded)
    (tmp_path / "corpus.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.setenv(evals.FORGET_CORPUS_VAR, str(tmp_path / "corpus.jsonl"))
    cfg = experiment.build_config("gemma-2-2b", "baseline/run_0_baseline", model="google/gemma-2-2b-it")
    evals.check_requirements(evals.EVAL_NAMES, cfg, loaders=LOADERS)


# ----------------------------------------------------------------------------------------------
# Each eval end to end on the tiny model.

def run(names, sae, model, cfg, eval_tokens):
    return evals.run_evals(names, sae, model, cfg, eval_tokens, torch.device("cpu"), cache_dir=activations_dir(),
                           loaders=LOADERS)


@pytest.mark.e2e
def test_sparse_probing_reads_every_dataset_and_reports_in_sae_bench_format(sae, model, cfg, eval_tokens):
    result = run(("core", "sparse_probing"), sae, model, cfg, eval_tokens)["sparse_probing"]
    assert result["eval_type_id"] == "sparse_probing"
    assert result["eval_config"]["probe_train_set_size"] == 40 and result["eval_config"]["model_name"] == "custom"
    assert result["budget_overrides"] == evals.BUDGETS["tiny"]["sparse_probing"]
    assert {d["dataset_name"] for d in result["eval_result_details"]} == {
        f"{name}_results" for name in result["eval_config"]["dataset_names"]}
    assert all(0 <= v <= 1 for v in metric_values(result) if v is not None)
    assert result["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] is not None
    json.dumps(result)  # final_info.json takes it as it is


@pytest.mark.e2e
@pytest.mark.parametrize("name, metric", [("scr", "scr_metrics"), ("tpp", "tpp_metrics")])
def test_scr_and_tpp_report_their_metrics(sae, model, cfg, eval_tokens, name, metric):
    result = run((name,), sae, model, cfg, eval_tokens)[name]
    assert result["eval_config"]["perform_scr"] == (name == "scr") and result["eval_config"]["train_set_size"] == 40
    assert result["eval_result_metrics"][metric] and result["eval_result_details"]


@pytest.mark.e2e
def test_unlearning_reads_the_forget_corpus_from_the_env_path(sae, model, cfg, eval_tokens, monkeypatch, tmp_path):
    from sae_bench.evals.unlearning.utils import metrics

    rng = random.Random(1)
    corpus = tmp_path / "bio-forget-corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text(rng, 40)}) + "\n" for _ in range(20)))
    monkeypatch.setenv(evals.FORGET_CORPUS_VAR, str(corpus))
    # sae_bench formats questions for Gemma 2 instruct models only, and keeps the questions the
    # model answers right under all 24 orderings of the choices; a random model knows none.
    monkeypatch.setattr(model.cfg, "model_name", "gemma-2-2b-it")
    monkeypatch.setattr(metrics, "_find_all_permutation_correct_ans",
                        lambda found: np.arange(len(found["is_correct"]) // 24))
    result = run(("unlearning",), sae, model, cfg, eval_tokens)["unlearning"]
    assert 0 <= result["eval_result_metrics"]["unlearning"]["unlearning_score"] <= 1
    # each intervention's accuracies are kept; the score is sae_bench's reduction of them
    (row,) = result["eval_result_unstructured"]["interventions"]  # tiny: 1 threshold × 1 size × 1 multiplier
    assert (row["retain_thres"], row["multiplier"]) == (0.01, 25) and row["n_features"] <= 2  # of those qualifying
    forgot = row["wmdp-bio"] if row["all_side_effects_mcq"] >= 0.99 else 1
    assert result["eval_result_metrics"]["unlearning"]["unlearning_score"] == pytest.approx(1 - forgot)
    assert result["eval_config"]["dataset_names"] == ["wmdp-bio", "high_school_us_history"]


@pytest.mark.e2e
def test_autointerp_explains_and_scores_latents_through_the_api_client(sae, model, cfg, eval_tokens):
    FakeOpenAI.requests.clear()
    result = run(("autointerp",), sae, model, cfg, eval_tokens)["autointerp"]
    assert 0 <= result["eval_result_metrics"]["autointerp"]["autointerp_score"] <= 1
    assert result["eval_config"]["total_tokens"] == eval_tokens.numel() and result["eval_config"]["n_latents"] == 4
    assert len(FakeOpenAI.requests) == 2 * len(result["eval_result_unstructured"]) > 0  # explain, then score


@pytest.mark.e2e
def test_absorption_on_a_model_that_cannot_spell_records_why_and_claims_no_score(sae, model, cfg, eval_tokens,
                                                                                 isolated_cache):
    result = run(("absorption",), sae, model, cfg, eval_tokens)["absorption_first_letter"]
    assert result["eval_result_metrics"] == {} and "sae_bench needs 20 to measure absorption" in result["not_scored"]
    assert set(result["eval_result_unstructured"]["first_letter_probe_f1"]) == set(LETTERS)
    # the first-letter probe reads the model alone: trained once, kept, read back by the next run
    (probe,) = (isolated_cache / "absorption_probes").rglob("probe.pth")
    trained_at = probe.stat().st_mtime_ns
    assert run(("absorption",), sae, model, cfg, eval_tokens)["absorption_first_letter"] == result
    assert probe.stat().st_mtime_ns == trained_at


@pytest.mark.e2e
def test_absorption_scores_where_enough_letters_are_readable(sae, model, cfg, eval_tokens, isolated_cache,
                                                               monkeypatch):
    """The tiny model spells nothing, so sae_bench's bar is lowered to every letter: the path a model
    that spells takes (Gemma 3 270M on the embedded preset) runs end to end."""
    monkeypatch.setitem(evals.BUDGETS["tiny"], "absorption",
                        {**evals.BUDGETS["tiny"]["absorption"], "min_GT_probe_f1": -1.0, "min_feats_for_eval": 1})
    result = run(("absorption",), sae, model, cfg, eval_tokens)["absorption_first_letter"]
    assert "not_scored" not in result
    mean = result["eval_result_metrics"]["mean"]
    assert 0 <= mean["mean_absorption_fraction_score"] <= 1 and 0 <= mean["mean_full_absorption_score"] <= 1
    assert {d["first_letter"] for d in result["eval_result_details"]} <= set(LETTERS)


def test_absorption_reads_an_sae_with_unit_decoder_rows_and_the_same_reconstruction(sae, eval_tokens, model, cfg):
    x = model.run_with_cache(eval_tokens[:2], names_filter=cfg.hook_name)[1][cfg.hook_name]
    sae = evals.ScaledSAE(sae.inner, 0.05)  # activations scaled by 0.05 in training
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((sae.cfg.d_sae,), 20.0))  # rows carry 1/scale
    before = sae.encode(x) @ sae.W_dec
    folded = evals.unit_decoder_rows(copy.deepcopy(sae))
    torch.testing.assert_close(folded.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae))
    torch.testing.assert_close(folded.encode(x) @ folded.W_dec, before, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(folded.decode(folded.encode(x)), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-4)


@pytest.mark.e2e
def test_sae_probes_runs_on_its_shipped_text_and_leaves_sae_and_tokenizer_alone(sae, model, cfg, eval_tokens,
                                                                                 isolated_cache):
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    sides = model.tokenizer.padding_side, model.tokenizer.truncation_side
    result = run(("sae_probes",), sae, model, cfg, eval_tokens)["sparse_probing_sae_probes"]
    datasets_probed = [d["dataset_name"] for d in result["eval_result_details"]]
    assert datasets_probed == evals.BUDGETS["tiny"]["sae_probes"]["dataset_names"]
    assert 0 <= result["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] <= 1
    assert result["eval_result_metrics"]["llm"]["llm_test_accuracy"] is not None
    assert list((isolated_cache / "sae_probes").rglob("*.pt"))  # the model's activations, kept for the next run
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())
    assert (model.tokenizer.padding_side, model.tokenizer.truncation_side) == sides  # sae_probes changes them


def test_a_failing_eval_raises_and_unknown_loaders_are_refused(sae, model, cfg, eval_tokens):
    def hub_down(*args, **kwargs):
        raise ConnectionError("hub down")

    with pytest.raises(ConnectionError, match="hub down"):
        evals.run_evals(("tpp",), sae, model, cfg, eval_tokens, torch.device("cpu"), cache_dir=activations_dir(),
                           loaders={"load_dataset": hub_down})
    with pytest.raises(ValueError, match="unknown loaders"):
        evals.run_evals(("tpp",), sae, model, cfg, eval_tokens, torch.device("cpu"), cache_dir=activations_dir(),
                           loaders={"datasets": hub_down})


def test_the_verdict_budget_evaluates_as_embedded_does_it_only_trains_longer():
    for name in evals.EVAL_NAMES:  # else absorption probes Gemma's whole vocabulary, sae_probes every dataset
        assert evals._budget_overrides(name, "embedded-4m") == evals._budget_overrides(name, "embedded")
    cfg = experiment.build_config("embedded-4m", "baseline/run_0_baseline")
    assert evals._config("sae_probes", cfg).dataset_names == evals.BUDGETS["embedded"]["sae_probes"]["dataset_names"]


def test_the_sae_bench_evals_draw_their_instrument_with_one_seed_whatever_seed_trained_the_sae(tmp_path, monkeypatch):
    """Probes, word samples and dataset draws measure the SAE: a seed-43 SAE is measured with the
    instrument a seed-42 SAE is, so the seed-to-seed spread is the SAEs' alone."""
    cfg = experiment.build_config("embedded", "baseline/run_0_baseline", seed=43)
    assert {evals._config(name, cfg).random_seed for name in ("absorption", "sae_probes", "sparse_probing")} == {42}
    seeds = []
    monkeypatch.setattr(evals, "_capped_vocabulary", lambda get, limit, seed: seeds.append(("words", seed)))
    evals._absorption_vocabulary(SimpleNamespace(run_with_cache=print), cfg)

    @contextlib.contextmanager
    def sandbox(model, seed):
        seeds.append(("sandbox", seed))
        yield tmp_path
    monkeypatch.setattr(evals, "_sandbox", sandbox)
    monkeypatch.setitem(evals.RUNNERS, "sparse_probing", lambda *args: {"eval_type_id": "sparse_probing"})
    evals.run_evals(("sparse_probing",), torch.nn.Linear(1, 1), None, cfg, None, "cpu", cache_dir=tmp_path)
    assert seeds == [("words", 42), ("sandbox", 42)] and evals.EVAL_SEED == 42  # sae_bench's default
    assert runs.same_instrument({"eval_config": {"random_seed": 42}})  # a stored result read with it
    assert not runs.same_instrument({"eval_config": {"random_seed": 43}}) and not runs.same_instrument(None)


def test_capped_absorption_vocabulary_is_letter_balanced_and_independent_of_vocabulary_order():
    """The embedded preset probes a capped vocabulary: every first letter keeps training words
    (sae_bench's k-sparse probing crashes on a letter without any), and the same words come out
    whatever order the tokenizer lists its vocabulary in (it differs between processes)."""
    rng = random.Random(0)
    vocabulary = [" " + c + "".join(rng.choices(LETTERS, k=4)) for c in LETTERS for _ in range(200)]
    vocabulary += [" x" + s for s in ("ray", "enon")]  # a rare letter
    shuffled = rng.sample(vocabulary, len(vocabulary))
    cap = evals._capped_vocabulary(lambda tokenizer: vocabulary, 520, seed=3)(None)
    assert evals._capped_vocabulary(lambda tokenizer: shuffled, 520, seed=3)(None) == cap
    assert len(cap) <= 520 and {w.strip()[0] for w in cap} == set(LETTERS)
    assert sum(w.startswith(" x") for w in cap) == 20  # 520 // 26 each, where the letter has that many


@pytest.mark.e2e
def test_core_adds_the_whole_set_explained_variance_the_eval_dead_fraction_and_bootstrap_errors(
        sae, model, cfg, eval_tokens):
    sae.inner.b_enc.data[:50] = -1e3  # these latents never fire
    metrics, features = evals.evaluate_core(sae, model, eval_tokens, cfg, torch.device("cpu"))
    hook = cfg.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache(eval_tokens, names_filter=hook)
        x = cache[hook][:, 1:].reshape(-1, cache[hook].shape[-1]).double()  # BOS is special: left out
        x_hat = sae(x.float()).double()
    whole = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert metrics["reconstruction_quality"]["explained_variance_whole_set"] == pytest.approx(whole.item(), rel=1e-9)
    never = np.mean(np.asarray(features["feature_density"]) == 0)
    assert never >= 50 / cfg.dict_size and metrics["sparsity"]["dead_fraction_eval"] == never
    se = metrics["bootstrap_se"]
    assert se["contexts"] == len(eval_tokens)
    assert all(0 < se[k] < 1 for k in ("explained_variance_whole_set", "ce_loss_score", "kl_div_score"))


@pytest.mark.e2e
def test_the_bootstrap_s_per_context_rows_give_back_sae_bench_s_own_scores(sae, model, cfg, eval_tokens,
                                                                          monkeypatch):
    recorded = {}
    real = evals.bootstrap_standard_errors
    monkeypatch.setattr(evals, "bootstrap_standard_errors",
                        lambda variance, losses: recorded.update(losses) or real(variance, losses))
    metrics, _ = evals.evaluate_core(sae, model, eval_tokens, cfg, torch.device("cpu"))
    for name, section in (("ce_loss_score", "model_performance_preservation"),
                          ("kl_div_score", "model_behavior_preservation")):
        rows = np.stack([torch.cat(recorded[part]).numpy() for part in evals.SCORE_PARTS[name]], 1)
        assert len(rows) == cfg.eval_batch_prompts * cfg.eval_reconstruction_batches
        assert evals._score(rows, name) == pytest.approx(metrics[section][name], rel=1e-5)  # its sums are fp32


def test_sae_bench_reads_the_weights_in_the_model_s_scale_as_exported(cfg):
    torch.manual_seed(0)
    inner = experiment.SAE(sources.TINY_MODEL["d_model"], cfg.dict_size, experiment.Hyperparams(), cfg).eval()
    scaled = evals.ScaledSAE(inner, 8.0)
    x = torch.randn(5, sources.TINY_MODEL["d_model"])
    torch.testing.assert_close(scaled.encode(x), torch.relu(x @ scaled.W_enc + scaled.b_enc - scaled.b_dec @ scaled.W_enc))
    torch.testing.assert_close(scaled.W_enc.norm(dim=0), inner.W_enc.norm(dim=0) * 8.0)  # feature_metrics' encoder_norm


# ----------------------------------------------------------------------------------------------
# The cached core path: sae_bench's metrics from the cached clean and zero-ablated passes.

def metric_leaves(metrics: dict, prefix: str = "") -> dict:
    found = {}
    for key, value in metrics.items():
        found.update(metric_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return found


@pytest.fixture
def nearly_exact_sae(sae):
    """Latents ±x_i: an exact reconstruction, then its decoder nudged, so that the KL with the SAE
    is small (about 1e-3) and float rounding weighs most in it."""
    d = sources.TINY_MODEL["d_model"]
    inner = sae.inner
    with torch.no_grad():
        for weights in (inner.W_enc, inner.W_dec, inner.b_enc, inner.b_dec):
            weights.zero_()
        eye = torch.eye(d)
        inner.W_enc[:, :d], inner.W_enc[:, d:2 * d] = eye, -eye
        inner.W_dec[:d], inner.W_dec[d:2 * d] = eye, -eye
        inner.W_dec.add_(0.02 * torch.randn(inner.W_dec.shape, generator=torch.Generator().manual_seed(1)))
    return sae


def passes_run(model, monkeypatch) -> list:
    """Records each model forward as (start_at_layer, stop_at_layer)."""
    calls, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append((k.get("start_at_layer"),
                                                                          k.get("stop_at_layer"))) or forward(*a, **k))
    return calls


@pytest.mark.parametrize("which", ["sae", "nearly_exact_sae"])
def test_the_cached_core_path_gives_sae_bench_s_metrics_from_the_spliced_pass_and_the_activations_alone(
        which, request, model, cfg, eval_tokens, tmp_path, monkeypatch):
    """Every metric as sae_bench's own passes give it (to 1e-6 relative; the CE ones to the bit);
    the bootstrap errors to 1e-5: an error is the spread of resampled scores, ~100 times smaller than
    them, so the scores' last-digit rounding weighs that much more in it. The second evaluation
    reads the cache and runs no full pass: once to the hooked layer per batch of contexts, once on
    from there per reconstruction batch."""
    sae, cpu = request.getfixturevalue(which), torch.device("cpu")
    reference, reference_features = evals.evaluate_core(sae, model, eval_tokens, cfg, cpu)
    first, _ = evals.evaluate_core(sae, model, eval_tokens, cfg, cpu, cache_dir=tmp_path)
    calls = passes_run(model, monkeypatch)
    cached, cached_features = evals.evaluate_core(sae, model, eval_tokens, cfg, cpu, cache_dir=tmp_path)
    n_batches = len(eval_tokens) // cfg.eval_batch_prompts
    assert sorted(calls, key=str) == sorted([(0, cfg.layer + 1)] * n_batches + [
        (cfg.layer + 1, model.cfg.n_layers)] * cfg.eval_reconstruction_batches, key=str)
    assert cached == first
    np.testing.assert_equal(cached_features, reference_features)  # NaN where a latent never fires
    expected, found = metric_leaves(reference), metric_leaves(cached)
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        assert found[name] == pytest.approx(value, rel=1e-5 if name.startswith("bootstrap_se.") else 1e-6), name
    for name in ("ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation", "ce_loss_score"):
        assert found[f"model_performance_preservation.{name}"] == expected[f"model_performance_preservation.{name}"]
    if which == "nearly_exact_sae":
        assert 0 < expected["model_behavior_preservation.kl_div_with_sae"] < 1e-2


def test_a_model_with_soft_capped_logits_is_scored_by_sae_bench_s_own_passes(sae, model, cfg, eval_tokens, tmp_path):
    """The cached KL term needs logits linear in the final residual, which Gemma 2's soft cap breaks."""
    model.cfg.output_logits_soft_cap = 30.0
    reference, _ = evals.evaluate_core(sae, model, eval_tokens, cfg, torch.device("cpu"))
    assert evals.evaluate_core(sae, model, eval_tokens, cfg, torch.device("cpu"), cache_dir=tmp_path)[0] == reference
    assert not (tmp_path / "core_reference").exists()


@pytest.fixture
def reference_reads(monkeypatch):
    """Counts of clean_reference's computations and file reads."""
    import safetensors.torch

    counts = dict(computed=0, read=0)
    compute, read = evals._reference_values, safetensors.torch.load_file

    def computing(*args):
        counts["computed"] += 1
        return compute(*args)

    def reading(*args, **kwargs):
        counts["read"] += 1
        return read(*args, **kwargs)
    monkeypatch.setattr(evals, "_reference_values", computing)
    monkeypatch.setattr(safetensors.torch, "load_file", reading)
    return counts


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "manifest of another key"])
def test_a_damaged_core_reference_is_computed_again_never_read(model, cfg, eval_tokens, tmp_path, reference_reads,
                                                              damage):
    cpu = torch.device("cpu")
    made = evals.clean_reference(model, eval_tokens, cfg, cpu, tmp_path)
    (path,) = (tmp_path / "core_reference").glob("*.safetensors")
    manifest_path = path.with_suffix(".json")
    data = bytearray(path.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        manifest = json.loads(manifest_path.read_text())
        manifest_path.write_text(json.dumps({**manifest, "key": "0" * 64}))
    assert reference_reads == dict(computed=1, read=0)
    again = evals.clean_reference(model, eval_tokens, cfg, cpu, tmp_path)
    assert reference_reads == dict(computed=2, read=0)  # computed again; the damaged file was never loaded
    assert json.loads(manifest_path.read_text())["sha256"] == file_sha256(path)
    read = evals.clean_reference(model, eval_tokens, cfg, cpu, tmp_path)
    assert reference_reads == dict(computed=2, read=1)
    for name, value in made.items():
        assert torch.equal(again[name], value) and torch.equal(read[name], value), name


def test_other_evaluation_tokens_or_weights_get_their_own_core_reference(model, cfg, eval_tokens, tmp_path,
                                                                          reference_reads):
    cpu = torch.device("cpu")
    other_tokens = eval_tokens.clone()
    other_tokens[3, 5] = (other_tokens[3, 5] + 1) % model.cfg.d_vocab
    for tokens in (eval_tokens, eval_tokens.clone(), other_tokens):
        evals.clean_reference(model, tokens, cfg, cpu, tmp_path)
    assert reference_reads == dict(computed=2, read=1)
    with torch.no_grad():
        model.blocks[0].mlp.W_in[0, 0] += 1.0  # a weight the sample reads: every tensor's first value
    evals.clean_reference(model, eval_tokens, cfg, cpu, tmp_path)
    assert reference_reads["computed"] == 3 and len(list((tmp_path / "core_reference").glob("*.safetensors"))) == 3
