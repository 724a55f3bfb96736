"""The installed environment itself works outside the harness: a researcher's own script, run with
this virtual environment's Python and nothing of the harness importable, can import transformers,
TransformerLens, sae_lens, sae_bench and torchvision, format a dataset as torch tensors with
torchvision loaded (datasets 3.x reads torchvision's VideoReader then), and round-trip an SAE
through disk."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import transformers, transformer_lens, sae_lens, sae_bench, torchvision, datasets
    from sae_lens import SAE, StandardSAE, StandardSAEConfig
    import torch

    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2]]}).with_format("torch")
    assert next(iter(rows))["input_ids"].tolist() == [1, 2]

    assert not any(name in sys.modules for name in ("common", "experiment")), "the harness leaked in"
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=8, d_sae=16, device="cpu"))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
    sae.save_model(sys.argv[1])
    loaded = SAE.load_from_disk(sys.argv[1], device="cpu")
    assert type(loaded).__name__ == "StandardSAE", type(loaded)
    before, after = sae.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys(), (sorted(before), sorted(after))
    for key in before:
        assert torch.equal(before[key], after[key]), key
    print("ok")
    """
)


@pytest.mark.e2e
def test_a_fresh_interpreter_imports_sae_lens_and_round_trips_an_sae(tmp_path):
    env = {"PATH": os.defpath, "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}  # nothing inherited
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "sae")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
