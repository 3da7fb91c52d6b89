"""Model soups: uniform, weighted and greedy (Wortsman et al., 2022)."""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..card import RECIPE_FILE, write_card
from ..engine.align import align
from ..engine.plan import Call, OutputTensor, Plan, Ref
from ..errors import PlanError, ScoreError
from ..io.checkpoint import Checkpoint
from ..io.output import OutputFolder, check_output
from ..io.writer import DEFAULT_MAX_SHARD_SIZE, TensorSpec
from ..io.checkpoint import open_checkpoints as open_inputs
from .run import parse_dtype


def soup_weights(n: int, weights: Sequence[float] | None, normalize: bool) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise PlanError(f"{len(weights)} weights given for {n} inputs")
    if not all(math.isfinite(w) for w in weights):
        raise PlanError(f"weights must be finite numbers, got {weights}")
    if normalize:
        total = sum(weights)
        if total <= 0:
            raise PlanError(f"weights sum to {total}; cannot normalise (pass --no-normalize to use them as given)")
        weights = [w / total for w in weights]
    return weights


def plan_soup(ckpts: list[Checkpoint], weights: list[float], dtype: str | None = None,
              max_shard_size=DEFAULT_MAX_SHARD_SIZE, recipe: dict | None = None) -> tuple[Plan, dict]:
    """The soup as a plan, and the config overrides the output needs (an untied head)."""
    aligned = align(ckpts)
    out_dtype = parse_dtype(dtype)
    uniform = all(w == 1.0 / len(ckpts) for w in weights)
    tensors = []
    for name in aligned.names:
        source = aligned.buffers.get(name, 0)
        first = ckpts[source].resolve(name)
        if first.is_float:
            refs = [Ref(i, c.resolve(name).name) for i, c in enumerate(ckpts)]
            expr = Call.of("mean", refs) if uniform else Call.of("weighted_sum", refs, weights=weights)
        else:  # integer and bool buffers (position ids, masks) are carried, never averaged
            expr = Call.of("copy", [Ref(source, first.name)])
        spec_dtype = out_dtype if (out_dtype and first.is_float) else first.dtype
        tensors.append(OutputTensor(TensorSpec(name, spec_dtype, first.shape), expr))
    # Accumulate float32 (and wider) inputs in float64, so the mean is correctly rounded; 16-bit
    # inputs sum exactly in float32 already, and float32 keeps their soups twice as fast.
    wide = any(ckpts[aligned.buffers.get(n, 0)].resolve(n).dtype in ("F32", "F64") for n in aligned.names)
    plan = Plan([c.source for c in ckpts], tensors, max_shard_size, recipe=recipe or {},
                compute_dtype="F64" if wide else "F32")
    overrides = {"tie_word_embeddings": False} if aligned.untied else {}
    return plan, overrides


