"""Intruder mitigation: ``W' = W_ft + (lambda - 1) * sum_{j intruder} s_j u_j v_j^T``.

As PEFT's ``reduce_intruder_dimension`` (defaults top_k=10, epsilon=0.5, lambda=0.75): the intruders
and their triplets come from the SVD of the fine-tuned matrix itself (not of the update), and the
correction is applied in float32. The analysis hands each corrected matrix's intruder triplets to a
:class:`CorrectionWriter` as it streams, which stores them as two low-rank factors in a small
safetensors file per matrix (so memory stays a few matrices); the writing pass then opens that
folder as a second input, and each corrected tensor is the registered operation
``add_low_rank(W_ft, left, right) = W_ft + left @ right`` (:mod:`surgery.ops.low_rank`); every other tensor is copied as is.
lambda = 1 changes nothing and writes no factors: the output is the fine-tune, bit for bit.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..engine.plan import Call, OutputTensor, Plan, Ref
from ..errors import PlanError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.writer import DEFAULT_MAX_SHARD_SIZE

LEFT, RIGHT = ".intruder_left", ".intruder_right"
DEFAULT_LAMBDA = 0.75

class CorrectionWriter:
    """Receives intruder triplets from :func:`surgery.spectral.analyze.analyze` for fine-tune
    ``ft_index`` and writes ``left = (lambda - 1) * U_I * S_I`` (m, j) and ``right = Vh_I`` (j, n),
    float32, one file per matrix in ``folder``."""

    def __init__(self, folder: Path, mitigation_lambda: float, ft_index: int = 0):
        self.folder = Path(folder)
        self.mitigation_lambda = float(mitigation_lambda)
        self.ft_index = ft_index
        self.corrected: dict[str, int] = {}  # matrix -> intruders removed

    def __call__(self, ft_index: int, name: str, u, s, vh) -> None:
        if ft_index != self.ft_index or self.mitigation_lambda == 1.0:
            return
        from safetensors.torch import save_file

        left = (u.float() * s.float()[None, :]) * (self.mitigation_lambda - 1.0)
        save_file({name + LEFT: left.contiguous().cpu(), name + RIGHT: vh.float().contiguous().cpu()},
                  str(self.folder / f"{len(self.corrected):06d}.safetensors"), metadata={"format": "pt"})
        self.corrected[name] = int(u.shape[1])


def write_mitigated(ft: Checkpoint, corrections: CorrectionWriter, output, recipe: dict, *, base=None,
                    force: bool = False, device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                    progress=None) -> Path:
    """Stream the fine-tune into ``output`` with the corrections added (config, tokenizer, card come
    along). A LoRA adapter ``ft`` is merged onto ``base`` on the way (lazily, per tensor), and the
    corrections go on top of the merged weights: the output is a full checkpoint."""
    return mitigated(ft, corrections, recipe, base=base).save(output, device=device, max_shard_size=max_shard_size,
                                                              force=force, progress=progress)


def mitigated(ft: Checkpoint, corrections: CorrectionWriter, recipe: dict, *, base=None, dtype: str | None = None):
    """The mitigated fine-tune as a lazy :class:`~surgery.recipes.built.Built`, valid while the
    corrections' folder exists."""
    from ..lazy import Lazy, from_checkpoint
    from ..lora import adapted, is_adapter
    from ..recipes.built import Built
    from ..recipes.run import parse_dtype

    if is_adapter(ft):
        merged = adapted(ft, base)
        lazy, tokenizer_from = merged.lazy, merged.tokenizer_from
    else:
        lazy, tokenizer_from = from_checkpoint(ft), ft.root
    inputs = list(lazy.inputs)
    factors = len(inputs)
    if corrections.corrected:
        ckpt = open_checkpoint(corrections.folder)
        ckpt.source = "intruder corrections (computed by the analysis, not kept)"
        inputs.append(ckpt)
    tensors = {n: OutputTensor(t.spec, Call.of("add_low_rank", [t.expr, Ref(factors, n + LEFT), Ref(factors, n + RIGHT)])
                               if n in corrections.corrected else t.expr) for n, t in lazy.tensors.items()}
    out = Lazy(tuple(inputs), tensors, {}, None, ({"reduce_intruders": [ft.source]},)).with_dtype(parse_dtype(dtype))
    return Built(out, recipe, ("intruder-mitigation",), config_from=inputs[0].root, tokenizer_from=tokenizer_from,
                 layout=inputs[0], compute_dtype="F32")


