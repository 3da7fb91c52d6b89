"""Line up the tensors of several inputs from their headers, reporting every mismatch at once."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import IncompatibleInputsError
from ..io.checkpoint import Checkpoint


@dataclass
class Alignment:
    names: list[str]  # output tensor names, in the layout source's order
    untied: list[str]  # heads the layout source ties but another input stores: the output stores them
    buffers: dict[str, int]  # integer/bool tensors only some inputs have -> the input to copy them from


def align(ckpts: list[Checkpoint], layout: int = 0) -> Alignment:
    """Check that every input provides every tensor with one shape and one kind (float or not).

    The output follows input ``layout``. A head that it ties but another input stores is added to
    the output (read from the embedding for tied inputs), so no input's head is silently dropped.
    Integer and bool buffers need not be in every input (transformers 5 no longer saves
    ``position_ids``, older checkpoints have them): they are copied from the first input that has one.
    """
    first = ckpts[layout]
    names = list(first.tensors)
    untied = []
    buffers: dict[str, int] = {}
    problems = []
    for k, other in enumerate(ckpts):
        if other is first:
            continue
        for name, info in other.tensors.items():
            if name in first.tensors or name in names:
                continue
            if name in first.tied:
                untied.append(name)
                names.append(name)
            elif not info.is_float:
                buffers[name] = k
                names.append(name)
            else:
                problems.append(f"tensor {name!r} is in {other.source} but not in {first.source}")
    for name in names:
        ref = first.resolve(name) or ckpts[buffers[name]].resolve(name)
        for other in ckpts:
            info = other.resolve(name)
            if info is None:
                if not ref.is_float:
                    buffers.setdefault(name, layout)
                    continue
                problems.append(f"tensor {name!r} is missing from {other.source}")
            elif info.shape != ref.shape:
                problems.append(f"tensor {name!r} has shape {list(info.shape)} in {info.file} "
                                f"but {list(ref.shape)} in {ref.file}")
            elif info.is_float != ref.is_float:
                problems.append(f"tensor {name!r} is {info.dtype} in {info.file} but {ref.dtype} in {ref.file}")
    if problems:
        raise IncompatibleInputsError(problems)
    return Alignment(names, untied, buffers)
