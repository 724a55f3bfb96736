"""What every module of the harness shares, imported first by each: the one-line error and its
console, and the warning filters. Imports nothing of the project's."""

from __future__ import annotations

import contextlib
import warnings

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # an error stays one line, however long


class HarnessError(Exception):
    """Bad input or a missing resource: the CLI prints the message as one line and exits 2."""


@contextlib.contextmanager
def one_line_errors():
    """Bad input (HarnessError) ends a command with one `error:` line and exit code 2."""
    try:
        yield
    except HarnessError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


# Harmless warnings: in every core eval sae_lens weighs our held-out contexts against a training
# budget and sae_bench copy-constructs tensors; TransformerLens announces a successor API (we keep
# HookedTransformer, which sae_bench's evals take).
warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
warnings.filterwarnings("ignore", message="To copy construct from a tensor")
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
