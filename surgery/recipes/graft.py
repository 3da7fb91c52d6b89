"""``surgery graft``: keep the fine-tune's change only on its largest entries (model grafting,
"Task-Specific Skill Localization in Fine-tuned Language Models").

theta = base + gamma * (ft - base), gamma the exact global top-k of |ft - base| over the selected
tensors: two streamed statistics passes and one writing pass, so each input is read three times.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from ..engine.plan import Call, OutputTensor, Plan, Ref
from ..engine.topk import TopK, global_topk
from ..io.checkpoint import open_checkpoints
from ..io.output import OutputFile
from ..io.safetensors_header import FLOAT_DTYPES
from .. import masks
from ..io.writer import DEFAULT_MAX_SHARD_SIZE, Shard, ShardWriter, TensorSpec
from .run import parse_dtype, run_plan
from .selection import candidates, keep_count, numel


def graft(base, ft, output, *, sparsity: float | None = None, k: int | None = None, include: Sequence[str] = (),
          exclude: Sequence[str] = (), mask_out=None, dtype: str | None = None, device: str = "auto",
          max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False, progress=None) -> Path:
    """Write the grafted model to ``output`` (config and tokenizer from the fine-tune) and, with
    ``mask_out``, the mask as a mask file. Tensors outside the selection come from the base (from
    the fine-tune where the base lacks them or has another shape)."""
    ckpts = open_checkpoints([base, ft])
    b, f = ckpts
    names = candidates(b, f, include, exclude)
    total = sum(numel(f, n) for n in names)
    keep = keep_count(total, sparsity, k)
    items = [(n, [Call.of("sub", [Ref(1, n), Ref(0, n)])]) for n in names]
    topk = global_topk(ckpts, items, [keep], device)[0]
    out_dtype = parse_dtype(dtype)
    chosen = set(names)
    tensors = []
    for name, info in f.tensors.items():
        in_base = b.resolve(name)
        source = 0 if in_base is not None and tuple(in_base.shape) == tuple(info.shape) else 1
        like = in_base if source == 0 else info
        spec_dtype = out_dtype if out_dtype and like.dtype in FLOAT_DTYPES else like.dtype
        if name in chosen:
            expr = Call.of("graft", [Ref(0, name), Ref(1, name)], threshold_bits=topk.threshold_bits,
                           quota=topk.quota[name])
        else:
            expr = Ref(source, name)
        tensors.append(OutputTensor(TensorSpec(name, spec_dtype, tuple(info.shape)), expr))
    recipe = {"operation": "graft", "base": b.source, "ft": f.source, "sparsity": sparsity, "k": keep,
              "selected_entries": total, "threshold": topk.threshold, "include": list(include),
              "exclude": list(exclude), "dtype": dtype}
    plan = Plan([c.source for c in ckpts], tensors, max_shard_size, recipe=recipe, compute_dtype="F64")
    if mask_out is None:
        return run_plan(plan, output, ckpts, force=force, config_from=1, tokenizer_from=f.root,
                        tags=("graft",), device=device, progress=progress)
    with OutputFile(mask_out, [c.root for c in ckpts], force) as tmp_mask:
        writer = _mask_writer(tmp_mask, plan, topk, names, recipe)
        tap = _mask_tap(writer, set(names), topk)
        out = run_plan(plan, output, ckpts, force=force, config_from=1, tokenizer_from=f.root,
                       tags=("graft",), device=device, progress=progress, tap=tap)
        writer.close()
    return out


def _mask_writer(path: Path, plan: Plan, topk: TopK, names: Sequence[str], recipe: dict) -> ShardWriter:
    """A mask file laid out in the order the writing pass computes tensors (every entry is a
    multiple of 8 bytes, so any order stays aligned)."""
    chosen = set(names)
    order = [spec for shard in plan.shards() for spec in shard.tensors if spec.name in chosen]
    info = {s.name: {"shape": list(s.shape), "kept": topk.kept[s.name],
                     "encoding": masks.encoding_for(math.prod(s.shape), topk.kept[s.name])} for s in order}
    specs = tuple(masks.entry_spec(s.name, math.prod(s.shape), topk.kept[s.name]) for s in order)
    shard = Shard(path.name, specs, masks.metadata(info, recipe))
    return ShardWriter(path.parent, shard)


def _mask_tap(writer: ShardWriter, chosen: set[str], topk: TopK):
    import numpy as np

    from ..ops.sparse import selection

    def tap(name: str, loaded: dict) -> None:
        if name not in chosen:
            return
        pair = [loaded[Ref(0, name)], loaded[Ref(1, name)]]
        mask = np.empty(pair[0].numel(), dtype=bool)
        for start, stop, *_, piece in selection(pair, topk.threshold_bits, topk.quota[name]):
            mask[start:stop] = piece.cpu().numpy()
        writer.write(name, masks.encode(mask, masks.encoding_for(mask.size, topk.kept[name])))

    return tap
