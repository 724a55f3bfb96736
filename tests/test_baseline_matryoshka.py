"""The Matryoshka BatchTopK baseline (plugins/baseline/run_0_matryoshka.py) against SAELens's own
`MatryoshkaBatchTopKTrainingSAE`: every check of the BatchTopK baseline it builds on runs on it too,
in tests/test_baseline_batchtopk.py (whose docstring gives the setting and the mapped names); here,
the prefixes: SAELens's `matryoshka_widths` are ours (16, 32, 64, 128, 256 at d_sae 256, the
paper's), and each inner prefix's term `inner_mse_loss_<width>` is SAELens's term of that name
(Σ over d_in, mean over the batch, summed into the total with weight 1 as SAELens does). The
whole dictionary's reconstruction is our l2_loss and SAELens's mse_loss. Every comparison is to
1e-5 relative (in norm, over the whole tensor)."""

import pytest
import torch
from helpers import batch, make_sae, sae_lens_pass, sae_lens_twin

import experiment

KEY = "baseline/run_0_matryoshka"
INNER = {f"inner_mse_loss_{w}" for w in (16, 32, 64, 128)}


def test_the_prefixes_are_the_papers_and_sae_lens_sees_the_same():
    sae = make_sae(KEY)
    assert sae.widths == [16, 32, 64, 128, 256]
    ref = sae_lens_twin(sae, rescale=False)
    assert ref.cfg.matryoshka_widths == sae.widths
    out, theirs = sae.train().loss(batch(0), 0), sae_lens_pass(ref, batch(0), 0, sae.dead_latents())
    assert INNER <= out.terms.keys() and INNER <= theirs.losses.keys()
    for name in INNER:
        assert out.terms[name] > 0
    # Each prefix reconstructs from its own latents only: the rest of the decoder does not reach it.
    with torch.no_grad():
        sae.W_dec[16:] += 1.0
    moved = sae.train().loss(batch(0), 1).terms
    assert torch.equal(moved["inner_mse_loss_16"], out.terms["inner_mse_loss_16"])
    assert not torch.equal(moved["inner_mse_loss_32"], out.terms["inner_mse_loss_32"])


def test_prefix_widths_follow_the_dictionary_size_and_are_checked():
    module = experiment.find_plugin(KEY).module
    assert module.prefix_widths((1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0), 2048) == [128, 256, 512, 1024, 2048]
    assert module.prefix_widths((0.25, 0.5), 256) == [64, 128, 256]  # the whole dictionary added, as SAELens
    for bad in ((0.5, 0.25), (0.001, 0.5), (0.5, 2.0)):
        with pytest.raises(ValueError):
            module.prefix_widths(bad, 256)

