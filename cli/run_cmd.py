"""``surgery run``: a recipe file of chained operations, evaluated per tensor in one streaming pass."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DEVICE, FORCE, QUIET, reported_errors, tensor_progress, writes_model


@writes_model()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML: inputs, steps (op and parameters), output."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default: the recipe's output.path; --push-to needs it given here)."),
    device: str = DEVICE,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Run a recipe: operations (soup, transfer, merge, lines, diff, lora_merge, graft, sft) chained in one pass."""
    with reported_errors(), tensor_progress("run", quiet) as progress:
        from surgery.recipes.graph import run_recipe

        out = run_recipe(recipe, output, force=force, device=device, progress=progress)
    typer.echo(f"wrote {out}")
