"""notebooks/spectral_report.ipynb runs headless and produces its report and figures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "spectral_report.ipynb"
FIGURES = {"intruders_vs_epsilon.png", "intruders_per_layer.png", "similarity_heatmap.png", "spectra.png"}


def test_the_notebook_runs_and_makes_its_figures(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("SPECTRAL_REPORT_DIR", str(tmp_path / "report"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    report = tmp_path / "report"
    assert FIGURES <= {p.name for p in report.iterdir()}
    for name in FIGURES:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((report / "spectral.json").read_text())
    dense, rank1 = data["fine_tunes"]
    assert rank1["intruders"] > dense["intruders"]  # the paper's qualitative claim, on real weights
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "image/png" in o.get("data", {})]
    assert len(shown) == 4  # each figure displayed inline
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
