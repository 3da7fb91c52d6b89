"""``surgery diff``, ``surgery transfer``, ``surgery merge`` and ``surgery lines``."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (DEVICE, DTYPE_HELP, FORCE, OUTPUT, QUIET, SHARD, fail, parse_floats, prints_recipe, writes_model,
                     reported_errors, tensor_progress)


@prints_recipe(lambda kw: ("diff", {"ft": kw["ft"], "base": kw["base"]}))
@writes_model()
def diff(
    ft: str = typer.Argument(..., help="Fine-tuned checkpoint."),
    base: str = typer.Argument(..., help="The base it was fine-tuned from."),
    output: Path = OUTPUT,
    dtype: Optional[str] = typer.Option(None, help="Storage dtype of the delta; default one precision up (bf16->fp32, fp32->fp64): lossless."),
    device: str = DEVICE,
    max_shard_size: str = SHARD,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Save the task vector FT - BASE as a checkpoint with a manifest of its sources."""
    with reported_errors(), tensor_progress("diff", quiet) as progress:
        from surgery.recipes.delta import diff as run

        out = run(ft, base, output, dtype=dtype, device=device, max_shard_size=max_shard_size, force=force,
                  progress=progress)
    typer.echo(f"wrote {out}")


@prints_recipe(lambda kw: ("transfer", {"to": kw["to"], "source_base": kw.get("source_base"), "source_ft": kw.get("source_ft"), "diff": kw.get("diff_path"), "scale": kw["scale"], "keep_target": kw["keep_target"]}))
@writes_model()
def transfer(
    to: str = typer.Option(..., "--to", help="The new base to move the fine-tune onto."),
    output: Path = OUTPUT,
    diff_path: Optional[str] = typer.Option(None, "--diff", help="A delta saved by surgery diff."),
    source_base: Optional[str] = typer.Option(None, help="Base the fine-tune was made from (with --source-ft)."),
    source_ft: Optional[str] = typer.Option(None, help="The fine-tune (with --source-base)."),
    scale: float = typer.Option(1.0, help="Scale of the transferred difference."),
    keep_target: bool = typer.Option(False, "--keep-target", help="Copy target tensors the difference lacks."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP.replace("first input", "target")),
    device: str = DEVICE,
    max_shard_size: str = SHARD,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Fine-tuning transfer: TARGET + scale * (FT - BASE), from a saved diff or in one pass."""
    with reported_errors(), tensor_progress("transfer", quiet) as progress:
        from surgery.recipes.transfer import transfer as run

        out = run(to, output, diff=diff_path, source_base=source_base, source_ft=source_ft, scale=scale,
                  keep_target=keep_target, dtype=dtype, device=device, max_shard_size=max_shard_size, force=force,
                  progress=progress)
    typer.echo(f"wrote {out}")


@prints_recipe(lambda kw: ("merge", {"base": kw["base"], "models": kw["models"], "method": kw["method"],
                                        "weights": parse_floats(kw.get("weights"), "--weights"),
                                        "density": kw.get("density"), "lambda": kw["lam"], "scope": kw["scope"],
                                        "seed": kw["seed"], "lines": kw["lines"], "alpha": kw.get("alpha"),
                                        "beta": kw["beta"]}))
@writes_model()
def merge(
    models: List[str] = typer.Argument(..., help="Fine-tunes of the base."),
    base: str = typer.Option(..., "--base", help="The common base."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (not with --dry-run)."),
    method: str = typer.Option("task_arithmetic", help="task_arithmetic, ties, dare_linear or dare_ties."),
    weights: Optional[str] = typer.Option(None, help="Comma-separated weight per model (default 1 each)."),
    density: Optional[float] = typer.Option(None, help="Fraction kept: TIES top-k (default 0.2), DARE 1-p (default 0.1)."),
    lam: float = typer.Option(1.0, "--lambda", help="Scale of the merged task vector."),
    scope: str = typer.Option("tensor", help="TIES top-k per tensor (as mergekit, peft) or global (as the paper)."),
    seed: int = typer.Option(0, help="DARE seed: the same seed gives the same bytes."),
    lines: bool = typer.Option(False, "--lines", help="Scale the merged vector per block with LiNeS."),
    alpha: Optional[float] = typer.Option(None, help="LiNeS alpha (default: the paper's L1-norm rule)."),
    beta: float = typer.Option(0.0, help="LiNeS beta."),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --lines: print each tensor's lambda, write nothing."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP.replace("first input", "base")),
    device: str = DEVICE,
    max_shard_size: str = SHARD,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Merge fine-tunes of one base: BASE + lambda * merged task vector."""
    if dry_run and not lines:
        fail("--dry-run prints LiNeS lambdas: use it with --lines")
    if output is None and not dry_run:
        fail("give --output (or --lines --dry-run)")
    w = parse_floats(weights, "--weights")
    with reported_errors(), tensor_progress("merge", quiet) as progress:
        from surgery.recipes.merge import merge as run

        out = run(base, models, output, method=method, weights=w, density=density, lam=lam, scope=scope, seed=seed,
                  lines=lines, alpha=alpha, beta=beta, dtype=dtype, device=device, max_shard_size=max_shard_size,
                  force=force, progress=progress, dry_run=dry_run)
    if dry_run:
        _print_lambdas(out)
    else:
        typer.echo(f"wrote {out}")


@prints_recipe(lambda kw: ("lines", {"base": kw["base"], "ft": kw["ft"], "alpha": kw["alpha"], "beta": kw["beta"]}))
@writes_model()
def lines(
    base: str = typer.Option(..., "--base", help="The pretrained base."),
    ft: str = typer.Option(..., "--ft", help="The fine-tune."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder."),
    alpha: float = typer.Option(..., help="Scale of the first block and of tensors outside the blocks."),
    beta: float = typer.Option(..., help="Added scale at the last block: lambda(l) = alpha + beta*l/(L-1)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each tensor's lambda, write nothing."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP.replace("first input", "base")),
    device: str = DEVICE,
    max_shard_size: str = SHARD,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """LiNeS: BASE + lambda(l) * (FT - BASE); shallow blocks stay near the base, which curbs forgetting."""
    if output is None and not dry_run:
        fail("give --output (or --dry-run)")
    with reported_errors(), tensor_progress("lines", quiet) as progress:
        from surgery.recipes.merge import lines as run

        out = run(base, ft, output, alpha=alpha, beta=beta, dtype=dtype, device=device,
                  max_shard_size=max_shard_size, force=force, progress=progress, dry_run=dry_run)
    if dry_run:
        _print_lambdas(out)
    else:
        typer.echo(f"wrote {out}")


def _print_lambdas(lambdas: dict) -> None:
    width = max(len(n) for n in lambdas)
    for name, lam in lambdas.items():
        typer.echo(f"{name:<{width}}  {lam:.6g}")
