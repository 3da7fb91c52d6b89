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
from ..engine.topk import TopK, global_topk, narrow_difference
from ..errors import PlanError
from ..io.checkpoint import open_checkpoints
from ..io.output import OutputFile
from ..io.safetensors_header import FLOAT_DTYPES
from .. import masks
from ..io.writer import DEFAULT_MAX_SHARD_SIZE, Shard, ShardWriter, TensorSpec
from .run import parse_dtype, run_plan
from .selection import candidates, keep_count, numel


def graft(base, ft, output, *, sparsity: float | None = None, k: int | None = None, include: Sequence[str] = (),
          exclude: Sequence[str] = (), mask_out=None, mask=None, learn: bool = False, data=None, eval_data=None,
          task: str = "classification", epochs: int = 5, lr: float = 1e7, sigmoid_bias: float = 10.0,
          batch_size: int = 16, seed: int = 0, dtype: str | None = None, device: str = "auto",
          max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False, progress=None) -> Path:
    """Write the grafted model to ``output`` (config and tokenizer from the fine-tune) and, with
    ``mask_out``, the mask as a mask file. Tensors outside the selection come from the base (from
    the fine-tune where the base lacks them or has another shape).

    The mask is the global top-k of |ft - base| (``sparsity`` or ``k``); or an existing mask file
    (``mask``); or, with ``learn``, trained from that top-k on ``data`` (JSONL, see
    :mod:`surgery.learned_graft`) and kept at its best rounded epoch on ``data`` plus ``eval_data``."""
    ckpts = open_checkpoints([base, ft])
    b, f = ckpts
    if mask is not None:
        return _graft_with_mask_file(ckpts, Path(mask), output, {"operation": "graft", "mask": str(mask)},
                                     dtype=dtype, device=device, max_shard_size=max_shard_size, force=force,
                                     progress=progress)
    built = build_graft(b, f, sparsity=sparsity, k=k, include=include, exclude=exclude, dtype=dtype, device=device)
    if learn:
        return _learned(ckpts, built.info["names"], built.info["topk"], output, built.recipe, mask_out=mask_out,
                        data=data, eval_data=eval_data, task=task, epochs=epochs, lr=lr, sigmoid_bias=sigmoid_bias,
                        batch_size=batch_size, seed=seed, dtype=dtype, device=device, max_shard_size=max_shard_size,
                        force=force, progress=progress)
    if mask_out is None:
        return built.save(output, device=device, max_shard_size=max_shard_size, force=force, progress=progress)
    plan = built.plan(max_shard_size)
    topk, names = built.info["topk"], built.info["names"]
    with OutputFile(mask_out, [c.root for c in ckpts], force) as tmp_mask:
        writer = _mask_writer(tmp_mask, plan, topk, names, plan.recipe)
        tap = _mask_tap(writer, set(names), topk, ckpts)
        out = run_plan(plan, output, ckpts, force=force, config_from=1, tokenizer_from=f.root,
                       tags=("graft",), device=device, progress=progress, tap=tap)
        writer.close()
    return out


def build_graft(base, ft, *, sparsity: float | None = None, k: int | None = None, include: Sequence[str] = (),
                exclude: Sequence[str] = (), dtype: str | None = None, device: str = "auto"):
    """The top-k graft as a lazy :class:`~surgery.recipes.built.Built` (its two statistics passes
    run here). ``base`` and ``ft`` are checkpoints: the exact top-k reads stored tensors."""
    from ..lazy import Lazy
    from .built import Built, is_built

    if is_built(base) or is_built(ft):
        raise PlanError("graft takes checkpoints as base and ft (its top-k passes read stored tensors); "
                        "save that step (save: PATH) and graft the saved model")
    if (sparsity is None) == (k is None):
        raise PlanError("give one of sparsity and k")
    ckpts = open_checkpoints([base, ft])
    b, f = ckpts
    names = candidates(b, f, include, exclude)
    total = sum(numel(f, n) for n in names)
    keep = keep_count(total, sparsity, k)
    items = [(n, [Call.of("sub", [Ref(1, n), Ref(0, n)])]) for n in names]
    topk = global_topk(ckpts, items, [keep], device)[0]
    recipe = {"operation": "graft", "base": b.source, "ft": f.source, "sparsity": sparsity, "k": keep,
              "selected_entries": total, "threshold": topk.threshold, "include": list(include),
              "exclude": list(exclude), "dtype": dtype}
    # a graft only picks stored entries; its arithmetic is the selection, which float32 decides
    # exactly for narrow inputs (see engine.topk.narrow_difference)
    precision = "F32" if all(narrow_difference(e, ckpts) for _, (e,) in items) else "F64"
    tensors = _tensors(b, f, parse_dtype(dtype), {n: _graft_expr(n, topk) for n in names})
    lazy = Lazy(tuple(ckpts), {t.spec.name: t for t in tensors}, {}, None, ({"graft": [b.source, f.source]},))
    return Built(lazy, recipe, ("graft",), tokenizer_from=f.root, config_from=f.root, layout=b,
                 compute_dtype=precision, info={"topk": topk, "names": names})


