"""``surgery merge``: task arithmetic, TIES, DARE (linear and TIES), with optional LiNeS scaling.

Every method is ``base + lambda * merged``, where ``merged`` combines the task vectors
``tau_t = model_t - base`` tensor by tensor:

- task_arithmetic: ``sum_t w_t tau_t``
- ties: trim each tau_t to its top ``density`` magnitudes (per tensor, or over the whole model with
  ``scope="global"``), elect a sign per entry from the weighted sum, average the agreeing entries
- dare_linear: drop each entry of tau_t with probability ``p = 1 - density``, rescale by ``1/(1-p)``,
  then ``sum_t w_t tau_t``
- dare_ties: DARE's drop and rescale, then TIES's sign election and disjoint mean
"""
from __future__ import annotations

from typing import Sequence

from ..engine.plan import Call
from ..errors import PlanError
from ..io.checkpoint import open_checkpoints
from ..io.writer import DEFAULT_MAX_SHARD_SIZE
from ..layers import blocks, lines_lambda
from ..lazy import TaskVector, stack
from ..ops.dare import tensor_seed
from ..ops.ties import keep_count

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
DEFAULT_DENSITY = {"ties": 0.2, "dare_linear": 0.1, "dare_ties": 0.1}  # TIES keeps 20%; DARE drops p = 0.9


def merged_vector(method: str, tvs: list[TaskVector], weights: Sequence[float], density: float | None,
                  scope: str = "tensor", seed: int = 0, device: str = "auto") -> tuple[TaskVector, dict]:
    """The merged task vector of ``method`` (lazy), and what was decided on the way (thresholds)."""
    if method not in METHODS:
        raise PlanError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if scope not in ("tensor", "global"):
        raise PlanError(f"--scope must be tensor or global, got {scope!r}")
    if len(weights) != len(tvs):
        raise PlanError(f"{len(weights)} weights for {len(tvs)} models")
    if method != "task_arithmetic":
        density = DEFAULT_DENSITY[method] if density is None else float(density)
        if not 0 < density <= 1:
            raise PlanError(f"--density must be in (0, 1], got {density}")
    weights = [float(w) for w in weights]
    stacked = stack(tvs)
    info: dict = {"method": method, "weights": weights, "density": density}
    if method == "task_arithmetic":
        return stacked.reduce(lambda _n, es: Call.of("weighted_sum", es, weights=weights), info), info
    if method == "ties":
        if scope == "global":
            items = [(n, es) for n, es in stacked.float_items()]
            total = sum(stacked.numel(n) for n, _ in items)
            from ..engine.stats import global_topk_thresholds  # torch: only TIES needs it

            thresholds = global_topk_thresholds(stacked.inputs, items, [keep_count(total, density)] * len(tvs), device)
            info.update(scope="global", thresholds=thresholds)
            trim = lambda _n, t, e: Call.of("trim_threshold", [e], threshold=thresholds[t])  # noqa: E731
        else:
            from ..engine.stats import tensor_topk_thresholds

            per_tensor = tensor_topk_thresholds(stacked.inputs, stacked.float_items(), density, device)
            info.update(scope="tensor")
            trim = lambda n, t, e: Call.of("trim_threshold", [e], threshold=per_tensor[n][t])  # noqa: E731
    else:
        p = 1.0 - density
        info.update(p=p, seed=seed)
        trim = lambda n, t, e: Call.of("dare_drop", [e], p=p, seed=tensor_seed(seed, t, n))  # noqa: E731

    def combine(name, exprs):
        trimmed = [trim(name, t, e) for t, e in enumerate(exprs)]
        if method == "dare_linear":
            return Call.of("weighted_sum", trimmed, weights=weights)
        return Call.of("sign_consensus_mean", trimmed, weights=weights)

    return stacked.reduce(combine, info), info


def lines_scaled(tv: TaskVector, alpha: float, beta: float, config: dict | None) -> tuple[TaskVector, dict]:
    """Scale each tensor of ``tv`` by LiNeS's lambda(l) = alpha + beta * l/(L-1) of its block."""
    found = blocks(tv.lazy.tensors, config)
    lambdas = {n: lines_lambda(found.get(n), alpha, beta) for n in tv.lazy.tensors}
    scaled = tv.map(lambda n, e: Call.of("scale", [e], factor=lambdas[n]), {"op": "lines", "alpha": alpha, "beta": beta})
    return scaled, lambdas


def lines_alpha(tvs: list[TaskVector], merged: TaskVector, device: str = "auto") -> float:
    """The paper's multi-task alpha: (||sum_t tau_t||_1 / ||tau_merged||_1) / T, in one streamed pass."""
    summed = sum(tvs[1:], tvs[0])
    pair = stack([summed, merged])
    from ..engine.stats import l1_norms  # statistics passes run on torch

    sum_l1, merged_l1 = l1_norms(pair.inputs, list(pair.float_items()), device)
    if merged_l1 == 0:
        raise PlanError("the merged task vector is zero; LiNeS alpha is undefined")
    return sum_l1 / merged_l1 / len(tvs)


