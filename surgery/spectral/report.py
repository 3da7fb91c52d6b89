"""The report folder: JSON and CSV of every figure, the PNG figures, and one self-contained HTML page.

    spectral.json    everything (settings, per matrix, per layer, the sweep, the heat map)
    matrices.csv     one row per fine-tune and matrix (scalars, intruders per epsilon, how the SVDs were got)
    vectors.csv      one row per fine-tune, matrix and top-k index j: similarity, best base match, singular values
    sweep.csv        intruders against epsilon, per fine-tune          -> intruders_vs_epsilon.png
    layers.csv       intruders per layer, per fine-tune                -> intruders_per_layer.png
    heatmap.csv      |cos| of the chosen matrix, j by base vector i     -> similarity_heatmap.png
    spectra.csv      top-k singular values of the chosen matrix        -> spectra.png
    index.html       summary with the figures inlined (base64), no external files
"""
from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

from ..io.output import OutputFolder, check_output
from .result import SpectralResult, eps_key

FIGURES = ("intruders_vs_epsilon.png", "intruders_per_layer.png", "similarity_heatmap.png", "spectra.png")


def write_report(result: SpectralResult, folder, *, heatmap: str | None = None, force: bool = False,
                 inputs=(), plots: bool = True) -> Path:
    """Write the report into ``folder`` (which appears only when complete); returns its path."""
    out = check_output(folder, [Path(p) for p in inputs], force)
    data = result.to_dict(heatmap)
    with OutputFolder(out, force) as tmp:
        (tmp / "spectral.json").write_text(json.dumps(data, indent=1) + "\n")
        _write_csvs(tmp, result, data)
        if plots:
            _write_plots(tmp, result, data)
        (tmp / "index.html").write_text(_html(tmp, result, data, plots))
    return out


def _csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def spectra_rows(result: SpectralResult, data: dict) -> list[dict]:
    name = data["heatmap"]["matrix"]
    rows = []
    for ft in result.fine_tunes:
        m = next((x for x in ft.matrices if x.name == name), None)
        if m is None:
            continue
        for j, (b, f, u) in enumerate(zip(m.base_singular_values, m.ft_singular_values, m.update_singular_values)):
            rows.append({"ft": ft.label, "matrix": name, "index": j, "base": b, "finetuned": f, "update": u})
    return rows


def _write_csvs(tmp: Path, result: SpectralResult, data: dict) -> None:
    eps = [eps_key(e) for e in result.epsilons]
    _csv(tmp / "matrices.csv",
         ["ft", "matrix", "stack", "layer", "rows", "cols", "update_effective_rank", "update_frobenius_sq",
          "energy_left", "energy_right", "energy_both", "ft_svd", "ft_svd_iterations", "ft_svd_error_bound",
          "base_svd"] + [f"intruders_eps_{e}" for e in eps],
         ([ft.label, m.name, m.stack, m.layer, *m.shape, m.update_effective_rank, m.update_frobenius_sq,
           m.energy_in_base_topk["left"], m.energy_in_base_topk["right"], m.energy_in_base_topk["both"],
           m.ft_svd["method"], m.ft_svd["iterations"], m.ft_svd["error_bound"], m.base_svd]
          + [m.intruders[e] for e in eps] for ft in result.fine_tunes for m in ft.matrices))
    _csv(tmp / "vectors.csv",
         ["ft", "matrix", "j", "similarity", "best_base_match", "intruder", "base_singular_value",
          "ft_singular_value", "update_singular_value"],
         ([ft.label, m.name, j, m.similarity[j], m.best_match[j], int(j in m.intruder_indices),
           m.base_singular_values[j], m.ft_singular_values[j], m.update_singular_values[j]]
          for ft in result.fine_tunes for m in ft.matrices for j in range(len(m.similarity))))
    _csv(tmp / "sweep.csv", ["ft", "epsilon", "intruders"], ([r["ft"], r["epsilon"], r["intruders"]] for r in data["sweep"]))
    _csv(tmp / "layers.csv",
         ["ft", "stack", "layer", "matrices", "mean_update_effective_rank", "energy_in_base_topk_left",
          "energy_in_base_topk_right"] + [f"intruders_eps_{e}" for e in eps],
         ([ft["label"], r["stack"], r["layer"], r["matrices"], r["mean_update_effective_rank"],
           r["energy_in_base_topk_left"], r["energy_in_base_topk_right"]] + [r["intruders"][e] for e in eps]
          for ft in data["fine_tunes"] for r in ft["layers"]))
    values = data["heatmap"]["values"]
    _csv(tmp / "heatmap.csv", ["j"] + [f"base_{i}" for i in range(len(values[0]) if values else 0)],
         ([j] + row for j, row in enumerate(values)))
    _csv(tmp / "spectra.csv", ["ft", "matrix", "index", "base", "finetuned", "update"],
         ([r["ft"], r["matrix"], r["index"], r["base"], r["finetuned"], r["update"]] for r in spectra_rows(result, data)))


