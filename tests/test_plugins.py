"""What every plugin of every study must do, checked on the tiny preset: train to the end with
finite losses, log every loss term it declares (non-zero somewhere while its mechanism is on),
send gradients to every trainable parameter, and change the result relative to its parent run
on the same seed (a plugin that changes nothing is the bug the notebooks kept hitting)."""

import dataclasses

import pytest
import torch
from helpers import read_log, tiny_run
from safetensors.torch import load_file

import experiment
import evals

ALL_PLUGINS = sorted(experiment.plugin_files())
_runs: dict[str, tuple[dict, object]] = {}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("plugin_runs")


# Where a mechanism's own gate keeps it off on tiny: zscore run 1's τ (the notebook's) sits above
# tiny's co-activations once b_dec starts at the data (on embedded it acts: notes.md).
TINY_SETTINGS = {"zscore_ortho/run_1_initial": {"tau": 0.01}}


def trained(key: str, runs_dir) -> tuple[dict, object]:
    """One tiny training run per plugin per test session, shared by the checks below."""
    if key not in _runs:
        out = runs_dir / key.replace("/", "__")
        info = tiny_run(key, out, runs_dir / "notes.md", evals=(), hyperparams=TINY_SETTINGS.get(key))
        _runs[key] = (info, out)
    return _runs[key]


# A term whose mechanism logs what it acts on: zero is right where that was always zero (AuxK
# with no dead latent: a well-started tiny run may have none).
ACTS_ON = {"auxiliary_reconstruction_loss": "auxk_dead"}


@pytest.mark.e2e
@pytest.mark.parametrize("key", ALL_PLUGINS)
def test_plugin_trains_with_finite_logged_loss_terms(key, runs_dir):
    info, out = trained(key, runs_dir)
    assert info["status"] == "completed" and info["training_steps"] > 0
    log = read_log(out)
    terms = [k for k in info["final_loss_terms"] if k != "total_loss"]
    for term in terms:
        records = [record for record in log if term in record]  # a term may start later (AuxK)
        values = [record[term] for record in records]
        assert all(torch.isfinite(torch.tensor(v)) for v in values), (term, values)
        idle = term in ACTS_ON and all(record.get(ACTS_ON[term], 1) == 0 for record in records)
        assert idle or any(v != 0 for v in values), f"loss term {term} is zero at every logged step"


@pytest.mark.e2e
@pytest.mark.parametrize("key", ALL_PLUGINS)
def test_gradients_reach_every_trainable_parameter(key):
    plugin = experiment.find_plugin(key)
    cfg = experiment.build_config("tiny", key)
    torch.manual_seed(0)
    sae = plugin.sae_class(64, 256, plugin.hyperparams_class(), cfg)
    trainer = plugin.trainer_class(sae, cfg)
    x = torch.randn(256, 64) * 3 + 1
    for step in range(3):  # past any first-step special case
        trainer.step(x, step)
    sae.zero_grad(set_to_none=True)
    out = sae.loss(x, 3)
    sum(out.terms.values()).backward()
    for name, param in sae.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} gets no gradient"
            assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, f"{name}: zero gradient"


@pytest.mark.parametrize("key", ALL_PLUGINS)
def test_evaluation_sees_the_plugin_token_by_token_whatever_the_input_shape(key):
    """sae_bench hands the SAE (batch, position, d_in) activations; a plugin written for
    (tokens, d_in), as in training, must give the same latents and reconstruction."""
    plugin = experiment.find_plugin(key)
    torch.manual_seed(0)
    sae = plugin.sae_class(64, 256, plugin.hyperparams_class(), experiment.build_config("tiny", key)).eval()
    scaled = evals.ScaledSAE(sae, scale=0.5)
    x = torch.randn(3, 5, 64) * 6 + 2
    with torch.no_grad():
        f, x_hat = scaled.encode(x), scaled(x)
        assert f.shape == (3, 5, 256) and x_hat.shape == x.shape
        assert torch.allclose(f.reshape(15, 256), scaled.encode(x.reshape(15, 64)))
        assert torch.allclose(scaled.decode(f), x_hat, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize("key", ALL_PLUGINS)
def test_plugin_steps_at_the_gemma_2_2b_dictionary_size_without_quadratic_batch_memory(key):
    """d_sae 16384 as in the seed notebooks' largest setting: anything of size batch x d_sae x d_sae
    (pairwise products, attention over latents) would need 275 GB here and fail at once."""
    plugin = experiment.find_plugin(key)
    cfg = experiment.build_config("tiny", key)
    torch.manual_seed(0)
    sae = plugin.sae_class(128, 16384, plugin.hyperparams_class(), cfg)
    trainer = plugin.trainer_class(sae, cfg)
    total, out = trainer.step(torch.randn(256, 128) * 3 + 1, 0)
    assert torch.isfinite(total) and out.latents.shape == (256, 16384)


# Plugins whose change acts only on latents that die, and none dies in a tiny run (every latent
# fires in every 256-token batch): each is tested on forced-dead latents instead, where named.
ACTS_ONLY_ON_DEAD_LATENTS = {
    "freq_order/run_4_freq_resampling": "test_freq_order.py::test_resampling_revives_only_silent_latents_at_the_rarest_live_rate",
}


@pytest.mark.parametrize("key", [k for k in ALL_PLUGINS
                                 if experiment.find_plugin(k).parent and k not in ACTS_ONLY_ON_DEAD_LATENTS])
@pytest.mark.e2e
def test_plugin_changes_the_result_relative_to_its_parent(key, runs_dir):
    plugin = experiment.find_plugin(key)
    parent_key = next(k for k in ALL_PLUGINS if k.endswith("/" + plugin.parent))
    child_info, child_dir = trained(key, runs_dir)
    parent_info, parent_dir = trained(parent_key, runs_dir)
    child_w = load_file(child_dir / "plugin_state.safetensors")["W_dec"]
    parent_w = load_file(parent_dir / "plugin_state.safetensors")["W_dec"]
    assert not torch.equal(child_w, parent_w), f"{key} trains exactly like its parent {parent_key}"
    assert child_info["final_loss"] != parent_info["final_loss"]


@pytest.mark.parametrize("key", [key for key in experiment.plugin_files() if key.startswith("baseline/")
                                 and experiment.find_plugin(key).sae_class.sparsity_knob != "sparsity_penalty"])
def test_a_baseline_with_a_knob_of_its_own_does_not_read_sparsity_penalty(key):
    """frontier.verdicts counts such a baseline's runs at another sparsity_penalty as its sweep's:
    true only while its loss is the same whatever sparsity_penalty says."""
    plugin, x = experiment.find_plugin(key), torch.randn(64, 32)
    terms = []
    for penalty in (0.04, 4.0):
        torch.manual_seed(0)
        cfg = dataclasses.replace(experiment.build_config("tiny", key), sparsity_penalty=penalty)
        sae = plugin.sae_class(32, 128, plugin.hyperparams_class(), cfg)
        sae.init_from_data(x)
        terms.append({name: value.item() for name, value in sae.loss(x, step=50).terms.items()})
    assert terms[0] == terms[1]
