"""``surgery inspect``: layout from headers; differences between checkpoints."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import List

import typer

from .common import ALLOW_PICKLE, DEVICE_HELP, reported_errors


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def inspect(
    checkpoints: List[str] = typer.Argument(..., help="One checkpoint, or several to compare with the first."),
    tensors: bool = typer.Option(True, "--tensors/--summary", help="List every tensor, or only the summary."),
    distances: bool = typer.Option(True, "--distances/--headers-only",
                                   help="With several checkpoints, stream weights for relative L2 distances."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    allow_pickle: bool = ALLOW_PICKLE,
) -> None:
    """Names, shapes, dtypes, parameter counts and shard layout; with several checkpoints, what differs."""
    with reported_errors():
        from surgery.recipes.inspect import inspect as run_inspect

        report = run_inspect(checkpoints, distances=distances, device=device, allow_pickle=allow_pickle)
    if as_json:
        typer.echo(json.dumps(asdict(report), indent=1, default=list))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for s in report.checkpoints:
        dtypes = ", ".join(f"{d} {n:,}" for d, n in s.dtypes.items())
        console.print(f"[bold]{s.source}[/]: {s.tensors} tensors, {s.parameters:,} parameters, {_human(s.bytes)} ({dtypes})")
        for sh in s.shards:
            console.print(f"  {sh.file}: {sh.tensors} tensors, {_human(sh.bytes)}")
        for head, emb in s.tied.items():
            if head == "lm_head.weight" or emb:
                console.print(f"  tied: {head} -> {emb}")
                break
    if tensors and report.comparison is None:
        table = Table("tensor", "dtype", "shape", "parameters", box=None)
        for name, dtype, shape in report.tensors:
            n = 1
            for d in shape:
                n *= d
            table.add_row(name, dtype, str(list(shape)), f"{n:,}")
        console.print(table)
    c = report.comparison
    if c is None:
        return
    for name, have in c.only_in.items():
        console.print(f"[yellow]only in some[/]: {name} (in {', '.join(have)})")
    for name, shapes in c.shape_differs.items():
        console.print(f"[red]shape differs[/]: {name}: " + " vs ".join(str(list(s)) for s in shapes))
    if c.relative_l2:
        table = Table("tensor", *[f"rel. L2 vs #0: #{k}" for k in range(1, len(report.checkpoints))], box=None)
        for name, row in c.relative_l2.items():
            table.add_row(name, *[f"{x:.4g}" for x in row])
        console.print(table)
    if not (c.only_in or c.shape_differs):
        console.print("same tensor names and shapes in all checkpoints")
