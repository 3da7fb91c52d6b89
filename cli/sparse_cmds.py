"""``surgery graft``, ``surgery mask stats|overlap`` and ``surgery sft extract|apply|revert``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import ALLOW_PICKLE, CONFIG_HELP, DEVICE, DTYPE_HELP, FORCE, OUTPUT, QUIET, SHARD, fail, prints_recipe, \
    writes_model, reported_errors, tensor_progress

INCLUDE = typer.Option(None, "--include", help="Regex (searched in tensor names) of tensors to select; repeatable.")
EXCLUDE = typer.Option(None, "--exclude", help="Regex of tensors to leave out; repeatable.")
K = typer.Option(None, "--k", help="Keep exactly this many entries (instead of a fraction).")


def _graft_step(kw: dict):
    if kw.get("learn") or kw.get("mask_out") is not None:
        fail("--print-recipe: a graft with --mask-out or --learn has no recipe form (it writes or trains a mask)")
    if kw.get("mask") is not None:
        return "graft", {"base": kw["base"], "ft": kw["ft"], "mask": str(kw["mask"])}
    return "graft", {"base": kw["base"], "ft": kw["ft"], "sparsity": kw.get("sparsity"), "k": kw.get("k"),
                     "include": kw.get("include"), "exclude": kw.get("exclude")}


@prints_recipe(_graft_step)
@writes_model()
def graft(
    base: str = typer.Option(..., "--base", help="The pretrained model."),
    ft: str = typer.Option(..., "--ft", help="The fine-tune."),
    output: Path = OUTPUT,
    sparsity: Optional[float] = typer.Option(None, help="Fraction of the selected entries taken from the fine-tune."),
    k: Optional[int] = K,
    include: Optional[List[str]] = INCLUDE,
    exclude: Optional[List[str]] = EXCLUDE,
    mask_out: Optional[Path] = typer.Option(None, "--mask-out", help="Also write the mask as a mask file."),
    mask: Optional[Path] = typer.Option(None, "--mask", help="Graft by this mask file instead of a top-k."),
    learn: bool = typer.Option(False, "--learn", help="Train the mask from the top-k one on --data (the paper's method)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Training JSONL for --learn: text (and label)."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Validation JSONL for choosing the best mask."),
    task: str = typer.Option("classification", help="With --learn: classification (text, label) or lm (text)."),
    epochs: int = typer.Option(5, help="With --learn: passes over --data."),
    lr: float = typer.Option(1e7, help="With --learn: learning rate of the mask logits (the paper's 1e7)."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP.replace("first input", "base")),
    device: str = DEVICE,
    max_shard_size: str = SHARD,
    force: bool = FORCE,
    quiet: bool = QUIET,
) -> None:
    """Model grafting: BASE + gamma * (FT - BASE), gamma the global top-k of |FT - BASE|, a mask
    file, or (--learn) a mask trained from the top-k one.

    By default only tensors inside numbered blocks are grafted (embeddings, final norm and heads come
    from the base, as in the paper); --include replaces that choice."""
    if mask is None and (sparsity is None) == (k is None):
        fail("give one of --sparsity and --k (or --mask)")
    if learn and data is None:
        fail("--learn needs --data")
    with reported_errors(), tensor_progress("graft", quiet) as progress:
        from surgery.recipes.graft import graft as run

        out = run(base, ft, output, sparsity=sparsity, k=k, include=include or (), exclude=exclude or (),
                  mask_out=mask_out, mask=mask, learn=learn, data=data, eval_data=eval_data, task=task,
                  epochs=epochs, lr=lr, dtype=dtype, device=device, max_shard_size=max_shard_size, force=force,
                  progress=progress)
    typer.echo(f"wrote {out}" + (f" and {mask_out}" if mask_out else ""))


mask_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                       help="Inspect mask files: density, and overlap between tasks.")


@mask_app.command("stats")
def mask_stats(
    mask: Path = typer.Argument(..., help="A mask file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (every tensor and layer)."),
) -> None:
    """Density per layer (and, with --json, per tensor)."""
    with reported_errors():
        from surgery.recipes.mask_report import stats

        report = stats(mask)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{report['mask']}: {report['kept']} of {report['total']} entries kept "
               f"(density {report['density']:.6g})")
    width = max(len(k) for k in report["layers"])
    for layer, row in report["layers"].items():
        typer.echo(f"  {layer:<{width}}  {row['kept']:>12}  of {row['numel']:>12}  density {row['density']:.6g}")


@mask_app.command("overlap")
def mask_overlap(
    masks: List[Path] = typer.Argument(..., help="Two or more mask files."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with per-layer figures)."),
) -> None:
    """Intersection over union and overlap coefficient of every pair of masks."""
    if len(masks) < 2:
        fail("give at least two masks")
    with reported_errors():
        from surgery.recipes.mask_report import overlap

        report = overlap(masks)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for p in report["pairs"]:
        typer.echo(f"{p['a']}  x  {p['b']}: intersection {p['intersection']}, IoU {p['iou']:.6g}, "
                   f"overlap {p['overlap']:.6g}")


sft_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                      help="Sparse fine-tunes: extract, apply (compose by addition), revert.")


@sft_app.command("extract")
@writes_model(content_hashes=False)  # an SFT file records its base's content hash always
def sft_extract(
    base: str = typer.Option(..., "--base", help="The model the fine-tune started from."),
    ft: str = typer.Option(..., "--ft", help="The fine-tune."),
    output: Path = typer.Option(..., "--output", "-o", help="The SFT file to write."),
    density: Optional[float] = typer.Option(None, help="Fraction of the selected entries kept."),
    k: Optional[int] = K,
    include: Optional[List[str]] = INCLUDE,
    exclude: Optional[List[str]] = EXCLUDE,
    dense: Optional[List[str]] = typer.Option(None, "--dense", help="Regex of tensors stored whole (e.g. a head)."),
    device: str = DEVICE,
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
    quiet: bool = QUIET,
) -> None:
    """Keep the exact global top-k changed entries of FT over BASE as a sparse fine-tune file."""
    if (density is None) == (k is None):
        fail("give one of --density and --k")
    with reported_errors(), tensor_progress("sft extract", quiet) as progress:
        from surgery.recipes.sft import extract

        out = extract(base, ft, output, density=density, k=k, include=include or (), exclude=exclude or (),
                      dense=dense or (), device=device, force=force, progress=progress)
    typer.echo(f"wrote {out}")


SFTS = typer.Option(..., "--sft", help="An SFT file (or composable-sft pytorch_diff.bin with --allow-pickle); repeatable.")


def _sft_command(revert: bool):
    """``sft apply`` and ``sft revert``: one signature, the sign differs."""

    def command(
        model: str = typer.Argument(..., help="The model to " + ("subtract the SFTs from." if revert else "add the SFTs to.")),
        sfts: List[str] = SFTS,
        output: Path = OUTPUT,
        allow_pickle: bool = ALLOW_PICKLE,
        config_from: Optional[str] = typer.Option(None, help=CONFIG_HELP.replace("the first input", "the model")),
        device: str = DEVICE,
        max_shard_size: str = SHARD,
        force: bool = FORCE,
        quiet: bool = QUIET,
    ) -> None:
        if not sfts:
            fail("give at least one --sft")
        with reported_errors(), tensor_progress("sft revert" if revert else "sft apply", quiet) as progress:
            from surgery.recipes.sft import apply

            out = apply(model, sfts, output, revert=revert, allow_pickle=allow_pickle, config_from=config_from,
                        device=device, max_shard_size=max_shard_size, force=force, progress=progress)
        typer.echo(f"wrote {out}")

    command.__doc__ = ("MODEL - SFT_1 - SFT_2 - ...: undo an apply." if revert else
                       "MODEL + SFT_1 + SFT_2 + ... in one streamed pass.")
    return command


def _sft_step(revert: bool):
    return lambda kw: ("sft_revert" if revert else "sft_apply",
                       {"model": kw["model"], "sfts": kw["sfts"], "allow_pickle": kw["allow_pickle"],
                        "config_from": kw.get("config_from")})


sft_app.command("apply")(prints_recipe(_sft_step(False))(writes_model()(_sft_command(False))))
sft_app.command("revert")(prints_recipe(_sft_step(True))(writes_model()(_sft_command(True))))
