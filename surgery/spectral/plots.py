"""The report's figures as PNG files. matplotlib (Agg backend) is imported only here, when a report
is written, so the CLI and the library start without it."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def intruders_vs_epsilon(sweep: list[dict], epsilon: float, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["ft"] for r in sweep):
        rows = [r for r in sweep if r["ft"] == label]
        ax.plot([r["epsilon"] for r in rows], [r["intruders"] for r in rows], marker="o", label=_short(label))
    ax.axvline(epsilon, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("epsilon (intruder iff max |cos| < epsilon)")
    ax.set_ylabel("intruder dimensions (all matrices)")
    _integer_y(ax)
    ax.set_title("Intruder dimensions against epsilon")
    ax.legend(fontsize=8)
    return _save(fig, path)


def intruders_per_layer(layers: dict[str, list[dict]], epsilon_key: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(layers)
    width = 0.8 / max(1, len(labels))
    ticks = None
    for i, label in enumerate(labels):
        rows = layers[label]
        names = [_layer_name(r) for r in rows]
        ticks = names
        xs = [x + i * width for x in range(len(rows))]
        ax.bar(xs, [r["intruders"][epsilon_key] for r in rows], width=width, label=_short(label))
    if ticks:
        ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(ticks))])
        ax.set_xticklabels(ticks, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"intruders at epsilon {epsilon_key}")
    _integer_y(ax)
    ax.set_title("Intruder dimensions per layer")
    ax.legend(fontsize=8)
    return _save(fig, path)


def similarity_heatmap(values: list[list[float]], matrix: str, ft: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("base left singular vector i (top ones)")
    ax.set_ylabel("fine-tuned vector j")
    ax.set_title(f"|cos(U0[:, i], Ut[:, j])|: {matrix}\n{_short(ft)}", fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def spectra(rows: list[dict], matrix: str, path: Path) -> Path:
    """rows: ft, index, base, finetuned, update (top-k singular values of the chosen matrix)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = list(dict.fromkeys(r["ft"] for r in rows))
    first = [r for r in rows if r["ft"] == labels[0]]
    left.plot([r["index"] for r in first], [r["base"] for r in first], color="black", marker="o", label="base")
    for label in labels:
        mine = [r for r in rows if r["ft"] == label]
        left.plot([r["index"] for r in mine], [r["finetuned"] for r in mine], marker=".", label=_short(label))
        right.semilogy([r["index"] for r in mine], [max(r["update"], 1e-30) for r in mine], marker=".", label=_short(label))
    left.set_title("top singular values: base vs fine-tuned", fontsize=9)
    right.set_title("top singular values of the update", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("index j")
        ax.legend(fontsize=7)
    fig.suptitle(matrix, fontsize=9)
    return _save(fig, path)


def _integer_y(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _layer_name(row: dict) -> str:
    return "other" if row["layer"] is None else f"{row['stack']} {row['layer']}"


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else "..." + label[-(width - 3):]