def build_reduce_intruders(base, ft, *, scratch: Path, mitigation_lambda: float = DEFAULT_LAMBDA, k: int = 10,
                           epsilon: float = 0.5, include=None, ft_svd: str = "auto", cache_dir=None,
                           device: str = "auto", dtype: str | None = None):
    """Intruder mitigation as a recipe step: the analysis runs here (its corrections go to
    ``scratch``, which must outlive the step), the writing pass streams later. ``base`` and ``ft``
    are checkpoints (or ``ft`` a LoRA adapter): the analysis reads stored matrices."""
    from ..recipes.built import is_built
    from .analyze import analyze

    if is_built(base) or is_built(ft):
        raise PlanError("reduce_intruders analyses stored matrices: give checkpoints as base and ft "
                        "(save that step with save: PATH and use the saved model)")
    check_lambda(mitigation_lambda)
    ft_ckpt = ft if isinstance(ft, Checkpoint) else open_checkpoint(ft)
    base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    Path(scratch).mkdir(parents=True, exist_ok=True)
    sink = CorrectionWriter(Path(scratch), mitigation_lambda)
    result = analyze(base_ckpt, [ft_ckpt], include, k, (epsilon,), cache_dir, device, epsilon=epsilon,
                     ft_svd=ft_svd, corrections=sink)
    return mitigated(ft_ckpt, sink, mitigation_recipe(result, sink), base=base_ckpt, dtype=dtype)


def reduce_intruders(base, ft, output, *, mitigation_lambda: float = DEFAULT_LAMBDA, k: int = 10,
                     epsilon: float = 0.5, include=None, cache_dir=None, device: str = "auto", ft_svd: str = "auto",
                     force: bool = False, max_shard_size=DEFAULT_MAX_SHARD_SIZE, progress=None):
    """Analyse ``ft`` against ``base`` and write the mitigated fine-tune to ``output``; returns
    ``(output path, SpectralResult)``."""
    from .analyze import analyze

    check_lambda(mitigation_lambda)
    ft_ckpt = ft if isinstance(ft, Checkpoint) else open_checkpoint(ft)
    with tempfile.TemporaryDirectory(prefix="surgery-intruders-") as tmp:
        sink = CorrectionWriter(Path(tmp), mitigation_lambda)
        result = analyze(base, [ft_ckpt], include, k, (epsilon,), cache_dir, device, epsilon=epsilon, ft_svd=ft_svd,
                         corrections=sink)
        out = write_mitigated(ft_ckpt, sink, output, mitigation_recipe(result, sink), base=base, force=force,
                              device=device, max_shard_size=max_shard_size, progress=progress)
    return out, result


def mitigation_recipe(result, sink: CorrectionWriter) -> dict:
    return {"operation": "reduce_intruders", "base": result.base, "ft": result.fine_tunes[sink.ft_index].label,
            "lambda": sink.mitigation_lambda, "top_k": result.k, "epsilon": result.epsilon,
            "formula": "W_ft + (lambda - 1) * sum over intruders of s_j u_j v_j^T (SVD of W_ft, float32)",
            "corrected": dict(sink.corrected)}


def check_lambda(value: float) -> None:
    if not isinstance(value, (int, float)) or value != value:
        raise PlanError(f"--mitigate needs a number lambda, got {value!r}")
