"""What every module of the harness shares, imported first by each: the one-line error and its
console (with the progress bars' ETA column), the cache location, Typer's usage errors in one
line, and the warning filters. Imports nothing of the project's."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
from pathlib import Path

import typer
import typer.core
from typer._click import exceptions as click_errors  # Typer vendors Click: its usage errors are these
from rich.console import Console
from rich.progress import TimeRemainingColumn
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)  # an error stays one line, however long
if not (console.is_terminal or console.is_jupyter or "COLUMNS" in os.environ):
    console.width = 160  # a log file gets progress bars' times whole (Rich's default there is 80)


class RemainingOrDone(TimeRemainingColumn):
    """A progress bar's "ETA h:mm:ss", "done" once it is finished."""

    def render(self, task) -> Text:
        return Text("done" if task.finished else f"ETA {super().render(task).plain}", style="progress.remaining")


ROOT = Path(__file__).resolve().parent  # the project: plugins/, runs/, notes.md


def cache_dir() -> Path:
    """The harness's cache (the dequantised embedded model, measured kernel switch points):
    $SAE_HARNESS_CACHE, default ~/.cache/sae_harness. Read here and nowhere else."""
    return Path(os.environ.get("SAE_HARNESS_CACHE", Path.home() / ".cache" / "sae_harness"))


def activations_dir() -> Path:
    """Where activation caches (and what evaluation computes once per model and text) are kept:
    $SAE_HARNESS_ACTIVATIONS, default the cache's activations/ folder."""
    return Path(os.environ.get("SAE_HARNESS_ACTIVATIONS", cache_dir() / "activations"))


def file_sha256(path: Path) -> str:
    """A file's sha256, read in 16 MiB blocks: what cache manifests record and check."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


class HarnessError(Exception):
    """Bad input or a missing resource: the CLI prints the message as one line and exits 2."""


class OneLineUsageErrors:
    """Usage errors (a malformed value, an unknown option, a missing argument) end, as HarnessError
    does, with one `error:` line and exit code 2: `typer.Typer(cls=OneLineUsage)` for an app of
    commands, `@app.command(cls=OneLineUsageCommand)` for an app of one."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help())
            code = 0
        except click_errors.ClickException as exc:
            command = f" {exc.ctx.info_name}" if getattr(exc, "ctx", None) and exc.ctx.parent else ""
            console.print(f"[red]error:[/red] {exc.format_message()} (see{command} --help)")
            code = exc.exit_code
        except typer.Abort:
            console.print("[yellow]aborted")
            code = 130
        if standalone_mode:
            sys.exit(code or 0)
        return code


class OneLineUsage(OneLineUsageErrors, typer.core.TyperGroup):
    pass


class OneLineUsageCommand(OneLineUsageErrors, typer.core.TyperCommand):
    pass


class Interrupted(Exception):
    """Ctrl-C during training (raised after the checkpoint of the last completed step is saved) or
    while waiting for a run folder another process holds; its message says which."""


@contextlib.contextmanager
def one_line_errors():
    """Bad input (HarnessError) ends a command with one `error:` line and exit code 2; Ctrl-C in
    training (Interrupted, the run checkpointed) or while waiting for a run folder with one line
    and exit code 130."""
    try:
        yield
    except HarnessError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except Interrupted as exc:
        console.print(f"[yellow]{exc}; run the same command again to continue")
        raise typer.Exit(130) from None


# Harmless warnings: in every core eval sae_lens weighs our held-out contexts against a training
# budget and sae_bench copy-constructs tensors; TransformerLens announces a successor API (we keep
# HookedTransformer, which sae_bench's evals take).
warnings.filterwarnings("ignore", message="The training dataset contains fewer samples")
warnings.filterwarnings("ignore", message="To copy construct from a tensor")
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")
