"""Spectral analysis of fine-tunes: intruder dimensions ("LoRA vs Full Fine-tuning: An Illusion of
Equivalence"), spectrum change, effective rank and subspace energy of the update, a cached base SVD,
reports with figures, and intruder mitigation.

    analyze(base, [ft, ...])               -> SpectralResult          (analyze.py)
    write_report(result, folder)           JSON, CSV, PNG, HTML       (report.py, plots.py)
    spectral_report(base, [ft], folder)    both, plus --mitigate      (recipe.py)
    reduce_intruders(base, ft, out)        the mitigated checkpoint   (mitigate.py)
"""
from __future__ import annotations

from .analyze import DEFAULT_EPSILONS, analyze
from .mitigate import reduce_intruders
from .recipe import spectral_report
from .report import write_report
from .result import FineTuneResult, MatrixResult, SpectralResult

__all__ = ["analyze", "write_report", "spectral_report", "reduce_intruders", "SpectralResult", "FineTuneResult",
           "MatrixResult", "DEFAULT_EPSILONS"]