def _graft_expr(name: str, topk: TopK):
    """Elementwise where the tensor keeps none or all of its ties (all tensors but at most one)."""
    pair = [Ref(0, name), Ref(1, name)]
    quota, ties = topk.quota[name], topk.ties.get(name, 0)
    if quota == 0 or quota == ties:
        return Call.of("graft_threshold", pair, threshold_bits=topk.threshold_bits, ties=bool(quota))
    return Call.of("graft", pair, threshold_bits=topk.threshold_bits, quota=quota)


def _tensors(b, f, out_dtype: str | None, grafted: dict) -> list[OutputTensor]:
    """The fine-tune's tensors: ``grafted[name]`` where given, else the base's (the fine-tune's where
    the base lacks it or has another shape)."""
    tensors = []
    for name, info in f.tensors.items():
        in_base = b.resolve(name)
        source = 0 if in_base is not None and tuple(in_base.shape) == tuple(info.shape) else 1
        like = in_base if source == 0 else info
        spec_dtype = out_dtype if out_dtype and like.dtype in FLOAT_DTYPES else like.dtype
        tensors.append(OutputTensor(TensorSpec(name, spec_dtype, tuple(info.shape)), grafted.get(name, Ref(source, name))))
    return tensors


def _graft_with_mask_file(ckpts, mask_path: Path, output, recipe: dict, *, dtype, device, max_shard_size, force,
                          progress) -> Path:
    """Graft by the masks of a mask file (opened as a third input, its entries streamed like weights)."""
    built = build_graft_with_mask(ckpts[0], ckpts[1], mask_path, dtype=dtype, recipe=recipe)
    return built.save(output, device=device, max_shard_size=max_shard_size, force=force, progress=progress)


def build_graft_with_mask(base, ft, mask, *, dtype: str | None = None, recipe: dict | None = None):
    """The graft by a mask file's masks as a lazy :class:`~surgery.recipes.built.Built`: the mask
    is a third input, its entries streamed like weights. ``base`` and ``ft`` are checkpoints."""
    from ..io.checkpoint import open_checkpoint
    from ..lazy import Lazy
    from .built import Built, is_built

    if is_built(base) or is_built(ft):
        raise PlanError("graft takes checkpoints as base and ft; save that step (save: PATH) and graft the saved model")
    b, f = open_checkpoints([base, ft])
    mask_path = Path(mask)
    opened = masks.Mask.open(mask_path)
    for name, t in opened.tensors.items():
        if f.resolve(name) is None or b.resolve(name) is None or list(f.resolve(name).shape) != t["shape"]:
            raise PlanError(f"{mask_path}: mask tensor {name} (shape {t['shape']}) is not in both models with that shape")
    with_mask = (b, f, open_checkpoint(mask_path))
    grafted = {n: Call.of("apply_mask", [Ref(0, n), Ref(1, n), Ref(2, n)], encoding=t["encoding"])
               for n, t in opened.tensors.items()}
    recipe = {**(recipe or {"operation": "graft", "mask": str(mask_path)}), "base": b.source, "ft": f.source,
              "kept": opened.kept, "masked_entries": opened.total, "dtype": dtype}
    tensors = _tensors(b, f, parse_dtype(dtype), grafted)
    lazy = Lazy(with_mask, {t.spec.name: t for t in tensors}, {}, None, ({"graft": [b.source, f.source]},))
    return Built(lazy, recipe, ("graft",), tokenizer_from=f.root, config_from=f.root, layout=b, compute_dtype="F64")


