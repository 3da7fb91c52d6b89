"""Recipe files: several operations as one graph, evaluated per tensor in one streaming pass.

A recipe (YAML or a dict) names ``inputs`` (locations), ``steps`` (each an operation over inputs and
earlier steps) and an ``output`` (a step and a folder)::

    inputs: {base_a: ./a, ft_a: ./a-ft, base_b: ./b, other: ./x}
    steps:
      moved:  {op: transfer, source_base: base_a, source_ft: ft_a, to: base_b}
      scaled: {op: lines, base: base_b, ft: moved, alpha: 0.5, beta: 0.5}
      final:  {op: soup, models: [scaled, other], weights: [0.5, 0.5]}
    output: {step: final, path: ./out, dtype: bf16}

Every step is built by the same library builder its CLI command calls (``build_soup``,
``build_transfer``, ``build_merge``...), which returns a :class:`Built`: a lazy value (tensor
expressions over checkpoints) plus what saving it needs. A step used by another step is fed in as
that lazy value, rounded per tensor to the dtype it would have been saved in, so a chain gives the
bytes the commands run one after another give, while each input tensor is read once and nothing
intermediate is written (unless the step says ``save: PATH``).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import PlanError
from ..io.writer import DEFAULT_MAX_SHARD_SIZE
from .built import Built
from .recipe_schema import (FLOAT, FLOATS, LOC, LOCS, MERGE_METHODS, OPS, REF, REFS, STRS, Recipe, load_recipe,
                            parse_recipe)


def _location(recipe: Recipe, value: str) -> str:
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    local = recipe.root / p
    if local.exists() or value.startswith((".", "/")):
        return str(local)
    return value  # a Hub id


def build_step(recipe: Recipe, name: str, built: dict | None = None, opened: dict | None = None,
               device: str = "auto") -> Built:
    """The lazy value of step ``name`` (and of the steps it uses), each input opened once; the
    statistics passes some steps make while built (top-k thresholds, intruder analysis) run on ``device``."""
    built = {} if built is None else built
    opened = {} if opened is None else opened
    if name in built:
        return built[name]
    step = recipe.steps[name]
    op, params = step["op"], step["params"]

    def arg(ref: str):
        if ref in recipe.steps:
            return build_step(recipe, ref, built, opened, device)
        if ref not in opened:
            from ..io.checkpoint import open_checkpoint
            from ..lora import is_adapter

            loc = _location(recipe, recipe.inputs[ref])
            ckpt = open_checkpoint(loc)
            opened[ref] = ckpt if not is_adapter(ckpt) else loc
        return opened[ref]

    def args(k, v):
        kind = OPS[op][k][0]
        if k == "config_from":  # a location: an input's, or a folder
            if v in recipe.steps:
                raise PlanError(f"step {name!r}: config_from names step {v!r}; give an input or a folder")
            return _location(recipe, recipe.inputs.get(v, v))
        if kind == REF:
            return arg(v)
        if kind == REFS:
            return [arg(r) for r in v]
        if kind == LOCS:
            return [_location(recipe, recipe.inputs[r]) for r in v]
        if kind == LOC:
            return _location(recipe, recipe.inputs[v])
        return v

    kw = {k: args(k, v) for k, v in params.items()}
    dtype = step["dtype"]
    if name == recipe.output["step"] and recipe.output.get("dtype") is not None:
        dtype = recipe.output["dtype"]
    try:
        result = _call(op, kw, dtype, device)
    except PlanError as e:
        raise PlanError(f"step {name!r} ({op}): {e}") from None
    result.name = name
    built[name] = result
    return result


def _call(op: str, kw: dict, dtype: str | None, device: str = "auto") -> Built:
    if op == "soup":
        from .soup import build_soup

        return build_soup(kw.pop("models"), dtype=dtype, **kw)
    if op == "transfer":
        from .transfer import build_transfer

        return build_transfer(kw.pop("to"), dtype=dtype, **kw)
    if op == "merge" or op in MERGE_METHODS:
        from .merge import build_merge

        if op != "merge":
            kw["method"] = op
        if "lambda" in kw:
            kw["lam"] = kw.pop("lambda")
        return build_merge(kw.pop("base"), kw.pop("models"), dtype=dtype, device=device, **kw)
    if op == "lines":
        from .merge import build_lines

        return build_lines(kw.pop("base"), kw.pop("ft"), dtype=dtype, **kw)
    if op == "diff":
        from .delta import build_diff

        return build_diff(kw["ft"], kw["base"], dtype=dtype)
    if op == "lora_merge":
        from .lora import build_merge as build_lora_merge

        return build_lora_merge(kw["base"], kw["adapter"], dtype=dtype, **{k: v for k, v in kw.items()
                                                                          if k not in ("base", "adapter")})
    if op == "graft":
        from .graft import build_graft, build_graft_with_mask

        if "mask" in kw:
            if set(kw) - {"base", "ft", "mask"}:
                raise PlanError(f"a graft by a mask file takes no {', '.join(sorted(set(kw) - {'base', 'ft', 'mask'}))}")
            return build_graft_with_mask(kw["base"], kw["ft"], kw["mask"], dtype=dtype)
        return build_graft(kw.pop("base"), kw.pop("ft"), dtype=dtype, device=device, **kw)
    if op in ("sft_apply", "sft_revert"):
        from .sft import build_apply

        if dtype is not None:
            raise PlanError("sft apply/revert keeps the model's dtype; drop dtype")
        return build_apply(kw.pop("model"), kw.pop("sfts"), revert=op == "sft_revert", scratch=scratch(), **kw)
    if op == "reduce_intruders":
        from ..spectral.mitigate import build_reduce_intruders

        if "lambda" in kw:
            kw["mitigation_lambda"] = kw.pop("lambda")
        if "include" in kw:
            kw["include"] = kw["include"] or None
        folder = scratch() / f"intruders-{len(list(scratch().glob('intruders-*')))}"
        return build_reduce_intruders(kw.pop("base"), kw.pop("ft"), scratch=folder, dtype=dtype, device=device, **kw)
    raise PlanError(f"unknown op {op!r}")


_SCRATCH: list = []


def scratch() -> Path:
    """A folder that lives while the recipe runs (SFT conversions, intruder corrections)."""
    if not _SCRATCH:
        raise PlanError("internal: no scratch folder outside run_recipe")
    return Path(_SCRATCH[-1])


def run_recipe(recipe, output=None, *, force: bool = False, device: str = "auto", progress=None) -> Path:
    """Evaluate a recipe (a path, a dict or a :class:`Recipe`) in one streaming pass; returns the output folder.

    Steps with ``save: PATH`` are also written, each in a pass of its own, before the output."""
    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe)
    out_path = output if output is not None else recipe.output.get("path")
    if out_path is None:
        raise PlanError("output: needs path (or pass -o)")
    if output is None:
        out_path = _location(recipe, str(out_path)) if not Path(out_path).is_absolute() else out_path
    import tempfile

    built: dict = {}
    opened: dict = {}
    shard = recipe.output.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE)
    with tempfile.TemporaryDirectory(prefix="surgery-recipe-") as tmp:
        _SCRATCH.append(tmp)
        try:
            final = build_step(recipe, recipe.output["step"], built, opened, device)
            for name, step in recipe.steps.items():
                if step["save"]:
                    b = build_step(recipe, name, built, opened, device)
                    b.save(_location(recipe, step["save"]), device=device, max_shard_size=shard, force=force,
                           progress=progress)
            return final.save(out_path, device=device, max_shard_size=shard, force=force, progress=progress)
        finally:
            _SCRATCH.pop()


# -- one-step recipes: what a CLI command's ``--print-recipe`` prints -----------------------------


def one_step_recipe(op: str, params: dict, output, *, dtype: str | None = None, max_shard_size=None) -> dict:
    """The recipe that replays one command: reference parameters become named inputs (absolute
    paths for local files), other parameters are kept when they are set."""
    if op not in OPS:
        raise PlanError(f"op {op!r} has no recipe form")
    schema = OPS[op]
    inputs: dict[str, str] = {}

    def name_of(loc, hint: str) -> str:
        p = Path(str(loc)).expanduser()
        loc = str(p.resolve()) if p.exists() else str(loc)
        for k, v in inputs.items():
            if v == loc:
                return k
        stem = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in (p.name or hint)) or hint
        key, i = stem, 2
        while key in inputs or key in ("out",):
            key, i = f"{stem}_{i}", i + 1
        inputs[key] = loc
        return key

    step: dict = {"op": op}
    for k, v in params.items():
        if v is None or k not in schema:
            continue
        kind = schema[k][0]
        if kind in (REF, LOC):
            step[k] = name_of(v, k)
        elif kind in (REFS, LOCS):
            step[k] = [name_of(x, k) for x in v]
        elif kind == STRS:
            if v:
                step[k] = list(v)
        elif kind == FLOAT:
            step[k] = float(v)
        elif kind == FLOATS:
            step[k] = [float(x) for x in v]
        else:
            step[k] = v
    out: dict = {"step": op}
    if output is not None:
        out["path"] = str(Path(output).expanduser().resolve())
    if dtype is not None:
        out["dtype"] = dtype
    if max_shard_size is not None:
        out["max_shard_size"] = max_shard_size
    return {"inputs": inputs, "steps": {op: step}, "output": out}


def recipe_yaml(recipe: dict) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None)
