"""The recipe file's schema: which operations a step may name, their typed parameters, and the
parsing that turns YAML (or a dict) into a checked :class:`Recipe`, every mistake one line naming
the step and the nearest valid name."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PlanError

# -- the recipe schema --------------------------------------------------------------------------

REF, REFS, FLOAT, FLOATS, INT, BOOL, STR = "ref", "refs", "float", "floats", "int", "bool", "str"
STRS = "strs"  # a list of strings (name patterns)
LOCS = "locs"  # input names passed on as locations (files the op opens itself), not opened here
LOC = "loc"  # one such input name
# the kinds that name inputs or steps: (a list of them?, what the value must be)
_NAME_KINDS = {REF: (False, "name an input or a step"), REFS: (True, "be a list of input or step names"),
               LOC: (False, "name an input"), LOCS: (True, "be a list of input names")}
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
              "include": (STRS, False), "exclude": (STRS, False), "mask": (LOC, False)},
    **{op: {"model": (REF, True), "sfts": (LOCS, True), "allow_pickle": (BOOL, False), "config_from": (REF, False)}
       for op in ("sft_apply", "sft_revert")},
    "reduce_intruders": {"base": (REF, True), "ft": (REF, True), "lambda": (FLOAT, False), "k": (INT, False),
                         "epsilon": (FLOAT, False), "include": (STRS, False),
                         "ft_svd": (("auto", "full", "randomized"), False)},
}
NOT_CHAINABLE = {
    "greedy_soup": "a greedy soup scores candidates between passes; run `surgery soup --greedy`",
    "graft_learned": "a learned graft trains its mask between passes; run `surgery graft --learn --mask-out M`, "
                     "then graft by the mask file in a recipe (graft with mask: M)",
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
    if kind in _NAME_KINDS:
        many, what = _NAME_KINDS[kind]
        ok = (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)) if many \
            else (isinstance(value, str) and value)
        if not ok:
            raise bad(f"{where}: parameter {key!r} must {what}, got {value!r}")
        return value
    if kind == STRS:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(f"{where}: parameter {key!r} must be a list of strings (name patterns), got {value!r}")
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
            if kind in (LOC, LOCS):
                for ref in (v if kind == LOCS else [v]):
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