def _learned(ckpts, names, topk: TopK, output, recipe: dict, *, mask_out, data, eval_data, task, epochs, lr,
             sigmoid_bias, batch_size, seed, dtype, device, max_shard_size, force, progress) -> Path:
    import tempfile

    import torch

    from ..io.pread import fetch_shard
    from ..learned_graft import learn_mask, read_jsonl
    from ..ops.sparse import selected, tie_quota

    if data is None:
        raise PlanError("learned grafting needs --data (JSONL with text, and label for classification)")
    b, f = ckpts
    basepatch = {}
    for n in names:  # the weight-only top-k mask, as bool tensors
        pieces = selected([b.read(n), f.read(n)], topk.threshold_bits, tie_quota(topk.quota[n], topk.ties[n]),
                          lambda *piece: piece[-1])
        basepatch[n] = torch.cat(pieces).reshape(b.resolve(n).shape)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    for file in f.files:  # transformers loads the fine-tune whole: a Hub shard known by its header comes now
        fetch_shard(file)
    learned = learn_mask(b.source, str(f.root), names, basepatch, data=read_jsonl(data, task),
                         eval_data=read_jsonl(eval_data, task) if eval_data else None, task=task, epochs=epochs,
                         lr=lr, sigmoid_bias=sigmoid_bias, batch_size=batch_size, seed=seed, device=dev)
    recipe = {**recipe, "operation": "graft_learned", "task": task, "epochs": epochs, "lr": lr,
              "sigmoid_bias": sigmoid_bias, "best_epoch": learned.best_epoch, "history": learned.history,
              "data": str(data), "eval_data": str(eval_data) if eval_data else None}
    with tempfile.TemporaryDirectory(prefix="surgery-graft-") as scratch:
        path = Path(mask_out) if mask_out is not None else Path(scratch) / "mask.safetensors"
        write_mask(path, learned.masks, recipe, force=force, inputs=[c.root for c in ckpts])
        return _graft_with_mask_file(ckpts, path, output, recipe, dtype=dtype, device=device,
                                     max_shard_size=max_shard_size, force=force, progress=progress)


def write_mask(path: Path, tensor_masks: dict, recipe: dict, *, force: bool = False, inputs=()) -> Path:
    """Write in-memory masks (name -> bool tensor or array) as a mask file, atomically."""
    import numpy as np
    from safetensors.numpy import save_file

    entries, info = {}, {}
    for name, m in tensor_masks.items():
        arr = np.asarray(m.cpu().numpy() if hasattr(m, "cpu") else m, dtype=bool)
        kept = int(arr.sum())
        encoding = masks.encoding_for(arr.size, kept)
        entries[name] = masks.encode(arr, encoding)
        info[name] = {"shape": list(arr.shape), "kept": kept, "encoding": encoding}
    with OutputFile(path, list(inputs), force) as tmp:
        save_file(entries, str(tmp), metadata=masks.metadata(info, recipe))
    return Path(path)


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


def _mask_tap(writer: ShardWriter, chosen: set[str], topk: TopK, ckpts):
    import numpy as np

    from ..ops.sparse import selected, tie_quota

    def tap(name: str, loaded: dict) -> None:
        if name not in chosen:
            return
        pair = [loaded[Ref(0, name)], loaded[Ref(1, name)]]
        if isinstance(pair[0], np.ndarray):  # the numpy path hands over stored bits: bf16 as uint16
            from ..engine.numpy_compute import widen

            pair = [widen(a, ckpts[i].resolve(name).dtype) for i, a in enumerate(pair)]
        mask = np.empty(math.prod(pair[0].shape), dtype=bool)

        def fill(start, stop, *piece):  # pieces may run on several threads: disjoint slices
            mask[start:stop] = piece[-1] if isinstance(piece[-1], np.ndarray) else piece[-1].cpu().numpy()

        selected(pair, topk.threshold_bits, tie_quota(topk.quota[name], topk.ties[name]), fill)
        writer.write(name, masks.encode(mask, masks.encoding_for(mask.size, topk.kept[name])))

    return tap
