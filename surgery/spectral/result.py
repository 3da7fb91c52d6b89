"""What an analysis found: per fine-tune, per matrix, and aggregated per layer (block index)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


def eps_key(e: float) -> str:
    return f"{float(e):g}"


@dataclass
class MatrixResult:
    name: str
    shape: tuple[int, int]
    stack: str | None  # the block container, e.g. "encoder.layer"; None outside numbered blocks
    layer: int | None  # block index
    similarity: list[float]  # max_i |cos(U0[:, i], Ut[:, j])| for the top-k fine-tuned vectors j
    best_match: list[int]  # the base vector i that attains it
    intruders: dict[str, int]  # epsilon -> count of similarities below it
    intruder_indices: list[int]  # at the headline epsilon
    base_singular_values: list[float]  # top k
    ft_singular_values: list[float]  # top k
    update_singular_values: list[float]  # top k of W_ft - W_base
    update_effective_rank: float
    update_frobenius_sq: float
    energy_in_base_topk: dict  # left, right, both: shares of ||update||_F^2 (None for a zero update)
    ft_svd: dict  # method, iterations, error_bound
    base_svd: str  # "cache" or "computed"
    heat: list[list[float]] | None = field(default=None, repr=False)  # |cos| top-k x top base vectors

    def to_dict(self, with_heat: bool = False) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if not with_heat:
            d.pop("heat")
        return d


@dataclass
class FineTuneResult:
    label: str
    matrices: list[MatrixResult]

    def total(self, epsilon: float) -> int:
        return sum(m.intruders[eps_key(epsilon)] for m in self.matrices)

    def layers(self, epsilons) -> list[dict]:
        """One row per (stack, layer): matrices, intruders per epsilon, mean effective rank, and the
        energy-weighted share of the update in the base's top-k subspaces."""
        rows: dict[tuple, dict] = {}
        for m in self.matrices:
            key = (m.stack or "", -1 if m.layer is None else m.layer)
            row = rows.setdefault(key, {"stack": m.stack, "layer": m.layer, "matrices": 0,
                                        "intruders": {eps_key(e): 0 for e in epsilons},
                                        "_rank": 0.0, "_energy": 0.0, "_left": 0.0, "_right": 0.0})
            row["matrices"] += 1
            for e in epsilons:
                row["intruders"][eps_key(e)] += m.intruders[eps_key(e)]
            row["_rank"] += m.update_effective_rank
            if m.update_frobenius_sq > 0:
                row["_energy"] += m.update_frobenius_sq
                row["_left"] += m.energy_in_base_topk["left"] * m.update_frobenius_sq
                row["_right"] += m.energy_in_base_topk["right"] * m.update_frobenius_sq
        out = []
        for key in sorted(rows):
            row = rows[key]
            energy = row.pop("_energy")
            left, right = row.pop("_left"), row.pop("_right")
            row["mean_update_effective_rank"] = row.pop("_rank") / row["matrices"]
            row["energy_in_base_topk_left"] = left / energy if energy > 0 else None
            row["energy_in_base_topk_right"] = right / energy if energy > 0 else None
            out.append(row)
        return out


@dataclass
class SpectralResult:
    base: str
    base_matrices_sha256: str  # content hash (as surgery's) over the analysed base matrices
    k: int
    epsilon: float
    epsilons: list[float]
    fine_tunes: list[FineTuneResult]
    settings: dict  # device, svd dtypes and methods, cache
    cache: dict  # folder, hits, misses
    seconds: float

    def matrix(self, name: str, ft: int = 0) -> MatrixResult:
        for m in self.fine_tunes[ft].matrices:
            if m.name == name:
                return m
        raise KeyError(name)

    def heatmap_matrix(self, name: str | None = None) -> tuple[int, MatrixResult]:
        """The matrix whose similarity heat map the report shows: ``name`` (in the first fine-tune that
        has it), else the one with the most intruders at the headline epsilon (the first on ties)."""
        if name is not None:
            for i, ft in enumerate(self.fine_tunes):
                for m in ft.matrices:
                    if m.name == name:
                        return i, m
            from ..errors import PlanError

            raise PlanError(f"--heatmap {name!r} is not an analysed matrix")
        best = max(((m.intruders[eps_key(self.epsilon)], -i, -j) for i, ft in enumerate(self.fine_tunes)
                    for j, m in enumerate(ft.matrices)))
        i, j = -best[1], -best[2]
        return i, self.fine_tunes[i].matrices[j]

    def sweep(self) -> list[dict]:
        """Total intruders per fine-tune and epsilon (the intruders-against-epsilon figure)."""
        return [{"ft": ft.label, "epsilon": e, "intruders": ft.total(e)} for ft in self.fine_tunes for e in self.epsilons]

    def to_dict(self, heatmap: str | None = None) -> dict:
        i, hm = self.heatmap_matrix(heatmap)
        return {
            "paper": "LoRA vs Full Fine-tuning: An Illusion of Equivalence (intruder dimensions)",
            "base": self.base, "base_matrices_sha256": self.base_matrices_sha256,
            "k": self.k, "epsilon": self.epsilon, "epsilons": self.epsilons,
            "settings": self.settings, "cache": self.cache, "seconds": self.seconds,
            "sweep": self.sweep(),
            "heatmap": {"ft": self.fine_tunes[i].label, "matrix": hm.name, "rows": "top-k fine-tuned left vectors",
                        "columns": "top base left vectors", "values": hm.heat},
            "fine_tunes": [{"label": ft.label, "intruders": ft.total(self.epsilon),
                            "layers": ft.layers(self.epsilons),
                            "matrices": [m.to_dict() for m in ft.matrices]} for ft in self.fine_tunes],
        }
