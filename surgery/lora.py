"""PEFT LoRA adapters as lazy task vectors.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) is opened by its header,
like a checkpoint. Resolved against a base, every base tensor the adapter touches gets a
:class:`Change`: a low-rank delta ``scaling * B @ A`` (transposed for GPT-2's Conv1D and for
embeddings), a replacement (``modules_to_save``, an embedding peft saved whole, trained biases), or
a LoRA bias added to the base's bias. As a :class:`TaskVector` the adapter is those deltas and zero
for every other tensor; as a model it is base + scale * delta with every other tensor the base's
own. Either way each delta is computed from the two small factors while streaming, one tensor at a
time, never the whole model.

Matching follows peft (0.21): ``rank_pattern``/``alpha_pattern`` keys as in ``get_pattern_key``,
``target_modules``/``layers_to_transform``/``exclude_modules`` as in ``check_target_module_exists``,
``modules_to_save`` as in ``_set_trainable``. What this does not handle exactly (DoRA, layer
replication, trainable tokens, LoRA on parameters, conv LoRA) is refused with the file named.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .engine.plan import Call, Expr, OutputTensor, Ref
from .errors import CheckpointError, IncompatibleInputsError, PlanError
from .io.checkpoint import HUB_ID, Checkpoint, open_checkpoint
from .io.output import is_tokenizer_file
from .io.writer import TensorSpec
from .lazy import Lazy, LazyModel, TaskVector
from .lora_rules import pattern_key, saved_whole, targeted
from .ops import lora as _ops  # noqa: F401  (registers lora_delta and zeros_like)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel's own path to the wrapped model
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                       r"lora_embedding_A|lora_embedding_B)$")
# Options whose effect is not a plain low-rank delta: refused rather than merged approximately.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales each weight's columns by a learned magnitude; merge it with peft",
    "layer_replication": "layer_replication changes the architecture",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens: it has no weight-space merge",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
}
# Operations that map all-zero inputs to zero: a zero delta stays recognisably zero through them.
_ZERO_PRESERVING = {"scale", "add", "sub", "weighted_sum", "mean", "trim_threshold", "dare_drop",
                    "sign_consensus_mean"}


@dataclass(frozen=True)
class LowRank:
    """One LoRA pair: the delta ``scaling * B @ A`` (transposed when ``transpose``)."""

    a: str  # adapter tensor names
    b: str
    rank: int
    scaling: float
    transpose: bool

    def delta(self, weight: Ref, adapter: int, factor: float = 1.0) -> Expr:
        return Call.of("lora_delta", [weight, Ref(adapter, self.a), Ref(adapter, self.b)], rank=self.rank,
                       scaling=self.scaling * factor, transpose=self.transpose)


@dataclass(frozen=True)
class Change:
    """What an adapter does to one base tensor: replace it, add a low-rank delta, add a scaled
    adapter tensor (a LoRA bias), or replace and then add (an embedding peft saved whole)."""

    replacement: str | None = None
    low_rank: LowRank | None = None
    added: tuple[str, float] | None = None  # (adapter tensor, factor)

    def delta(self, name: str, adapter: int, base: int) -> Expr:
        """The change as a task-vector entry: new value minus the base's."""
        terms = []
        if self.replacement is not None:
            terms.append(Call.of("sub", [Ref(adapter, self.replacement), Ref(base, name)]))
        terms += self._additions(Ref(base, name), adapter, 1.0)
        return terms[0] if len(terms) == 1 else Call.of("add", terms)

    def applied(self, name: str, adapter: int, base: int, scale: float) -> Expr:
        """base + scale * change; at scale 1 a replacement is taken as stored, not as base + (new - base)."""
        start: Expr = Ref(base, name)
        if self.replacement is not None:
            new = Ref(adapter, self.replacement)
            start = new if scale == 1.0 else Call.of(
                "add", [start, Call.of("scale", [Call.of("sub", [new, start])], factor=float(scale))])
        terms = [start, *self._additions(Ref(base, name), adapter, scale)]
        return terms[0] if len(terms) == 1 else Call.of("add", terms)

    def _additions(self, weight: Ref, adapter: int, factor: float) -> list[Expr]:
        out = []
        if self.low_rank is not None:
            out.append(self.low_rank.delta(weight, adapter, factor))
        if self.added is not None:
            out.append(Call.of("scale", [Ref(adapter, self.added[0])], factor=self.added[1] * factor))
        return out


