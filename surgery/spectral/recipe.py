"""``spectral_report``: what ``surgery spectral`` runs: analyse, write the report, optionally mitigate."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import PlanError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.output import check_output
from ..io.writer import DEFAULT_MAX_SHARD_SIZE
from .analyze import DEFAULT_EPSILONS, analyze
from .mitigate import CorrectionWriter, check_lambda, mitigation_recipe, write_mitigated
from .report import write_report


def spectral_report(base, fts: Sequence, output, *, include=None, k: int = 10, epsilon: float = 0.5,
                    epsilons: Sequence[float] = DEFAULT_EPSILONS, cache_dir=None, device: str = "auto",
                    ft_svd: str = "auto", heatmap: str | None = None, mitigate: float | None = None,
                    mitigated_out=None, force: bool = False, max_shard_size=DEFAULT_MAX_SHARD_SIZE, progress=None):
    """Analyse ``fts`` against ``base`` (see :func:`.analyze.analyze`), write the report folder
    ``output`` (see :mod:`.report`) and, with ``mitigate`` (lambda) and ``mitigated_out`` (then ``fts``
    holds one checkpoint), the fine-tune with its intruders scaled by lambda (see :mod:`.mitigate`),
    from the same analysis pass.

    Returns ``(SpectralResult, report folder, mitigated folder or None)``."""
    if (mitigate is None) != (mitigated_out is None):
        raise PlanError("--mitigate LAMBDA and --mitigated-out DIR go together")
    if isinstance(fts, (str, os.PathLike, Checkpoint)):
        raise PlanError("fts must be a list of fine-tunes, not a single one")
    opened = [open_checkpoint(f) if isinstance(f, (str, os.PathLike)) else f for f in fts]
    roots = [c.root for c in opened if isinstance(c, Checkpoint)]
    base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    check_output(output, [base_ckpt.root] + roots, force)
    if mitigate is None:
        result = analyze(base_ckpt, opened, include, k, epsilons, cache_dir, device, epsilon=epsilon, ft_svd=ft_svd,
                         progress=progress)
        return result, write_report(result, output, heatmap=heatmap, force=force), None
    check_lambda(mitigate)
    if len(opened) != 1 or not isinstance(opened[0], Checkpoint):
        raise PlanError("--mitigate works on exactly one --ft, a checkpoint or a LoRA adapter")
    check_output(mitigated_out, [base_ckpt.root] + roots, force)
    if Path(mitigated_out).resolve() == Path(output).resolve():
        raise PlanError("--mitigated-out must differ from the report folder")
    with tempfile.TemporaryDirectory(prefix="surgery-intruders-") as tmp:
        sink = CorrectionWriter(Path(tmp), mitigate)
        result = analyze(base_ckpt, opened, include, k, epsilons, cache_dir, device, epsilon=epsilon, ft_svd=ft_svd,
                         progress=progress, corrections=sink)
        report = write_report(result, output, heatmap=heatmap, force=force)
        mitigated = write_mitigated(opened[0], sink, mitigated_out, mitigation_recipe(result, sink), base=base_ckpt,
                                    force=force, device=device, max_shard_size=max_shard_size, progress=progress)
    return result, report, mitigated
