"""What every command shares: error handling, progress rendering, option parsing.

Nothing here imports torch: the library is imported inside each command, so ``--help`` stays fast.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer

DEVICE_HELP = "Compute device: auto (CUDA when present), cpu, cuda or cuda:N."
DTYPE_HELP = "Output dtype of floating tensors (bf16, fp16, fp32, fp64); default: as the first input."
SHARD_HELP = "Largest output shard, e.g. 5GB, 200MB, 2GiB."
CONFIG_HELP = "Input (or folder) to copy config, generation config and tokenizer from; default: the first input."

# Options every writing command takes (one definition, so they read the same everywhere).
OUTPUT = typer.Option(..., "--output", "-o", help="Output folder (created only when complete).")
DEVICE = typer.Option("auto", help=DEVICE_HELP)
SHARD = typer.Option("5GB", help=SHARD_HELP)
FORCE = typer.Option(False, "--force", help="Replace an existing output folder.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="Accept pickled .bin inputs (weights_only load).")


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Turn the library's errors into one line on stderr and a non-zero exit."""
    from surgery.errors import SurgeryError

    try:
        yield
    except SurgeryError as e:
        fail(str(e).replace("\n", " "))
    except KeyboardInterrupt:
        fail("interrupted; no output was written", 130)


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{what}: expected comma-separated numbers, got {text!r}")


@contextlib.contextmanager
def tensor_progress(label: str, quiet: bool = False):
    """A rich progress bar over tensors and bytes on a terminal; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("tensors"),
               DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(p):
            bar.update(task, total=p.bytes_total, completed=p.bytes_done,
                       description=f"{label} {p.tensors_done}/{p.tensors_total}")

        yield update