@dataclass
class Adapter:
    """A PEFT LoRA adapter, by its config and the header of its weights file."""

    source: str
    root: Path
    config: dict
    weights: Checkpoint

    @property
    def config_file(self) -> str:
        return str(self.root / ADAPTER_CONFIG)

    @property
    def base_model(self) -> str | None:
        """The base recorded in the config (a path or Hub id on the machine that trained it)."""
        return self.config.get("base_model_name_or_path")

    def rank_and_scaling(self, module: str) -> tuple[int, float]:
        """(rank, scaling) of a module, with rank_pattern and alpha_pattern matched as peft does."""
        cfg = self.config
        rank = (cfg.get("rank_pattern") or {}).get(pattern_key(cfg.get("rank_pattern") or {}, module), cfg["r"])
        alpha = (cfg.get("alpha_pattern") or {}).get(pattern_key(cfg.get("alpha_pattern") or {}, module),
                                                    cfg["lora_alpha"])
        return int(rank), float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def is_adapter(spec) -> bool:
    """Whether ``spec`` (a path, an opened checkpoint or an :class:`Adapter`) is a PEFT adapter
    rather than a model: its weights are ``adapter_model.safetensors`` beside an ``adapter_config.json``."""
    if isinstance(spec, Adapter):
        return True
    if isinstance(spec, Checkpoint):
        return (Path(spec.root) / ADAPTER_CONFIG).is_file() and [Path(f).name for f in spec.files] == [ADAPTER_WEIGHTS]
    path = Path(spec).expanduser()
    if path.is_file():
        return path.name == ADAPTER_WEIGHTS and (path.parent / ADAPTER_CONFIG).is_file()
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not any(
        (path / n).exists() for n in ("model.safetensors", "model.safetensors.index.json"))


def open_adapter(spec) -> Adapter:
    """Open a LoRA adapter (a folder, its ``adapter_model.safetensors``, or a Hub id), reading
    its config and weight header only. Unsupported variants are refused here, naming the file."""
    if isinstance(spec, Adapter):
        return spec
    if isinstance(spec, Checkpoint):
        source, root = spec.source, Path(spec.root)
    else:
        source, path = str(spec), Path(spec).expanduser()
        if not path.exists() and HUB_ID.match(source) and not source.startswith((".", "/")):
            path = open_checkpoint(source).root  # fetches the json and safetensors files
        root = path.parent if path.is_file() else path
    config_path = root / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"not a PEFT adapter: no {ADAPTER_CONFIG}", file=str(root))
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse JSON: {e}", file=str(config_path)) from e
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise CheckpointError(f"not a LoRA adapter (peft_type {kind!r}); only LORA adapters are supported",
                              file=str(config_path))
    for option, why in UNSUPPORTED.items():
        if config.get(option):
            raise CheckpointError(f"{why}; refused", file=str(config_path))
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise CheckpointError(f"{key} must be a positive number, got {config.get(key)!r}", file=str(config_path))
    weights_path = root / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        pickled = " (adapter_model.bin is pickled: re-save it with safetensors)" if (root / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"no {ADAPTER_WEIGHTS}{pickled}", file=str(root))
    weights = replace(open_checkpoint(weights_path), source=source)
    for name in weights.tensors:
        if "lora_magnitude_vector" in name:
            raise CheckpointError("DoRA adapter (lora_magnitude_vector) refused: its merge is not a low-rank delta",
                                  file=str(weights_path), tensor=name)
    return Adapter(source, root, config, weights)


# ---------------------------------------------------------------------------------------------
# Matching adapter keys to base tensors


def _name_rule(names: list[str], base: Checkpoint) -> Callable[[str], str]:
    """How the adapter's module paths map to the base's tensor names, chosen once for the whole
    adapter: as they are, without their first component, or with a first component of the base's
    added (an adapter trained on ``LlamaModel`` against a ``LlamaForCausalLM`` checkpoint, or the
    other way round). The rule that finds the most names wins; on a tie, names as they are."""
    rules: list[Callable[[str], str]] = [lambda n: n]
    for first in sorted({n.split(".", 1)[0] + "." for n in names if "." in n}):
        rules.append(lambda n, p=first: n.removeprefix(p))
    for first in sorted({n.split(".", 1)[0] + "." for n in base.tensors if "." in n}):
        rules.append(lambda n, p=first: p + n)
    return max(rules, key=lambda rule: sum(rule(n) in base for n in names))


