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

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.plan import Call, Plan
from ..errors import PlanError
from ..io.writer import DEFAULT_MAX_SHARD_SIZE

# -- the value every builder returns ------------------------------------------------------------


@dataclass
class Built:
    """A lazy step result: a model (``lazy``) or a task vector (``delta``), and how to save it."""

    lazy: Any  # surgery.lazy.Lazy: the tensors to write
    recipe: dict
    tags: tuple[str, ...] = ()
    overrides: dict = field(default_factory=dict)  # config.json overrides
    tokenizer_from: Path | None = None
    config_from: Any = None  # default: lazy.sidecars, else the first input
    layout: Any = None  # a Checkpoint laid out as this model (names, shapes, dtypes), for soups of steps
    compute_dtype: str = "F64"
    delta: Any = None  # a TaskVector, for diff steps (saved by save_delta)
    dtype: str | None = None  # for deltas: the storage dtype asked for
    info: dict = field(default_factory=dict)  # what was decided on the way (LiNeS lambdas...)
    name: str | None = None  # the recipe step that built it

    @classmethod
    def model(cls, model, *, dtype: str | None, recipe: dict, tags: tuple[str, ...], layout, **kw) -> Built:
        """From a :class:`surgery.lazy.LazyModel`, as ``LazyModel.save`` would write it."""
        from .run import parse_dtype

        return cls(model.lazy.with_dtype(parse_dtype(dtype)), recipe, tags, dict(model.config_overrides),
                   model.tokenizer_from, layout=layout, **kw)

    def value(self):
        """The lazy tensors as a later step sees them: rounded to the dtype they would be saved in."""
        if self.delta is not None:
            from ..lazy import TaskVector
            from .delta import _one_precision_up
            from .run import parse_dtype

            lazy = self.delta.lazy.with_dtype(parse_dtype(self.dtype)) if self.dtype else _one_precision_up(self.delta.lazy)
            return TaskVector(_rounded(lazy), self.delta.sources)
        return _rounded(self.lazy)

    def plan(self, max_shard_size=DEFAULT_MAX_SHARD_SIZE) -> Plan:
        """The model's one plan (plain data): what :meth:`save` streams."""
        lazy = self.lazy
        return Plan([c.source for c in lazy.inputs], list(lazy.tensors.values()), max_shard_size,
                    recipe=self.recipe or {"history": list(lazy.history)}, compute_dtype=self.compute_dtype)

    def save(self, output, *, device: str = "auto", max_shard_size=DEFAULT_MAX_SHARD_SIZE, force: bool = False,
             progress=None) -> Path:
        from .run import parse_dtype, run_plan

        if self.delta is not None:
            from .delta import save_delta

            return save_delta(self.delta, output, dtype=parse_dtype(self.dtype), device=device,
                              max_shard_size=max_shard_size, force=force, progress=progress)
        lazy = self.lazy
        plan = self.plan(max_shard_size)
        return run_plan(plan, output, list(lazy.inputs), force=force,
                        config_from=self.config_from if self.config_from is not None else lazy.sidecars,
                        config_overrides=self.overrides, tokenizer_from=self.tokenizer_from, tags=self.tags,
                        device=device, progress=progress)


def _rounded(lazy):
    return lazy.map_float(lambda n, e: Call.of("round_to", [e], dtype=lazy.tensors[n].spec.dtype))


# -- helpers the builders share: an argument is a location, a Checkpoint, or a Built -------------


def label(x) -> str:
    """How a builder's recipe record names an argument."""
    if isinstance(x, Built):
        return f"step:{x.name}" if x.name else "step"
    source = getattr(x, "source", None)
    return source if source is not None else str(x)


def is_built(x) -> bool:
    return isinstance(x, Built)


def checkpoint_of(x, allow_pickle: bool = False):
    from ..io.checkpoint import Checkpoint, open_checkpoint

    return x if isinstance(x, Checkpoint) else open_checkpoint(x, allow_pickle=allow_pickle)


