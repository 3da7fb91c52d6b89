"""peft's rules for which modules a LoRA config adapts, which ranks and alphas they get, and which
tensors it saves whole: written out here so an adapter is read as peft loads it, without peft."""
from __future__ import annotations

import re


def pattern_key(patterns: dict, module: str) -> str:
    """peft's ``get_pattern_key``: the first pattern that matches a dotted suffix of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def targeted(config: dict, module: str) -> bool:
    """peft's ``check_target_module_exists`` for a module that has LoRA weights."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, module):
            return False
        if not isinstance(exclude, str) and (module in exclude or any(module.endswith(f".{e}") for e in exclude)):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            if (match := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)) is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def saved_whole(config: dict, module: str, param: str) -> bool:
    """Whether a plain tensor in the adapter is one peft trains in full: inside a module in
    ``modules_to_save`` (the module or one of its containers matched by suffix, as ``_set_trainable``
    does) or a bias under ``bias="all"`` or ``"lora_only"``."""
    parts = module.split(".")
    ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # peft wraps containers whole too
    if any(a.endswith(m) for a in ancestors for m in config.get("modules_to_save") or []):
        return True
    return param == "bias" and config.get("bias", "none") in ("all", "lora_only")
