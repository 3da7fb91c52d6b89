"""Line up the tensors of several inputs from their headers, reporting every mismatch at once."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import IncompatibleInputsError
from ..io.checkpoint import Checkpoint


@dataclass
class Alignment:
    names: list[str]  # output tensor names, in the layout source's order
    untied: list[str]  # heads the layout source ties but another input stores: the output stores them


def align(ckpts: list[Checkpoint], layout: int = 0) -> Alignment:
    """Check that every input provides every tensor with one shape and one kind (float or not).

    The output follows input ``layout``. A head that it ties but another input stores is added to
    the output (read from the embedding for tied inputs), so no input's head is silently dropped.
    """
    first = ckpts[layout]
    names = list(first.tensors)
    untied = []
    problems = []
    for other in ckpts:
        if other is first:
            continue
        for name in other.tensors:
            if name not in first.tensors:
                if name in first.tied:
                    if name not in untied:
                        untied.append(name)
                        names.append(name)
                else:
                    problems.append(f"tensor {name!r} is in {other.source} but not in {first.source}")
    for name in names:
        ref = first.resolve(name)
        for other in ckpts:
            info = other.resolve(name)
            if info is None:
                problems.append(f"tensor {name!r} is missing from {other.source}")
            elif info.shape != ref.shape:
                problems.append(f"tensor {name!r} has shape {list(info.shape)} in {info.file} "
                                f"but {list(ref.shape)} in {ref.file}")
            elif info.is_float != ref.is_float:
                problems.append(f"tensor {name!r} is {info.dtype} in {info.file} but {ref.dtype} in {ref.file}")
    if problems:
        raise IncompatibleInputsError(problems)
    return Alignment(names, untied)
