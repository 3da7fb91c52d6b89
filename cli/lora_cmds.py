"""``surgery lora merge``: a PEFT LoRA adapter merged into its base. (``surgery soup`` takes adapters too.)"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DEVICE, DTYPE_HELP, FORCE, OUTPUT, QUIET, SHARD, prints_recipe, writes_model, reported_errors, tensor_progress

lora_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                       help="PEFT LoRA adapters: merge one into its base (soup, merge, transfer and diff take adapters as inputs too).")


@lora_app.command("merge")
@prints_recipe(lambda kw: ("lora_merge", {"base": kw["base"], "adapter": kw["adapter"], "scale": kw["scale"]}))
@writes_model()
def merge(
    base: str = typer.Argument(..., help="The model the adapter was trained on."),
    adapter: str = typer.Argument(..., help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."),
    output: Path = OUTPUT,
    scale: float = typer.Option(1.0, help="Scale of the adapter's delta (1: as peft's merge_and_unload)."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP.replace("first input", "base")),
    device: str = DEVICE,
    max_shard_size: str = SHARD,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """BASE + scale * (B @ A * scaling) for every module the adapter adapts, streamed per tensor."""
    with reported_errors(), tensor_progress("lora merge", quiet) as progress:
        from surgery.recipes.lora import merge as run

        out = run(base, adapter, output, scale=scale, dtype=dtype, device=device, max_shard_size=max_shard_size,
                  force=force, progress=progress)
    typer.echo(f"wrote {out}")
