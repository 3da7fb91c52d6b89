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


def _print_columns(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns as plain text: a rich table of a few hundred rows takes longer to lay
    out than reading every header of a large checkpoint."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [headers, *rows]]
    typer.echo("\n".join(lines))


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
    for s in report.checkpoints:
        dtypes = ", ".join(f"{d} {n:,}" for d, n in s.dtypes.items())
        typer.echo(f"{typer.style(s.source, bold=True)}: {s.tensors} tensors, {s.parameters:,} parameters, {_human(s.bytes)} ({dtypes})")
        for sh in s.shards:
            typer.echo(f"  {sh.file}: {sh.tensors} tensors, {_human(sh.bytes)}")
        for head, emb in s.tied.items():
            if head == "lm_head.weight" or emb:
                typer.echo(f"  tied: {head} -> {emb}")
                break
    if tensors and report.comparison is None:
        rows = []
        for name, dtype, shape in report.tensors:
            n = 1
            for d in shape:
                n *= d
            rows.append((name, dtype, str(list(shape)), f"{n:,}"))
        _print_columns(("tensor", "dtype", "shape", "parameters"), rows)
    c = report.comparison
    if c is None:
        return
    for name, have in c.only_in.items():
        typer.echo(f"{typer.style('only in some', fg='yellow')}: {name} (in {', '.join(have)})")
    for name, shapes in c.shape_differs.items():
        typer.echo(f"{typer.style('shape differs', fg='red')}: {name}: " + " vs ".join(str(list(s)) for s in shapes))
    if c.relative_l2:
        _print_columns(("tensor", *[f"rel. L2 vs #0: #{k}" for k in range(1, len(report.checkpoints))]),
                       [(name, *[f"{x:.4g}" for x in row]) for name, row in c.relative_l2.items()])
    if not (c.only_in or c.shape_differs):
        typer.echo("same tensor names and shapes in all checkpoints")
