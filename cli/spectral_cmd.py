"""``surgery spectral``: intruder dimensions and spectral change of fine-tunes, as a report folder."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import DEVICE, FORCE, QUIET, SHARD, fail, parse_floats, prints_recipe, reported_errors, tensor_progress, \
    writes_model


def _mitigation_step(kw: dict):
    if kw.get("mitigate") is None or kw.get("mitigated_out") is None:
        fail("--print-recipe: the report has no recipe form; with --mitigate and --mitigated-out it prints the "
             "mitigation's")
    if len(kw["ft"]) != 1:
        fail("--mitigate works on exactly one --ft")
    return "reduce_intruders", {"base": kw["base"], "ft": kw["ft"][0], "lambda": kw["mitigate"], "k": kw["k"],
                                "epsilon": kw["epsilon"], "include": kw.get("include"), "ft_svd": kw["ft_svd"]}


@prints_recipe(_mitigation_step, output="mitigated_out")
@writes_model("mitigated_out")
def spectral(
    base: str = typer.Option(..., "--base", help="The pretrained model."),
    ft: List[str] = typer.Option(..., "--ft", help="A fine-tune of it; repeatable."),
    output: Path = typer.Option(..., "--output", "-o", help="Report folder: JSON, CSV, PNG and index.html."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Regex of matrices to analyse (default: "
                                                "2-D weights inside numbered blocks, no embeddings); repeatable."),
    k: int = typer.Option(10, "--k", help="Top fine-tuned singular vectors tested per matrix."),
    epsilon: float = typer.Option(0.5, "--epsilon", help="Intruder iff max |cos| with every base vector < epsilon."),
    epsilons: Optional[str] = typer.Option(None, "--epsilons", help="Comma-separated sweep (default 0.1,...,0.9)."),
    ft_svd: str = typer.Option("auto", "--ft-svd", help="Fine-tune top-k SVD: auto, full or randomized "
                                                        "(checked, falls back to full)."),
    heatmap: Optional[str] = typer.Option(None, "--heatmap", help="Matrix for the similarity heat map "
                                                                  "(default: the one with most intruders)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where base SVDs are cached "
                                             "(default ~/.cache/surgery/spectral)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Keep no base SVDs on disk."),
    mitigate: Optional[float] = typer.Option(None, "--mitigate", help="Write the fine-tune with each intruder "
                                             "s_j u_j v_j^T scaled by LAMBDA (PEFT's default 0.75)."),
    mitigated_out: Optional[Path] = typer.Option(None, "--mitigated-out", help="Folder for the mitigated model."),
    device: str = DEVICE,
    max_shard_size: str = SHARD,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Intruder dimensions (LoRA vs Full Fine-tuning: An Illusion of Equivalence), spectra, update
    effective rank and subspace energy of each FT against BASE; optionally mitigate the intruders."""
    sweep = parse_floats(epsilons, "--epsilons")
    with reported_errors(), tensor_progress("spectral", quiet) as progress:
        from surgery.spectral import DEFAULT_EPSILONS, spectral_report

        result, report, mitigated = spectral_report(
            base, ft, output, include=include or None, k=k, epsilon=epsilon, epsilons=sweep or DEFAULT_EPSILONS,
            cache_dir=False if no_cache else cache_dir, device=device, ft_svd=ft_svd, heatmap=heatmap,
            mitigate=mitigate, mitigated_out=mitigated_out, force=force, max_shard_size=max_shard_size,
            progress=progress)
    for f in result.fine_tunes:
        typer.echo(f"{f.label}: {f.total(result.epsilon)} intruders at epsilon {result.epsilon:g} "
                   f"in {len(f.matrices)} matrices")
    typer.echo(f"wrote {report}" + (f" and {mitigated}" if mitigated else ""))
