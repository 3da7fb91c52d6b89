"""The torch-free CPU path of the executor, for the tensors whose operations are numpy-capable.

Soups, task arithmetic and transfers are a few multiply-adds per element: on a CPU their cost is
moving bytes, and importing torch alone (2-3 s) can take longer than the arithmetic on a 300M model.
This path reads inputs as views into mapped shards, widens bf16 by bit shifting, evaluates the same registered
operations block by block over one thread per core (numpy releases the GIL in its loops) and rounds
to the output dtype exactly as torch does: float64 goes to float32 first (torch converts double
through float), bf16 rounds to nearest even, a NaN becomes the canonical quiet NaN 0x7FC0.
"""
from __future__ import annotations

import hashlib
import math
import sys
from typing import Mapping, Sequence

import numpy as np

from ..io.checkpoint import Checkpoint
from ..io.mapped import MappedFiles
from .buffers import BufferPool
from ..ops.common import compute as to_compute
from .evaluate import compile_expr, elementwise, evaluate, numpy_capable
from .narrow import evaluate_block as narrow_block, plan_narrow
from .parallel import map_ranges
from .plan import Call, OutputTensor, Ref, refs

BLOCK_ELEMENTS = 1 << 17  # 1 MB of float64: far fewer numpy calls per element than cache-sized blocks, still within L2
NARROW_BLOCK_ELEMENTS = 1 << 18  # the same megabyte, of float32 (engine.narrow)
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
STORAGE = {  # how each safetensors dtype is held in numpy; bf16 as its raw 16 bits
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_BF16_NAN = np.uint16(0x7FC0)
_LITTLE_ENDIAN = sys.byteorder == "little"


def usable(outputs: Sequence[OutputTensor], ckpts: Sequence[Checkpoint]) -> bool:
    """Whether every output tensor can be computed here with the same bits as on the torch path."""
    for out in outputs:
        expr = out.expr
        if not numpy_capable(expr) or out.spec.dtype not in STORAGE:
            return False
        leaves = [ckpts[r.input].resolve(r.name) for r in refs(expr)]
        if any(info.begin < 0 or info.dtype not in STORAGE for info in leaves):
            return False  # pickled inputs are read through torch
        if isinstance(expr, Ref) or (expr.op == "copy" and isinstance(expr.args[0], Ref)):
            same = leaves[0].dtype == out.spec.dtype
            if not same and not (leaves[0].dtype in FLOAT_CODES and out.spec.dtype in FLOAT_CODES):
                return False
            continue
        numel = math.prod(out.spec.shape)
        # arithmetic only on floats (integer promotion rules differ between numpy and torch);
        # elementwise trees only on same-sized inputs (no broadcasting)
        if any(info.dtype not in FLOAT_CODES for info in leaves):
            return False
        if elementwise(expr):
            if out.spec.dtype not in FLOAT_CODES or any(math.prod(info.shape) != numel for info in leaves):
                return False
    return True


def mappable(outputs: Sequence[OutputTensor], ckpts: Sequence[Checkpoint]) -> bool:
    """Whether every input the outputs read can be viewed as numpy arrays (safetensors, known dtypes)."""
    return all(ckpts[r.input].resolve(r.name).begin >= 0 and ckpts[r.input].resolve(r.name).dtype in STORAGE
               for out in outputs for r in refs(out.expr))


def expr_usable(expr, ckpts: Sequence[Checkpoint]) -> bool:
    """Whether a statistics expression runs here: a bare reference (any dtype), or elementwise
    numpy-capable arithmetic on same-sized float inputs."""
    leaves = [ckpts[r.input].resolve(r.name) for r in refs(expr)]
    if any(info.begin < 0 or info.dtype not in STORAGE for info in leaves):
        return False
    if isinstance(expr, Ref):
        return True
    sizes = {math.prod(info.shape) for info in leaves}
    return numpy_capable(expr) and elementwise(expr) and len(sizes) == 1 and \
        all(info.dtype in FLOAT_CODES for info in leaves)


def blocks(exprs, loaded: Mapping[Ref, np.ndarray], codes: Mapping[Ref, str], lo: int, hi: int):
    """``(start, [flat values of each expression])`` block by block over entries ``lo..hi``, in
    order, on the calling thread (for statistics passes). A bare reference yields its stored values."""
    compiled = [(e if isinstance(e, Ref) else None, compile_expr(e)) for e in exprs]
    with np.errstate(all="ignore"):
        for start in range(lo, max(hi, lo + 1), BLOCK_ELEMENTS):
            stop = min(start + BLOCK_ELEMENTS, hi)
            part = None
            values = []
            for ref, fn in compiled:
                if ref is not None:
                    values.append(loaded[ref][start:stop])
                    continue
                if part is None:
                    part = {r: _leaf(a[start:stop], codes[r]) for r, a in loaded.items()}
                values.append(fn(part).reshape(-1))
            yield start, values


def reader(files: MappedFiles):
    """``read(checkpoint, name, want_digest) -> (flat read-only array in its storage dtype, sha256 hex
    or None)``: a view into the mapped shard, its pages faulted in on the calling (read-ahead) thread."""

    def read(ckpt: Checkpoint, name: str, want_digest: bool):
        info = ckpt.resolve(name)
        raw = files.view(info)
        digest = hashlib.sha256(raw).hexdigest() if want_digest else None
        return raw.view(STORAGE[info.dtype]), digest

    return read


def widen(raw: np.ndarray, code: str, out: np.ndarray | None = None) -> np.ndarray:
    """A leaf as a numpy float array the operations can take: bf16 bits shifted into float32 (exact),
    into ``out`` (uint32, as many entries) if given."""
    if code == "BF16":
        return np.left_shift(raw, 16, dtype=np.uint32, out=out).view(np.float32)
    return raw


def _leaf(raw: np.ndarray, code: str) -> np.ndarray:
    """A block of an input in the compute dtype, read-only: a tree may use it several times, and
    operations update in place only the arrays they own (see ``ops.common.owned``)."""
    leaf = to_compute(widen(raw, code))
    leaf.flags.writeable = False
    return leaf


def store(value: np.ndarray, code: str, out: np.ndarray, finite: bool = False) -> None:
    """Round ``value`` into ``out`` (the output's storage dtype), as torch's ``.to`` would; ``finite``:
    the caller knows ``value`` has no NaN."""
    if code in ("F16", "BF16") and value.dtype != np.float32:
        value = value.astype(np.float32)  # through float first, as torch converts double and half
    if code != "BF16":
        np.copyto(out, value, casting="unsafe")
        return
    bits = value.view(np.uint32)
    rounded = np.right_shift(bits, 16)
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits  # round to nearest, ties to even; overflow to inf is right, NaNs are fixed below
    if _LITTLE_ENDIAN:
        np.copyto(out, rounded.view(np.uint16)[1::2])  # the high halves: the shift and the narrowing in one pass
    else:
        rounded >>= 16
        np.copyto(out, rounded, casting="unsafe")
    if not finite and np.isnan(value.max()):  # one reduction (max propagates NaN) instead of a mask per block
        out[np.isnan(value)] = _BF16_NAN


class Reuse:
    """What whole-tensor operations computed from the current input arrays, kept for the next output
    tensor: consecutive outputs over the same inputs (an SFT's indices, then its values, which
    gather at those indices) widen the inputs and evaluate shared sub-expressions once."""

    def __init__(self, pool: BufferPool | None):
        self.pool = pool
        self.key: tuple = ()
        self.memo: dict = {}
        self.held: list = []  # the input arrays of ``key``: alive, so their ids stay theirs
        self.taken: list = []  # pooled buffers behind the widened leaves

    def memo_for(self, loaded: Mapping[Ref, np.ndarray]) -> dict:
        key = tuple((r, id(a)) for r, a in loaded.items())
        if key != self.key:
            self.clear()
            self.key, self.held = key, list(loaded.values())
        return self.memo

    def widened(self, raw: np.ndarray, code: str) -> np.ndarray:
        if code == "BF16" and self.pool is not None:
            self.taken.append(self.pool.take(raw.size * 4))
            leaf = widen(raw, code, self.taken[-1].view(np.uint32))
        else:
            leaf = widen(raw, code)
        leaf.flags.writeable = False
        return leaf

    def clear(self) -> None:
        self.memo.clear()
        self.key, self.held = (), []
        for buffer in self.taken:
            self.pool.give(buffer)
        self.taken = []


def compute(expr, loaded: Mapping[Ref, np.ndarray], codes: Mapping[Ref, str], shape: tuple[int, ...],
            dtype_code: str, pool: BufferPool | None = None, reuse: Reuse | None = None) -> np.ndarray:
    """The output tensor, flat, in its storage dtype, in a buffer from ``pool``. ``reuse`` carries
    whole-tensor results over to the next call (see :class:`Reuse`)."""
    numel = math.prod(shape)
    if reuse is not None:
        reuse.memo_for(loaded)  # other inputs than last time: let last time's results go
    storage = np.dtype(STORAGE[dtype_code])
    out = (pool.take(numel * storage.itemsize) if pool is not None else np.empty(numel * storage.itemsize, np.uint8)
           ).view(storage)
    if isinstance(expr, Call) and expr.op != "copy" and not elementwise(expr):
        # a whole-tensor operation (sparse selections): bf16 inputs widened to float32 (exact, half
        # the size of float64); the operation works piece by piece in the compute dtype
        # (widened into pooled buffers: a fresh tensor-sized buffer per input costs its page faults)
        own = reuse is None
        reuse = reuse if reuse is not None else Reuse(pool)
        memo = reuse.memo_for(loaded)
        with np.errstate(all="ignore"):
            for r, a in loaded.items():
                if r not in memo:
                    memo[r] = reuse.widened(a, codes[r])
            store(np.asarray(evaluate(expr, {r: memo[r] for r in loaded}, memo)).reshape(-1), dtype_code, out)
        if own:
            reuse.clear()
        return out
    if not elementwise(expr):  # a bare reference or a copy
        src = refs(expr)[0]
        if codes[src] == dtype_code:
            np.copyto(out, loaded[src])  # the same bytes, out of the map (whose pages are released next)
            return out
        with np.errstate(all="ignore"):
            store(widen(loaded[src], codes[src]), dtype_code, out)
        return out

    evaluate_block = compile_expr(expr)
    narrow = plan_narrow(expr, codes, dtype_code)  # float64 plans: float32 where it gives the same bits
    block = NARROW_BLOCK_ELEMENTS if narrow is not None else BLOCK_ELEMENTS

    def run(lo: int, hi: int) -> None:
        with np.errstate(all="ignore"):  # inf and NaN propagate silently, as in torch
            for start in range(lo, hi, block):
                stop = min(start + block, hi)
                if narrow is not None:
                    narrow_block(narrow, evaluate_block, {r: a[start:stop] for r, a in loaded.items()},
                                 lambda a, r: _leaf(a, codes[r]), lambda v, o, finite=False: store(v, dtype_code, o, finite),
                                 out[start:stop])
                    continue
                # each leaf converted to the compute dtype once per block, however often the tree uses it
                value = evaluate_block({r: _leaf(a[start:stop], codes[r]) for r, a in loaded.items()})
                store(value, dtype_code, out[start:stop])

    map_ranges(run, numel, block)
    return out
