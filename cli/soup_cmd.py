"""``surgery soup``: uniform, weighted and greedy soups."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (ALLOW_PICKLE, CONFIG_HELP, DEVICE, DTYPE_HELP, FORCE, OUTPUT, QUIET, SHARD, fail, parse_floats,
                     prints_recipe, writes_model, reported_errors, tensor_progress)


def _soup_step(kw: dict):
    if kw.get("greedy"):
        fail("--print-recipe: a greedy soup scores candidates between passes and has no recipe form")
    return "soup", {"models": kw["inputs"], "weights": parse_floats(kw.get("weights"), "--weights"),
                    "normalize": kw["normalize"], "base": kw.get("base"), "config_from": kw.get("config_from")}


@prints_recipe(_soup_step)
@writes_model()
def soup(
    inputs: List[str] = typer.Argument(..., help="Checkpoints: folders, .safetensors files or Hub ids org/name[@rev]."),
    output: Path = OUTPUT,
    weights: Optional[str] = typer.Option(None, help="Comma-separated weights, one per input, e.g. 0.5,0.3,0.2."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="Scale weights to sum to 1."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy soup: add ingredients only while the score improves."),
    score_cmd: Optional[str] = typer.Option(None, "--score-cmd",
                                            help="Shell command scoring {model}; its last line is the score (higher is better)."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    device: str = DEVICE,
    max_shard_size: str = SHARD,
    config_from: Optional[str] = typer.Option(None, help=CONFIG_HELP),
    base: Optional[str] = typer.Option(None, help="Base model of LoRA adapter inputs (default: the one each "
                                                  "adapter's config names)."),
    force: bool = FORCE,
    allow_pickle: bool = ALLOW_PICKLE,
    quiet: bool = QUIET,
) -> None:
    """Average checkpoints tensor by tensor (a model soup). A PEFT LoRA adapter input counts as its base plus its delta."""
    w = parse_floats(weights, "--weights")
    if greedy and w is not None:
        fail("--weights and --greedy exclude each other: a greedy soup is a uniform soup of the ingredients it keeps")
    if greedy != (score_cmd is not None):
        fail("--greedy needs --score-cmd, and --score-cmd is only used with --greedy")
    with reported_errors():
        import surgery

        common = dict(dtype=dtype, device=device, max_shard_size=max_shard_size, config_from=config_from,
                      force=force, allow_pickle=allow_pickle)
        with tensor_progress("soup", quiet) as progress:
            if greedy:
                result = surgery.greedy_soup(inputs, output, score=surgery.score_command(score_cmd), progress=progress,
                                             log=lambda m: typer.echo(m, err=True), **common)
                typer.echo(f"greedy soup of {len(result.chosen)} ingredient(s), score {result.score:.6g}: "
                           + ", ".join(result.chosen))
                typer.echo(f"wrote {result.output}")
                return
            out = surgery.soup(inputs, output, weights=w, normalize=normalize, base=base, progress=progress, **common)
    typer.echo(f"wrote {out}")
