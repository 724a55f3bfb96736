"""Baseline: the plain ReLU SAE with L1 sparsity and unit-norm decoder rows.

Every study's run 0: the harness's base SAE and Trainer, unchanged.
"""

from typing import Any

import experiment
from experiment import FORMULA


class SAE(experiment.SAE):
    """The base SAE with its twins in SAELens: the export every run built on it writes (SAELens's
    standard SAE, exact while the formula is kept) and SAELens's training SAE, which the parity
    tests and bench.py hold it to."""

    def sae_lens_export(self, scale: float) -> tuple[Any, bool]:
        """This SAE in the model's activation scale as a SAELens SAE, and whether that is exactly
        this SAE: the plain formula is SAELens's standard SAE; of a plugin with its own pieces only
        the linear part can be exported (a plugin of a SAELens architecture overrides this)."""
        from sae_lens import StandardSAE, StandardSAEConfig

        export = StandardSAE(StandardSAEConfig(d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, dtype="float32",
                                               device="cpu", metadata=self.sae_lens_metadata()))
        export.load_state_dict(self.scaled_weights(scale), strict=False)
        return export, self.keeps("encoder_input", "pre_activation", "activation", "decoder_weight", "decode",
                                  "reconstruct")

    def sae_lens_training(self) -> tuple[Any, dict[str, float]] | None:
        """SAELens's training SAE of this architecture holding these weights, and the coefficients
        its `training_forward_pass` takes (bench.py times its step against ours), or None where
        no SAELens architecture is this SAE."""
        if not self.keeps(*FORMULA):
            return None
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

        ref = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=self.cfg.d_in, d_sae=self.cfg.d_sae, dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.W_dec.device), l1_coefficient=self.run_cfg.sparsity_penalty))
        ref.load_state_dict({k: v.detach().clone() for k, v in self.state_dict().items()}, strict=False)
        return ref, {"l1": self.run_cfg.sparsity_penalty}

    def sae_lens_metadata(self):
        from sae_lens.saes.sae import SAEMetadata

        cfg = self.run_cfg
        return SAEMetadata(model_name=cfg.model, hook_name=cfg.hook_name, context_size=cfg.context_size,
                           prepend_bos=True, dataset_path=cfg.dataset, seqpos_slice=(1, None))