def model_of(x, what: str = "model"):
    """A model argument as a target for ``apply_to``: a Checkpoint, or a step's (rounded) lazy value."""
    if isinstance(x, Built):
        if x.delta is not None:
            raise PlanError(f"{what}: step {x.name!r} is a task vector (diff), not a model")
        return x.value()
    return checkpoint_of(x)


def layout_of(x):
    """The checkpoint a model argument is laid out like (its config, block structure, names)."""
    if isinstance(x, Built):
        return x.layout
    return checkpoint_of(x)


def config_of(x) -> dict:
    layout = layout_of(x)
    return (layout.config if layout is not None else None) or {}


def task_vector(ft, base):
    """``ft - base`` lazily; ``ft`` or ``base`` may be steps (the plain case is ``TaskVector.between``)."""
    from ..lazy import TaskVector

    if not is_built(ft) and not is_built(base):
        return TaskVector.between(ft, base)
    ft_v, base_v = model_of(ft, "ft"), model_of(base, "base")
    from ..lazy import Lazy, from_checkpoint

    ft_l = ft_v if isinstance(ft_v, Lazy) else from_checkpoint(ft_v)
    base_l = base_v if isinstance(base_v, Lazy) else from_checkpoint(base_v)
    lazy = ft_l.combine(base_l, lambda a, b: Call.of("sub", [a, b]), {"diff": [label(ft), label(base)]})
    return TaskVector(lazy, {"ft": label(ft), "base": label(base)})


# -- the recipe schema --------------------------------------------------------------------------

REF, REFS, FLOAT, FLOATS, INT, BOOL, STR = "ref", "refs", "float", "floats", "int", "bool", "str"
STRS = "strs"  # a list of strings (name patterns)
LOCS = "locs"  # input names passed on as locations (files the op opens itself), not opened here
MERGE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
_MERGE_PARAMS = {"base": (REF, True), "models": (REFS, True), "weights": (FLOATS, False),
                 "density": (FLOAT, False), "lambda": (FLOAT, False), "scope": (("tensor", "global"), False),
                 "seed": (INT, False), "lines": (BOOL, False), "alpha": (FLOAT, False), "beta": (FLOAT, False)}
# op -> parameter -> (type, required); a tuple type is a choice of strings
OPS: dict[str, dict[str, tuple[Any, bool]]] = {
    "soup": {"models": (REFS, True), "weights": (FLOATS, False), "normalize": (BOOL, False), "base": (REF, False),
             "config_from": (REF, False)},
    "transfer": {"to": (REF, True), "source_base": (REF, False), "source_ft": (REF, False), "diff": (REF, False),
                 "scale": (FLOAT, False), "keep_target": (BOOL, False)},
    "merge": {**_MERGE_PARAMS, "method": (MERGE_METHODS, False)},
    **{m: dict(_MERGE_PARAMS) for m in MERGE_METHODS},
    "lines": {"base": (REF, True), "ft": (REF, True), "alpha": (FLOAT, True), "beta": (FLOAT, True)},
    "diff": {"ft": (REF, True), "base": (REF, True)},
    "lora_merge": {"base": (REF, True), "adapter": (REF, True), "scale": (FLOAT, False)},
    "graft": {"base": (REF, True), "ft": (REF, True), "sparsity": (FLOAT, False), "k": (INT, False),
              "include": (STRS, False), "exclude": (STRS, False)},
    **{op: {"model": (REF, True), "sfts": (LOCS, True), "allow_pickle": (BOOL, False), "config_from": (REF, False)}
       for op in ("sft_apply", "sft_revert")},
}
NOT_CHAINABLE = {
    "greedy_soup": "a greedy soup scores candidates between passes; run `surgery soup --greedy`",
}
STEP_KEYS = ("op", "save", "dtype")
TOP_KEYS = ("inputs", "steps", "output")
OUTPUT_KEYS = ("step", "path", "dtype", "max_shard_size")


def _near(word: str, options) -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _unknown(keys, allowed, where: str, what: str) -> None:
    for k in keys:
        if k not in allowed:
            raise PlanError(f"{where}: unknown {what} {k!r}{_near(k, allowed)}")


