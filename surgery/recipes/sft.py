"""``surgery sft extract | apply | revert``: sparse fine-tunes, composed by addition in one pass."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Sequence

from ..engine.plan import Call, OutputTensor, Plan, Ref
from ..engine.topk import global_topk, narrow_difference
from ..errors import PlanError
from ..io import composable_sft
from ..io.checkpoint import open_checkpoint, open_checkpoints
from ..ops.sparse import tie_quota
from ..io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec
from ..sft import VALUE_DTYPE, SparseFineTune, metadata
from .run import content_hash, write_single_file
from .selection import _compile, candidates, keep_count, numel

ONE_FILE = 1 << 62  # a shard limit no SFT reaches: the SFT is one file


def extract(base, ft, output, *, density: float | None = None, k: int | None = None, include: Sequence[str] = (),
            exclude: Sequence[str] = (), dense: Sequence[str] = (), device: str = "auto", force: bool = False,
            progress=None) -> Path:
    """Write the SFT of ``ft`` over ``base``: the exact global top-k entries of |ft - base| over the
    selected tensors (default: every float tensor both have with the same shape), ``dense`` regexes
    stored whole, tensors the base lacks stored as absolute values. Three streamed passes; the base's
    content hash is taken in the first."""
    ckpts = open_checkpoints([base, ft])
    b, f = ckpts
    dense_res = [_compile(p, "--dense") for p in dense]
    comparable = candidates(b, f, include, exclude, default_blocks_only=False)
    dense_names = [n for n in comparable if any(p.search(n) for p in dense_res)]
    sparse_names = [n for n in comparable if n not in set(dense_names)]
    absolute = [n for n, info in f.tensors.items()
                if b.resolve(n) is None or tuple(b.resolve(n).shape) != tuple(info.shape)]
    total = sum(numel(f, n) for n in sparse_names)
    keep = keep_count(total, density, k)
    items = [(n, [Call.of("sub", [Ref(1, n), Ref(0, n)])]) for n in sparse_names]
    digests: dict = {}
    topk = global_topk(ckpts, items, [keep], device, digests=digests, hash_inputs=[0])[0]
    tensors, info = [], {}
    for n in sparse_names:
        kept = topk.kept[n]
        if not kept:
            continue
        vdt = VALUE_DTYPE.get(b.resolve(n).dtype, "F64")
        params = {"threshold_bits": topk.threshold_bits, "quota": tie_quota(topk.quota[n], topk.ties[n])}
        # indices as wide as the values, so the two entries sit side by side in the file and the
        # writing pass reads their inputs once
        idt = "I32" if vdt == "F32" and numel(f, n) < 2**31 else "I64"
        indices = Call.of("sparse_indices", [Ref(0, n), Ref(1, n)], **params)
        tensors += [OutputTensor(TensorSpec(n + ".indices", idt, (kept,)), indices),
                    OutputTensor(TensorSpec(n + ".values", vdt, (kept,)),
                                 Call.of("sparse_values", [Ref(0, n), Ref(1, n), indices]))]
        info[n] = {"kind": "sparse", "shape": list(f.resolve(n).shape), "dtype": b.resolve(n).dtype, "kept": kept}
    for n in dense_names:
        shape = tuple(f.resolve(n).shape)
        tensors.append(OutputTensor(TensorSpec(n + ".delta", VALUE_DTYPE.get(b.resolve(n).dtype, "F64"), shape),
                                    Call.of("sub", [Ref(1, n), Ref(0, n)])))
        info[n] = {"kind": "dense", "shape": list(shape), "dtype": b.resolve(n).dtype, "kept": math.prod(shape)}
    for n in absolute:
        fi = f.resolve(n)
        tensors.append(OutputTensor(TensorSpec(n + ".absolute", fi.dtype, tuple(fi.shape)), Ref(1, n)))
        info[n] = {"kind": "absolute", "shape": list(fi.shape), "dtype": fi.dtype, "kept": math.prod(fi.shape)}
    recipe = {"operation": "sft_extract", "base": b.source, "ft": f.source, "density": density, "k": keep,
              "selected_entries": total, "threshold": topk.threshold, "include": list(include),
              "exclude": list(exclude), "dense": list(dense)}
    meta = metadata(info, base=b.source, base_sha256=content_hash(digests, 0), recipe=recipe, total=total)
    # float32 values of narrow inputs' differences are exact roundings (see engine.topk.narrow_difference)
    narrow = all(narrow_difference(e, ckpts) and VALUE_DTYPE[b.resolve(n).dtype] == "F32" for n, (e,) in items) \
        and all(VALUE_DTYPE.get(b.resolve(n).dtype) == "F32" for n in dense_names)
    plan = Plan([c.source for c in ckpts], tensors, ONE_FILE, recipe=recipe, compute_dtype="F32" if narrow else "F64",
                metadata=meta)
    return write_single_file(plan, output, ckpts, force=force, device=device, progress=progress)


def apply(model, sfts: Sequence, output, *, revert: bool = False, allow_pickle: bool = False,
          config_from=None, device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False,
          progress=None) -> Path:
    """``model + sft_1 + sft_2 + ...`` (or minus, with ``revert``) in one streamed pass, each sum in
    float64 and rounded once to the model's dtype. Absolute tensors (a new head) replace or add
    tensors on apply and are left alone on revert. composable-sft ``pytorch_diff.bin`` files (or
    folders holding one) are read with ``allow_pickle``."""
    with tempfile.TemporaryDirectory(prefix="surgery-sft-") as scratch:
        built = build_apply(model, sfts, revert=revert, allow_pickle=allow_pickle, config_from=config_from,
                            scratch=Path(scratch))
        return built.save(output, device=device, max_shard_size=max_shard_size, force=force, progress=progress)


def build_apply(model, sfts: Sequence, *, revert: bool = False, allow_pickle: bool = False, config_from=None,
                scratch: Path):
    """The SFT sum as a lazy :class:`~surgery.recipes.built.Built`, valid while ``scratch`` (where
    pickled composable-sft files are converted) exists. ``model`` is a checkpoint."""
    from ..lazy import Lazy
    from .built import Built, is_built

    if is_built(model):
        raise PlanError("sft apply/revert takes a checkpoint as its model; save that step (save: PATH) first")
    opened = [_open_sft(s, allow_pickle, scratch / f"{i}.sft") for i, s in enumerate(sfts)]
    from ..io.checkpoint import Checkpoint

    m = model if isinstance(model, Checkpoint) else open_checkpoint(model, allow_pickle=allow_pickle)
    ckpts = [m] + [s.checkpoint for s in opened]
    sign = -1.0 if revert else 1.0
    parts: dict[str, list[tuple[int, str]]] = {}
    added: dict[str, tuple[int, dict]] = {}
    problems = []
    for j, s in enumerate(opened, start=1):
        for n, t in s.tensors.items():
            target = m.resolve(n)
            if t["kind"] == "absolute":
                if revert:
                    continue  # the base's own values are not in the SFT: nothing to restore
                if target is not None:
                    parts.setdefault(n, []).append((j, "absolute"))
                else:
                    added[n] = (j, t)
                continue
            if target is None:
                problems.append(f"{s.checkpoint.source}: tensor {n} is not in the model {m.source}")
            elif list(target.shape) != list(t["shape"]):
                problems.append(f"{s.checkpoint.source}: tensor {n} has shape {t['shape']}, "
                                f"the model's is {list(target.shape)}")
            else:
                parts.setdefault(n, []).append((j, t["kind"]))
    if problems:
        raise PlanError("; ".join(problems))
    tensors = [OutputTensor(TensorSpec(n, info.dtype, tuple(info.shape)), _expr(n, parts.get(n, []), sign))
               for n, info in m.tensors.items()]
    tensors += [OutputTensor(TensorSpec(n, t["dtype"], tuple(t["shape"])), Ref(j, n + ".absolute"))
                for n, (j, t) in added.items()]
    recipe = {"operation": "sft_revert" if revert else "sft_apply", "model": m.source,
              "sfts": [str(s) for s in sfts], "sft_bases": [s.base for s in opened]}
    lazy = Lazy(tuple(ckpts), {t.spec.name: t for t in tensors}, {}, None, ({"sft": recipe["operation"]},))
    sidecars = config_from if config_from is not None else m.root
    return Built(lazy, recipe, ("sft",), config_from=sidecars, layout=m, compute_dtype="F64")


def revert(model, sfts: Sequence, output, **kwargs) -> Path:
    """``model - sft_1 - sft_2 - ...``: undo :func:`apply`."""
    return apply(model, sfts, output, revert=True, **kwargs)


def _expr(name: str, parts: list[tuple[int, str]], sign: float):
    expr = Ref(0, name)
    absolute = [j for j, kind in parts if kind == "absolute"]
    if len(absolute) > 1:
        raise PlanError(f"tensor {name}: absolute values in more than one SFT")
    if absolute:
        return Ref(absolute[0], name + ".absolute")
    sparse = [j for j, kind in parts if kind == "sparse"]
    dense = [j for j, kind in parts if kind == "dense"]
    if sparse:
        args = [expr] + [Ref(j, name + s) for j in sparse for s in (".indices", ".values")]
        expr = Call.of("scatter_add", args, signs=[sign] * len(sparse))
    if dense:
        expr = Call.of("add_dense", [expr] + [Ref(j, name + ".delta") for j in dense], signs=[sign] * len(dense))
    return expr


def _open_sft(path, allow_pickle: bool, scratch: Path) -> SparseFineTune:
    diff = composable_sft.find(path)
    if diff is None:
        return SparseFineTune.open(path)
    if not allow_pickle:
        raise PlanError(f"{diff} is a pickled composable-sft file; pass --allow-pickle to read it "
                        "(loaded with torch.load(weights_only=True))")
    return SparseFineTune.open(convert_pytorch_diff(diff, scratch))


def convert_pytorch_diff(path, output) -> Path:
    """Rewrite a composable-sft ``pytorch_diff.bin`` as a surgery SFT file (values kept as stored)."""
    import torch
    from safetensors.torch import save_file

    from ..io.read import SAFETENSORS_DTYPES

    sparse, absolute = composable_sft.read(path)
    tensors, info = {}, {}
    for n, (shape, idx, values) in sparse.items():
        tensors[n + ".indices"] = torch.from_numpy(idx)
        tensors[n + ".values"] = values.contiguous()
        info[n] = {"kind": "sparse", "shape": list(shape), "dtype": SAFETENSORS_DTYPES[values.dtype], "kept": int(idx.size)}
    for n, t in absolute.items():
        tensors[n + ".absolute"] = t.contiguous()
        info[n] = {"kind": "absolute", "shape": list(t.shape), "dtype": SAFETENSORS_DTYPES[t.dtype], "kept": t.numel()}
    meta = metadata(info, base="", base_sha256=None, recipe={"operation": "convert", "from": str(path)})
    save_file(tensors, str(output), metadata=meta)
    return Path(output)
