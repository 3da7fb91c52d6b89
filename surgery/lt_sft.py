"""LT-SFT training ("Composable Sparse Fine-Tuning for Cross-Lingual Transfer", Ansell et al. 2022).

Lottery-ticket sparse fine-tuning, one round: fine-tune fully from theta0, keep the K entries that
moved most (|theta1 - theta0|, globally), reset to theta0, fine-tune again with gradients masked to
those entries, and export the difference as an SFT file. Norm layers stay frozen throughout and
parameters the base lacks (a new head) are trained densely, as the paper's code does. Frozen and
unselected entries stay bit-identical to theta0: their gradients are zero and they get no weight
decay, so Adam moves them by exactly nothing.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .errors import PlanError
from .sft import VALUE_DTYPE, metadata

NORM = r"(?i)(layer_?norm|\bln_|\.norm\.|rmsnorm|\.ln\d*\.)"


@dataclass
class LTSFTResult:
    model: object  # the trained model (theta0 + the sparse and dense changes)
    theta0: dict  # name -> the starting values of every trained parameter
    mask: dict  # name -> bool tensor: the sparse entries that were trained
    dense: list[str] = field(default_factory=list)  # trained whole
    absolute: list[str] = field(default_factory=list)  # not in the base: stored as values


def train_lt_sft(model, batches: Callable[[], Iterable[dict]], *, k: int, full_steps: int, sparse_steps: int,
                 lr: float = 5e-5, sparse_lr: float | None = None, weight_decay: float = 0.0,
                 base_names: Sequence[str] | None = None, include: str | None = None, exclude: str | None = NORM,
                 dense: str | None = None, loss_fn: Callable | None = None, device: str = "cpu",
                 masks: dict | None = None) -> LTSFTResult:
    """Train ``model`` (a torch module whose current weights are theta0) with LT-SFT.

    ``batches()`` returns an iterable of keyword-argument dicts for the model (cycled as needed);
    the loss is ``loss_fn(model, batch)`` or ``model(**batch).loss``. ``base_names``: parameters the
    base checkpoint has (others are a new head, trained densely and exported as absolute values);
    ``include``/``exclude``/``dense``: regexes over parameter names choosing the sparse candidates,
    the frozen ones (default: norms) and those trained whole. ``k`` entries are selected over all
    sparse candidates together. ``masks`` (name -> bool tensor) skips the full fine-tune and the
    selection and trains those entries instead (a random-mask control, say)."""
    import torch

    model.to(device).train()
    params = dict(model.named_parameters())
    in_base = set(params) if base_names is None else set(base_names)
    absolute = [n for n in params if n not in in_base]
    dense_names = [n for n in params if n in in_base and dense and re.search(dense, n)]
    sparse = [n for n in params if n in in_base and n not in dense_names
              and (include is None or re.search(include, n)) and not (exclude and re.search(exclude, n))]
    total = sum(params[n].numel() for n in sparse)
    if not 0 <= k <= total:
        raise PlanError(f"k = {k} is outside 0..{total} (the sparse candidates' entries)")
    trained = sparse + dense_names + absolute
    for n, p in params.items():
        p.requires_grad_(n in trained)
    theta0 = {n: params[n].detach().clone() for n in trained}
    loss_of = loss_fn or (lambda m, b: m(**b).loss)

    def run(steps: int, rate: float, masks: dict | None) -> None:
        groups = [{"params": [params[n] for n in sparse], "weight_decay": 0.0 if masks is not None else weight_decay},
                  {"params": [params[n] for n in dense_names + absolute], "weight_decay": weight_decay}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=rate)
        stream = itertools.cycle(list(batches()))
        for _ in range(steps):
            batch = {key: v.to(device) if hasattr(v, "to") else v for key, v in next(stream).items()}
            opt.zero_grad(set_to_none=True)
            loss_of(model, batch).backward()
            if masks is not None:
                for n in sparse:
                    if params[n].grad is not None:
                        params[n].grad.mul_(masks[n])
            opt.step()

    if masks is not None:
        unknown = sorted(set(masks) - set(sparse))
        if unknown:
            raise PlanError(f"masks for tensors that are not sparse candidates: {unknown[:5]}")
        masks = {n: masks.get(n, torch.zeros(params[n].shape, dtype=torch.bool)).to(params[n].device) for n in sparse}
        run(sparse_steps, sparse_lr or lr, {n: m.to(params[n].dtype) for n, m in masks.items()})
        model.eval()
        return LTSFTResult(model, theta0, {n: m.cpu() for n, m in masks.items()}, dense_names, absolute)
    run(full_steps, lr, None)
    with torch.no_grad():
        moved = torch.cat([(params[n].detach() - theta0[n]).abs().reshape(-1).float() for n in sparse]) \
            if sparse else torch.zeros(0)
        chosen = torch.zeros(moved.numel(), dtype=torch.bool)
        chosen[torch.argsort(-moved, stable=True)[:k]] = True  # ties: the earlier parameter, then index
        masks, at = {}, 0
        for n in sparse:
            size = params[n].numel()
            masks[n] = chosen[at:at + size].reshape(params[n].shape).to(params[n].device)
            at += size
        for n in trained:  # reset to theta0
            params[n].copy_(theta0[n])
    run(sparse_steps, sparse_lr or lr, {n: m.to(params[n].dtype) for n, m in masks.items()})
    model.eval()
    return LTSFTResult(model, theta0, {n: m.cpu() for n, m in masks.items()}, dense_names, absolute)


def export_sft(result: LTSFTResult, path, *, base=None, recipe: dict | None = None, force: bool = False) -> Path:
    """Write ``result`` as an SFT file (see :mod:`surgery.sft`), naming ``base`` (a checkpoint
    location) and its content hash; apply it to the base with ``surgery sft apply``."""
    import torch
    from safetensors.torch import save_file

    from .io.read import SAFETENSORS_DTYPES, TORCH_DTYPES

    params = dict(result.model.named_parameters())
    tensors, info = {}, {}
    for n, mask in result.mask.items():
        p, p0 = params[n].detach().cpu(), result.theta0[n].cpu()
        code = SAFETENSORS_DTYPES[p.dtype]
        vdt = TORCH_DTYPES[VALUE_DTYPE.get(code, "F64")]
        flat = mask.reshape(-1)
        idx = flat.nonzero().reshape(-1)
        if not idx.numel():
            continue
        tensors[n + ".indices"] = idx.to(torch.int32 if vdt == torch.float32 and flat.numel() < 2**31 else torch.int64)
        tensors[n + ".values"] = (p.reshape(-1)[idx].to(torch.float64) - p0.reshape(-1)[idx].to(torch.float64)).to(vdt)
        info[n] = {"kind": "sparse", "shape": list(p.shape), "dtype": code, "kept": idx.numel()}
    for n in result.dense:
        p, p0 = params[n].detach().cpu(), result.theta0[n].cpu()
        code = SAFETENSORS_DTYPES[p.dtype]
        tensors[n + ".delta"] = (p.to(torch.float64) - p0.to(torch.float64)).to(TORCH_DTYPES[VALUE_DTYPE.get(code, "F64")])
        info[n] = {"kind": "dense", "shape": list(p.shape), "dtype": code, "kept": p.numel()}
    for n in result.absolute:
        p = params[n].detach().cpu().contiguous()
        tensors[n + ".absolute"] = p
        info[n] = {"kind": "absolute", "shape": list(p.shape), "dtype": SAFETENSORS_DTYPES[p.dtype], "kept": p.numel()}
    total = sum(math.prod(m.shape) for m in result.mask.values())
    base_hash = None
    if base is not None:
        from .io.checkpoint import open_checkpoint
        from .recipes.run import checkpoint_content_hash

        base_hash = checkpoint_content_hash(open_checkpoint(base))
    meta = metadata(info, base=str(base or ""), base_sha256=base_hash, recipe=recipe or {"operation": "lt_sft"},
                    total=total)
    from .io.output import OutputFile

    with OutputFile(path, [], force) as tmp:
        save_file({key: t.contiguous() for key, t in tensors.items()}, str(tmp), metadata=meta)
    return Path(path)