def _classify(adapter: Adapter) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """The adapter's tensors by what they are: LoRA factors per module path (part -> key), and
    tensors saved whole (their module path and parameter -> key). Keys that are neither, and LoRA
    weights for modules peft would not have adapted, are one error listing them all."""
    cfg, weights = adapter.config, adapter.weights
    pairs: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    unknown = []
    for key in weights.tensors:
        name = key.removeprefix(PEFT_PREFIX)
        m = _LORA_KEY.match(name)
        if m:
            pairs.setdefault(m["module"], {})[m["part"]] = key
            continue
        for infix in (".base_layer.", ".modules_to_save."):  # the wrapped layer's own tensors
            if infix in name:
                whole[name.replace(infix, ".", 1)] = key
                break
        else:
            module, _, param = name.rpartition(".")
            if saved_whole(cfg, module, param):
                whole[name] = key
            else:
                unknown.append(key)
    problems = [f"tensor {k!r} of {weights.files[0]} is not a LoRA weight, a module to save or a trained bias"
                for k in unknown]
    for module in pairs:
        if not targeted(cfg, module):
            problems.append(f"LoRA weights for module {module!r} in {weights.files[0]}, which target_modules "
                            f"{cfg.get('target_modules')!r} (with layers_to_transform, exclude_modules, "
                            "modules_to_save) does not select")
    if problems:
        raise IncompatibleInputsError(problems)
    return pairs, whole


def resolve(adapter: Adapter, base: Checkpoint) -> dict[str, Change]:
    """Every base tensor the adapter changes, and how. Besides :func:`_classify`'s errors, targets
    missing from the base and shape mismatches are errors, all listed at once."""
    cfg, weights = adapter.config, adapter.weights
    pairs, whole = _classify(adapter)
    problems = []
    wanted = list(whole) + [f"{m}.{'bias' if p == 'lora_B.bias' else 'weight'}" for m, ps in pairs.items() for p in ps]
    to_base = _name_rule(wanted, base)
    changes: dict[str, dict] = {}
    for name, key in whole.items():
        changes.setdefault(to_base(name), {})["replacement"] = key
    for module, parts in pairs.items():
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a, b = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding else \
            (parts.get("lora_A.weight"), parts.get("lora_B.weight"))
        if a is None or b is None:
            problems.append(f"module {module!r} has only {', '.join(sorted(parts))} in {weights.files[0]}: "
                            "a LoRA needs both its A and B")
            continue
        rank, scaling = adapter.rank_and_scaling(module)
        sa, sb = weights.tensors[a].shape, weights.tensors[b].shape
        if len(sa) != 2 or len(sb) != 2:
            problems.append(f"module {module!r}: LoRA factors of shapes {list(sa)} and {list(sb)} in "
                            f"{weights.files[0]}; only Linear, Conv1D and Embedding LoRA are supported")
            continue
        if sa[0] != rank or sb[1] != rank:
            problems.append(f"module {module!r}: factors of rank {sa[0]} in {weights.files[0]} but the config "
                            f"({adapter.config_file}) gives rank {rank}")
            continue
        transpose = embedding or bool(cfg.get("fan_in_fan_out"))
        changes.setdefault(to_base(f"{module}.weight"), {})["low_rank"] = LowRank(a, b, rank, scaling, transpose)
        if "lora_B.bias" in parts:
            changes.setdefault(to_base(f"{module}.bias"), {})["added"] = (parts["lora_B.bias"], scaling)
    out = {}
    for name, parts in changes.items():
        info = base.tensors.get(name)
        if info is None:
            why = f"which {base.source} ties to {base.tied[name]!r}: changing one tied tensor is not supported" \
                if name in base.tied else f"which is not in the base {base.source}"
            problems.append(f"the adapter {adapter.source} changes tensor {name!r}, {why}")
            continue
        change = Change(**parts)
        for shape, what in _shapes(change, weights):
            if shape != info.shape:
                hint = " (is fan_in_fan_out right?)" if tuple(reversed(shape)) == info.shape else ""
                problems.append(f"tensor {name!r} has shape {list(info.shape)} in {info.file} but the adapter's "
                                f"{what} is {list(shape)}{hint}")
        if not info.is_float:
            problems.append(f"tensor {name!r} is {info.dtype} in {info.file}: an adapter changes float tensors only")
        out[name] = change
    if problems:
        raise IncompatibleInputsError(problems)
    return out


def _shapes(change: Change, weights: Checkpoint):
    if change.replacement is not None:
        yield weights.tensors[change.replacement].shape, f"saved tensor {change.replacement!r}"
    if change.low_rank is not None:
        lr = change.low_rank
        shape = (weights.tensors[lr.b].shape[0], weights.tensors[lr.a].shape[1])
        yield (tuple(reversed(shape)) if lr.transpose else shape), f"delta B @ A{'.T' if lr.transpose else ''}"
    if change.added is not None:
        yield weights.tensors[change.added[0]].shape, f"bias {change.added[0]!r}"