def build_soup(inputs, *, weights: Sequence[float] | None = None, normalize: bool = True, dtype: str | None = None,
               config_from=None, allow_pickle: bool = False, base=None, extra_recipe: dict | None = None):
    """The soup as a lazy :class:`~surgery.recipes.built.Built`. An input may be a checkpoint, a
    PEFT LoRA adapter (its base plus its delta: ``base``, or the one its config names) or a recipe
    step. The soup is planned over the inputs' layouts exactly as a soup of full models, then each
    adapter's or step's tensors are swapped in as expressions, so every input tensor is read once."""
    from ..io.checkpoint import open_checkpoint
    from ..lazy import remap, union_inputs
    from ..lora import adapted, adapter_base, is_adapter, open_adapter
    from .built import Built, is_built, label

    if isinstance(inputs, (str, os.PathLike)):
        raise PlanError("inputs must be a list of checkpoints, not a single path")
    if not inputs:
        raise PlanError("no input checkpoints given")
    slots, swaps, adapters, steps = [], {}, {}, {}
    for i, spec in enumerate(inputs):
        if is_built(spec):
            if spec.delta is not None or spec.layout is None:
                raise PlanError(f"soup input {label(spec)} is not a model laid out like a checkpoint")
            lazy = spec.value()
            _check_layout(spec, lazy)
            slots.append(spec.layout)
            swaps[i], steps[i] = lazy, spec
            continue
        ckpt = spec if isinstance(spec, Checkpoint) else open_checkpoint(spec, allow_pickle=allow_pickle)
        if is_adapter(ckpt):  # an adapter opens as its weights file
            ad = open_adapter(ckpt)
            ckpt = adapter_base(ad, base)
            swaps[i] = adapted(ad, ckpt).lazy
            adapters[str(spec)] = swaps[i].inputs[0].source
        slots.append(ckpt)
    if base is not None and not adapters:
        raise PlanError("base is only for LoRA adapter inputs, and no input is an adapter")
    w = soup_weights(len(slots), weights, normalize)
    recipe = {"operation": "soup", "weights": w, "dtype": dtype,
              **({"adapters": adapters} if adapters else {}), **(extra_recipe or {})}
    if steps:
        recipe["inputs"] = [label(x) for x in inputs]
    plan, overrides = plan_soup(slots, w, dtype, DEFAULT_MAX_SHARD_SIZE, recipe)
    ckpts, swapped = tuple(slots), {}
    for i, lazy in swaps.items():
        ckpts, mapping = union_inputs(ckpts, lazy.inputs)
        swapped[i] = {n: remap(t.expr, mapping) for n, t in lazy.tensors.items()}

    def swap(expr):
        if isinstance(expr, Ref):
            return swapped[expr.input][expr.name] if expr.input in swapped else expr
        return Call(expr.op, tuple(swap(a) for a in expr.args), expr.params)

    tensors = {t.spec.name: OutputTensor(t.spec, swap(t.expr)) for t in plan.tensors}
    if 0 in steps and config_from is None:  # config as the first step would have saved it
        config_from = steps[0].config_from if steps[0].config_from is not None else steps[0].lazy.sidecars
        overrides = {**steps[0].overrides, **overrides}
    from ..lazy import Lazy

    lazy = Lazy(ckpts, tensors, {}, None, ({"soup": [label(x) for x in inputs]},))
    tags = ("merge", "model-soup") + (("lora",) if adapters else ())
    return Built(lazy, recipe, tags, overrides, config_from=config_from, layout=slots[0], compute_dtype=plan.compute_dtype)


def _check_layout(step, lazy) -> None:
    layout = step.layout
    problems = []
    for n, t in lazy.tensors.items():
        info = layout.tensors.get(n)
        if info is None and n in layout.tied:
            info = layout.resolve(n)
        if info is None or tuple(info.shape) != tuple(t.spec.shape) or info.dtype != t.spec.dtype:
            problems.append(n)
    if problems or len(lazy.tensors) != len(layout.tensors):
        raise PlanError(f"soup input {step.name!r} is not laid out like {layout.source} (its names, shapes or "
                        f"dtypes differ, e.g. {problems[:1]}); save that step (save: PATH) and soup the saved model")


def soup(inputs, output, *, weights: Sequence[float] | None = None, normalize: bool = True, dtype: str | None = None,
         device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE, config_from=None, force: bool = False,
         allow_pickle: bool = False, progress=None, extra_recipe: dict | None = None, base=None) -> Path:
    """Average checkpoints tensor by tensor into ``output``; returns the output folder.

    ``weights`` are normalised to sum to 1 unless ``normalize=False``; the default is uniform.
    An input may be a PEFT LoRA adapter: it counts as its base (``base``, or the one its config
    names) plus its delta (see :func:`build_soup`).
    """
    built = build_soup(inputs, weights=weights, normalize=normalize, dtype=dtype, config_from=config_from,
                       allow_pickle=allow_pickle, base=base, extra_recipe=extra_recipe)
    return built.save(output, device=device, max_shard_size=max_shard_size, force=force, progress=progress)


@dataclass
class GreedySoupResult:
    output: Path
    chosen: list[str]  # ingredients in the soup, in the order they were added
    ingredient_scores: dict[str, float]
    steps: list[dict] = field(default_factory=list)  # each candidate tried: ingredients, score, kept
    score: float = float("nan")  # the final soup's score