def _check_type(where: str, key: str, kind, value) -> Any:
    bad = PlanError
    if isinstance(kind, tuple):
        if value not in kind:
            raise bad(f"{where}: parameter {key!r} must be one of {', '.join(kind)}, got {value!r}{_near(value, kind)}")
        return value
    if kind == FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"{where}: parameter {key!r} must be a number, got {value!r}")
        return float(value)
    if kind == FLOATS:
        if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                             for v in value):
            raise bad(f"{where}: parameter {key!r} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if kind == INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(f"{where}: parameter {key!r} must be an integer, got {value!r}")
        return value
    if kind == BOOL:
        if not isinstance(value, bool):
            raise bad(f"{where}: parameter {key!r} must be true or false, got {value!r}")
        return value
    if kind == REF:
        if not isinstance(value, str) or not value:
            raise bad(f"{where}: parameter {key!r} must name an input or a step, got {value!r}")
        return value
    if kind == REFS:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise bad(f"{where}: parameter {key!r} must be a list of input or step names, got {value!r}")
        return value
    if kind == STRS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(f"{where}: parameter {key!r} must be a list of strings (name patterns), got {value!r}")
        return value
    if kind == LOCS:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise bad(f"{where}: parameter {key!r} must be a list of input names, got {value!r}")
        return value
    raise AssertionError(kind)


@dataclass
class Recipe:
    inputs: dict[str, str]
    steps: dict[str, dict]  # name -> {"op", "params", "save", "dtype"}
    output: dict
    root: Path  # relative paths are relative to the recipe file


def parse_recipe(data, root: Path | str = ".") -> Recipe:
    """Validate a recipe (a dict, as loaded from YAML): every key, type and reference, and no cycles."""
    root = Path(root)
    if not isinstance(data, dict):
        raise PlanError("a recipe is a mapping with inputs, steps and output")
    _unknown(data, TOP_KEYS, "recipe", "key")
    inputs = data.get("inputs") or {}
    if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
        raise PlanError("recipe: inputs must map names to locations (folders, files or Hub ids)")
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, dict) or not raw_steps:
        raise PlanError("recipe: steps must map step names to operations")
    steps = {}
    for name, raw in raw_steps.items():
        where = f"step {name!r}"
        if name in inputs:
            raise PlanError(f"{where}: the name is also an input; give steps and inputs different names")
        if not isinstance(raw, dict) or "op" not in raw:
            raise PlanError(f"{where}: a step is a mapping with op and its parameters")
        op = raw["op"]
        if op in NOT_CHAINABLE:
            raise PlanError(f"{where}: op {op!r} cannot be chained in a recipe: {NOT_CHAINABLE[op]}")
        if op not in OPS:
            raise PlanError(f"{where}: unknown op {op!r}{_near(op, list(OPS))}; ops: {', '.join(OPS)}")
        schema = OPS[op]
        for k in raw:
            if k not in STEP_KEYS and k not in schema:
                raise PlanError(f"{where}: unknown parameter {k!r}{_near(k, [*schema, *STEP_KEYS[1:]])}")
        params = {k: _check_type(where, k, schema[k][0], v) for k, v in raw.items() if k in schema}
        for k, (_kind, required) in schema.items():
            if required and k not in params:
                raise PlanError(f"{where}: op {op!r} needs parameter {k!r}")
        for k in ("save", "dtype"):
            if k in raw and not isinstance(raw[k], str):
                raise PlanError(f"{where}: {k} must be a string, got {raw[k]!r}")
        if "dtype" in raw:
            from .run import parse_dtype

            try:
                parse_dtype(raw["dtype"])
            except PlanError as e:
                raise PlanError(f"{where}: {e}") from None
        steps[name] = {"op": op, "params": params, "save": raw.get("save"), "dtype": raw.get("dtype")}
    names = [*inputs, *steps]
    for name, step in steps.items():
        for k, v in step["params"].items():
            kind = OPS[step["op"]][k][0]
            if kind == LOCS:
                for ref in v:
                    if ref not in inputs:
                        raise PlanError(f"step {name!r}: parameter {k!r} refers to {ref!r}, which is not an input"
                                        f"{_near(ref, list(inputs))} (these are files, not steps)")
            for ref in (v if kind == REFS else [v] if kind == REF else []):
                if ref not in inputs and ref not in steps:
                    if k == "config_from":
                        continue  # may be a folder
                    raise PlanError(f"step {name!r}: parameter {k!r} refers to {ref!r}, which is neither an input "
                                    f"nor a step{_near(ref, names)}")
    output = data.get("output")
    if not isinstance(output, dict):
        raise PlanError("recipe: output must be a mapping with step and path")
    _unknown(output, OUTPUT_KEYS, "output", "key")
    if "step" not in output:
        raise PlanError("output: needs step (the step to write)")
    if output["step"] not in steps:
        raise PlanError(f"output: step {output['step']!r} is not a step{_near(output['step'], list(steps))}")
    if "dtype" in output:
        from .run import parse_dtype

        parse_dtype(output["dtype"])
    recipe = Recipe(dict(inputs), steps, dict(output), root)
    _check_acyclic(recipe)
    return recipe