# ---------------------------------------------------------------------------------------------
# Lazy values


def _base(base) -> Checkpoint:
    ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    if is_adapter(ckpt):
        raise PlanError(f"{ckpt.source} is a LoRA adapter; the base must be the model it was trained on")
    return ckpt


def _sidecars(adapter: Adapter, base: Checkpoint) -> Path:
    """Where the adapted model's tokenizer comes from: the adapter's folder if training saved one
    there (it may have added tokens), else the base's."""
    has_tokenizer = any(is_tokenizer_file(p.name) for p in adapter.root.iterdir() if p.is_file())
    return adapter.root if has_tokenizer else Path(base.root)


def _summary(adapter: Adapter, base: Checkpoint, changes: dict[str, Change]) -> dict:
    cfg = adapter.config
    return {"lora": adapter.source, "base": base.source, "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
            "use_rslora": bool(cfg.get("use_rslora")), "target_modules": cfg.get("target_modules"),
            "changed_tensors": len(changes)}


def lora_task_vector(adapter, base) -> TaskVector:
    """The adapter's change to ``base`` as a lazy task vector: the low-rank delta (or replacement
    minus base) where it changes a tensor, zero for every other float tensor, the base's integer
    tensors carried. Applying it elsewhere (``apply_to``) leaves the zero tensors exactly as the
    target has them, without reading anything for them."""
    ad, base_c = open_adapter(adapter), _base(base)
    changes = resolve(ad, base_c)
    tensors = {}
    for name, info in base_c.tensors.items():  # inputs: 0 the adapter, 1 the base
        spec = TensorSpec(name, info.dtype, info.shape)
        if not info.is_float:
            expr = Call.of("copy", [Ref(1, name)])
        elif name in changes:
            expr = changes[name].delta(name, adapter=0, base=1)
        else:
            expr = Call.of("zeros_like", [Ref(1, name)])
        tensors[name] = OutputTensor(spec, expr)
    lazy = Lazy((ad.weights, base_c), tensors, dict(base_c.tied), _sidecars(ad, base_c),
                (_summary(ad, base_c, changes),))
    return TaskVector(lazy, {"ft": ad.source, "base": base_c.source})


def adapted(adapter, base, scale: float = 1.0) -> LazyModel:
    """``base + scale * adapter`` as a lazy model laid out like ``base``: the tensors the adapter
    does not touch are the base's own (copied bit for bit), the others computed per tensor."""
    ad, base_c = open_adapter(adapter), _base(base)
    changes = resolve(ad, base_c)
    tensors = {}
    for name, info in base_c.tensors.items():  # inputs: 0 the base, 1 the adapter
        expr = changes[name].applied(name, adapter=1, base=0, scale=float(scale)) if name in changes else Ref(0, name)
        tensors[name] = OutputTensor(TensorSpec(name, info.dtype, info.shape), expr)
    history = ({"checkpoint": base_c.source}, {**_summary(ad, base_c, changes), "scale": float(scale)})
    sidecars = _sidecars(ad, base_c)
    lazy = Lazy((base_c, ad.weights), tensors, dict(base_c.tied), Path(base_c.root), history)
    return LazyModel(lazy, tokenizer_from=sidecars if sidecars != Path(base_c.root) else None)


def is_zero_delta(expr: Expr) -> bool:
    """Whether an expression is an adapter's zero delta, possibly scaled, summed or merged with
    other zeros: applying it changes nothing, so the target's tensor is kept as it is."""
    if not isinstance(expr, Call):
        return False
    if expr.op == "zeros_like":
        return True
    return expr.op in _ZERO_PRESERVING and all(is_zero_delta(a) for a in expr.args)


def adapter_base(adapter: Adapter, base=None) -> Checkpoint:
    """The base to apply an adapter to: ``base`` if given, else the one its config records."""
    spec = base if base is not None else adapter.base_model
    if spec is None:
        raise PlanError(f"the adapter {adapter.source} records no base_model_name_or_path; give the base (--base)")
    if base is None and not os.path.exists(spec) and not HUB_ID.match(str(spec)):
        raise PlanError(f"the adapter's base {spec!r} ({adapter.config_file}) is neither a folder here nor a Hub id; "
                        "give the base (--base)")
    return _base(spec)