def greedy_soup(inputs, output, *, score: Callable[[str], float], dtype: str | None = None, device: str = "auto",
                max_shard_size=DEFAULT_MAX_SHARD_SIZE, config_from=None, force: bool = False,
                allow_pickle: bool = False, progress=None, log: Callable[[str], None] | None = None) -> GreedySoupResult:
    """Greedy soup: rank ingredients by their own score; add each, in that order, only if the
    uniform soup of the kept ingredients plus it scores strictly higher. ``score`` gets a model
    location (folder or repo id) and returns a number where higher is better.
    """
    ckpts = open_inputs(inputs, allow_pickle)
    out = check_output(output, [c.root for c in ckpts], force)
    align(ckpts)  # fail on mismatched inputs before any scoring
    say = log or (lambda _msg: None)
    own = {}
    for c in ckpts:
        own[c.source] = float(score(c.source))
        say(f"ingredient {c.source}: {own[c.source]:.6g}")
    ranked = sorted(ckpts, key=lambda c: own[c.source], reverse=True)
    chosen = [ranked[0]]
    best = own[ranked[0].source]
    steps = [{"ingredients": [ranked[0].source], "score": best, "kept": True}]
    work = out.parent / f".{out.name}.greedy-{uuid.uuid4().hex[:8]}"
    best_folder: Path | None = None
    try:
        for k, c in enumerate(ranked[1:], start=1):
            candidate = chosen + [c]
            folder = soup(candidate, work / f"candidate-{k}", dtype=dtype, device=device, max_shard_size=max_shard_size,
                          config_from=config_from if config_from is not None else ckpts[0].root, progress=progress)
            s = float(score(str(folder)))
            kept = s > best
            steps.append({"ingredients": [x.source for x in candidate], "score": s, "kept": kept})
            say(f"candidate +{c.source}: {s:.6g} {'kept' if kept else 'rejected'} (best so far {max(s, best):.6g})")
            if kept:
                if best_folder is not None:
                    shutil.rmtree(best_folder)
                chosen, best, best_folder = candidate, s, folder
            else:
                shutil.rmtree(folder)
        record = {"operation": "greedy_soup", "weights": [1.0 / len(chosen)] * len(chosen), "dtype": dtype,
                  "chosen": [c.source for c in chosen], "ingredient_scores": own, "steps": steps, "score": best}
        if best_folder is None:  # nothing beat the best ingredient alone: the soup is that ingredient
            soup(chosen, out, dtype=dtype, device=device, max_shard_size=max_shard_size, config_from=config_from,
                 force=force, progress=progress, extra_recipe=record)
        else:
            with OutputFolder(out, force) as tmp:
                for p in best_folder.iterdir():
                    os.rename(p, tmp / p.name)
                # the candidate's own record has its inputs' content hashes and its shards' sha256
                prior = json.loads((tmp / RECIPE_FILE).read_text())
                write_card(tmp, record, chosen, ["merge", "model-soup", "greedy-soup"], title=out.name,
                           inputs=prior.get("inputs"), shards=prior.get("outputs"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return GreedySoupResult(out, record["chosen"], own, steps, best)


def score_command(template: str, timeout: float | None = None) -> Callable[[str], float]:
    """A score function from a shell command: ``{model}`` is replaced by the model's location and
    the last non-empty line the command prints must be a number."""
    if "{model}" not in template:
        raise PlanError(f"--score-cmd must contain {{model}}, got {template!r}")

    def run(model: str) -> float:
        cmd = template.replace("{model}", shlex.quote(str(model)))
        try:
            proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise ScoreError(f"score command timed out after {timeout}s: {cmd}") from e
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or [""])[-1]
            raise ScoreError(f"score command exited {proc.returncode} for {model}: {cmd}: {tail}")
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        try:
            return float(lines[-1].strip())
        except (IndexError, ValueError):
            raise ScoreError(f"score command printed no number as its last line for {model}: {cmd}") from None

    return run