def build_merge(base, models: Sequence, *, method: str = "task_arithmetic", weights: Sequence[float] | None = None,
                density: float | None = None, lam: float = 1.0, scope: str = "tensor", seed: int = 0,
                lines: bool = False, alpha: float | None = None, beta: float = 0.0, dtype: str | None = None,
                device: str = "auto"):
    """The merge as a lazy :class:`~surgery.recipes.built.Built` (statistics passes, if any, run
    here over the lazy expressions); ``base`` and ``models`` may be recipe steps. With ``lines``,
    ``info["lambdas"]`` has each tensor's LiNeS lambda."""
    from .built import Built, is_built, label, layout_of, model_of, task_vector

    opened = open_checkpoints([m for m in [base, *models] if not is_built(m)]) if not all(
        is_built(m) for m in [base, *models]) else []
    it = iter(opened)
    base_c, *model_cs = [m if is_built(m) else next(it) for m in [base, *models]]
    if not model_cs:
        raise PlanError("merge needs at least one model besides the base")
    tvs = [task_vector(m, base_c) for m in model_cs]
    weights = [1.0] * len(tvs) if weights is None else list(weights)
    merged, info = merged_vector(method, tvs, weights, density, scope, seed, device)
    lambdas = None
    if lines:
        if alpha is None:
            alpha = lines_alpha(tvs, merged, device)
        merged, lambdas = lines_scaled(merged, alpha, beta, layout_of(base_c).config)
        info.update(lines={"alpha": alpha, "beta": beta})
    model = (merged * lam if lam != 1.0 else merged).apply_to(model_of(base_c, "base"))
    recipe = {"operation": "merge", **info, "lambda": lam, "dtype": dtype, "base": label(base_c),
              "models": [label(m) for m in model_cs]}
    return Built.model(model, dtype=dtype, recipe=recipe, tags=("merge", method.replace("_", "-")),
                       layout=layout_of(base_c), info={"lambdas": lambdas})


def merge(base, models: Sequence, output, *, method: str = "task_arithmetic", weights: Sequence[float] | None = None,
          density: float | None = None, lam: float = 1.0, scope: str = "tensor", seed: int = 0,
          lines: bool = False, alpha: float | None = None, beta: float = 0.0, dtype: str | None = None,
          device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False,
          progress=None, dry_run: bool = False):
    """Merge ``models`` (fine-tunes of ``base``) into ``output``: ``base + lambda * merged``.

    With ``lines``, the merged vector is scaled per block by LiNeS instead, with ``alpha`` defaulting
    to the paper's rule (see :func:`lines_alpha`); ``dry_run`` returns each tensor's lambda instead
    of writing.
    """
    built = build_merge(base, models, method=method, weights=weights, density=density, lam=lam, scope=scope,
                        seed=seed, lines=lines, alpha=alpha, beta=beta, dtype=dtype, device=device)
    if lines and dry_run:
        return built.info["lambdas"]
    return built.save(output, device=device, max_shard_size=max_shard_size, force=force, progress=progress)


def build_lines(base, ft, *, alpha: float, beta: float, dtype: str | None = None):
    """Single-task LiNeS as a lazy :class:`~surgery.recipes.built.Built`; ``info["lambdas"]`` has
    each tensor's lambda. ``base`` and ``ft`` may be recipe steps."""
    from .built import Built, checkpoint_of, config_of, is_built, label, layout_of, model_of, task_vector

    base = base if is_built(base) else checkpoint_of(base)
    tv = task_vector(ft, base)
    scaled, lambdas = lines_scaled(tv, alpha, beta, config_of(base) or (config_of(ft) if is_built(ft) else
                                                                         tv.lazy.inputs[0].config))
    recipe = {"operation": "lines", "alpha": alpha, "beta": beta, "dtype": dtype,
              "base": label(base), "ft": label(ft)}
    return Built.model(scaled.apply_to(model_of(base, "base")), dtype=dtype, recipe=recipe, tags=("lines",),
                       layout=layout_of(base), info={"lambdas": lambdas})


def lines(base, ft, output=None, *, alpha: float, beta: float, dtype: str | None = None, device: str = "auto",
          max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False, progress=None, dry_run: bool = False):
    """Single-task LiNeS: ``base + lambda(l) * (ft - base)``. With ``dry_run``, return the lambda of
    every tensor instead of writing anything."""
    built = build_lines(base, ft, alpha=alpha, beta=beta, dtype=dtype)
    if dry_run:
        return built.info["lambdas"]
    return built.save(output, device=device, max_shard_size=max_shard_size, force=force, progress=progress)
