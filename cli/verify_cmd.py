"""``surgery verify``: re-check an output against its card, recipe and plan files."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import DEVICE, fail, reported_errors


def verify(
    output: Path = typer.Argument(..., help="An output folder written by surgery."),
    rerun: bool = typer.Option(False, "--rerun", help="Recompute the output from its stored plan and inputs, "
                                                      "and compare bytes shard by shard."),
    input_map: Optional[List[str]] = typer.Option(None, "--input", metavar="OLD=NEW",
                                                  help="Read the recorded input OLD from NEW (implies --rerun); repeatable."),
    device: str = DEVICE,
) -> None:
    """Check shard hashes, index and config against the recorded ones; --rerun also recomputes the weights."""
    remap = {}
    for item in input_map or []:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            fail(f"--input {item!r}: expected OLD=NEW")
        remap[old] = new
    with reported_errors():
        import surgery

        result = surgery.verify(output, rerun=rerun or bool(remap), inputs=remap, device=device)
    if not result.ok:
        for line in result.problems:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(1)
    extra = f"; rerun gave the same bytes ({result.inputs_checked} input hash(es) matched)" if result.rerun else ""
    typer.echo(f"OK {output}: {result.shards} shard(s), {result.tensors} tensors, {result.total_size:,} bytes, "
               f"hashes and index match{extra}")