def _write_plots(tmp: Path, result: SpectralResult, data: dict) -> None:
    from . import plots

    plots.intruders_vs_epsilon(data["sweep"], result.epsilon, tmp / FIGURES[0])
    plots.intruders_per_layer({ft["label"]: ft["layers"] for ft in data["fine_tunes"]}, eps_key(result.epsilon),
                              tmp / FIGURES[1])
    hm = data["heatmap"]
    plots.similarity_heatmap(hm["values"], hm["matrix"], hm["ft"], tmp / FIGURES[2])
    plots.spectra(spectra_rows(result, data), hm["matrix"], tmp / FIGURES[3])


def _html(tmp: Path, result: SpectralResult, data: dict, plots: bool) -> str:
    e = html.escape
    key = eps_key(result.epsilon)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Spectral report: {e(result.base)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:1em 0}</style></head><body>",
             f"<h1>Intruder dimensions and spectral change</h1><p>Base <code>{e(result.base)}</code> "
             f"(analysed matrices sha256 <code>{result.base_matrices_sha256[:16]}</code>), top k = {result.k}, "
             f"epsilon = {result.epsilon}. A fine-tuned left singular vector j &lt; k is an intruder when its "
             "largest |cosine| with every base left singular vector is below epsilon.</p>",
             "<h2>Summary</h2><table><tr><th>fine-tune</th><th>matrices</th>"
             f"<th>intruders (eps {key})</th><th>matrices with intruders</th><th>mean update effective rank</th></tr>"]
    for ft in result.fine_tunes:
        with_any = sum(1 for m in ft.matrices if m.intruders[key])
        mean_rank = sum(m.update_effective_rank for m in ft.matrices) / len(ft.matrices)
        parts.append(f"<tr><td>{e(ft.label)}</td><td>{len(ft.matrices)}</td><td>{ft.total(result.epsilon)}</td>"
                     f"<td>{with_any}</td><td>{mean_rank:.2f}</td></tr>")
    parts.append("</table>")
    if plots:
        for name in FIGURES:
            encoded = base64.b64encode((tmp / name).read_bytes()).decode()
            parts.append(f"<div><img alt='{name}' src='data:image/png;base64,{encoded}'></div>")
    for ft in data["fine_tunes"]:
        parts.append(f"<h2>Per layer: {e(ft['label'])}</h2><table><tr><th>layer</th><th>matrices</th>"
                     f"<th>intruders (eps {key})</th><th>mean effective rank</th><th>energy in base top-k left</th>"
                     "<th>right</th></tr>")
        for r in ft["layers"]:
            layer = "other" if r["layer"] is None else f"{r['stack']} {r['layer']}"
            parts.append(f"<tr><td>{e(layer)}</td><td>{r['matrices']}</td><td>{r['intruders'][key]}</td>"
                         f"<td>{r['mean_update_effective_rank']:.2f}</td><td>{_pct(r['energy_in_base_topk_left'])}</td>"
                         f"<td>{_pct(r['energy_in_base_topk_right'])}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Method</h2><table>" + "".join(f"<tr><td>{e(k)}</td><td style='text-align:left'>{e(str(v))}</td></tr>"
                                                    for k, v in {**result.settings, **{"cache " + k: v for k, v in result.cache.items()}}.items())
                 + "</table><p>Every number is in spectral.json and the CSV files beside this page.</p></body></html>")
    return "\n".join(parts)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