def _deps(recipe: Recipe, name: str) -> list[str]:
    out = []
    step = recipe.steps[name]
    for k, v in step["params"].items():
        kind = OPS[step["op"]][k][0]
        out += [r for r in (v if kind == REFS else [v] if kind == REF else []) if r in recipe.steps]
    return out


def _check_acyclic(recipe: Recipe) -> None:
    state: dict[str, int] = {}

    def visit(n, path):
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = path[path.index(n):] + [n]
            raise PlanError(f"steps form a cycle: {' -> '.join(cycle)}")
        state[n] = 1
        for d in _deps(recipe, n):
            visit(d, path + [n])
        state[n] = 2

    for n in recipe.steps:
        visit(n, [])


def load_recipe(path) -> Recipe:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"no recipe file {path}") from None
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_recipe(data, path.parent)


# -- building ------------------------------------------------------------------------------------


def _location(recipe: Recipe, value: str) -> str:
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    local = recipe.root / p
    if local.exists() or value.startswith((".", "/")):
        return str(local)
    return value  # a Hub id


def build_step(recipe: Recipe, name: str, built: dict | None = None, opened: dict | None = None) -> Built:
    """The lazy value of step ``name`` (and of the steps it uses), each input opened once."""
    built = {} if built is None else built
    opened = {} if opened is None else opened
    if name in built:
        return built[name]
    step = recipe.steps[name]
    op, params = step["op"], step["params"]

    def arg(ref: str):
        if ref in recipe.steps:
            return build_step(recipe, ref, built, opened)
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
        return v

    kw = {k: args(k, v) for k, v in params.items()}
    dtype = step["dtype"]
    if name == recipe.output["step"] and recipe.output.get("dtype") is not None:
        dtype = recipe.output["dtype"]
    try:
        result = _call(op, kw, dtype)
    except PlanError as e:
        raise PlanError(f"step {name!r} ({op}): {e}") from None
    result.name = name
    built[name] = result
    return result


def _call(op: str, kw: dict, dtype: str | None) -> Built:
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
        return build_merge(kw.pop("base"), kw.pop("models"), dtype=dtype, **kw)
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
        from .graft import build_graft

        return build_graft(kw.pop("base"), kw.pop("ft"), dtype=dtype, **kw)
    if op in ("sft_apply", "sft_revert"):
        from .sft import build_apply

        if dtype is not None:
            raise PlanError("sft apply/revert keeps the model's dtype; drop dtype")
        return build_apply(kw.pop("model"), kw.pop("sfts"), revert=op == "sft_revert", scratch=scratch(), **kw)
    raise PlanError(f"unknown op {op!r}")


_SCRATCH: list = []


def scratch() -> Path:
    """A folder that lives while the recipe runs (SFT conversions)."""
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
            final = build_step(recipe, recipe.output["step"], built, opened)
            for name, step in recipe.steps.items():
                if step["save"]:
                    b = build_step(recipe, name, built, opened)
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
        if kind == REF:
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
