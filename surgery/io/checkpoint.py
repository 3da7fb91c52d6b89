"""Open a checkpoint from a folder, a single file or a Hub repo id, reading headers only.

A :class:`Checkpoint` knows every tensor's name, dtype, shape and byte range before one weight is
read; weights are then read one tensor at a time (see :mod:`surgery.io.read`), never by mapping a
whole shard.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, PickleRefusedError
from .safetensors_header import TensorInfo, read_header

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# What a Hub pull fetches: weights, index and json (config, tokenizer, generation config), plus the
# few non-json tokenizer files without which the copied tokenizer would not load.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "vocab.txt", "merges.txt", "*.jinja"]
# Output heads that transformers drops from the file when the config ties them to the input embedding.
TIED_HEAD_NAMES = ("lm_head.weight", "cls.predictions.decoder.weight")
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
                      "embed_in.weight", "shared.weight")
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Checkpoint:
    """Header index of one checkpoint. Plain data plus lazy reads; cheap to create, holds no weights."""

    source: str  # what the user asked for: a path or a repo id
    root: Path  # folder holding the files (sidecars such as config.json live here)
    tensors: dict[str, TensorInfo]  # in file order
    files: list[str]
    config: dict | None = None
    pickled: bool = False
    tied: dict[str, str] = field(default_factory=dict)  # missing head name -> embedding it is tied to

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.tied

    def resolve(self, name: str) -> TensorInfo | None:
        """The stored tensor that provides ``name``, following a tied head to its embedding."""
        info = self.tensors.get(name)
        if info is None and name in self.tied:
            info = self.tensors[self.tied[name]]
        return info

    def read(self, name: str, device: str = "cpu"):
        from .read import read_tensor

        info = self.resolve(name)
        if info is None:
            raise CheckpointError("tensor not found", file=str(self.root), tensor=name)
        return read_tensor(info, device)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())


def open_checkpoint(spec: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """Open ``spec``: a folder, a ``.safetensors`` file, or a Hub id ``org/name[@revision]``."""
    source = str(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        if HUB_ID.match(source) and not source.startswith((".", "/")):
            from ..hub import open_hub  # config and index fetched, shard headers read remotely

            return open_hub(source)
        raise CheckpointError("no such file or folder", file=source)
    if path.is_file():
        return _open_file(source, path, allow_pickle)
    return _open_folder(source, path, allow_pickle)


def open_checkpoints(inputs, allow_pickle: bool = False) -> list[Checkpoint]:
    """Open a list of inputs (locations or already opened checkpoints)."""
    from ..errors import PlanError

    if isinstance(inputs, (str, os.PathLike)):
        raise PlanError("inputs must be a list of checkpoints, not a single path")
    ckpts = [c if isinstance(c, Checkpoint) else open_checkpoint(c, allow_pickle=allow_pickle) for c in inputs]
    if not ckpts:
        raise PlanError("no input checkpoints given")
    return ckpts


def _open_file(source: str, path: Path, allow_pickle: bool) -> Checkpoint:
    if path.name.endswith(".index.json"):
        return _open_folder(source, path.parent, allow_pickle, index=path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _open_pickle(source, path.parent, [path], allow_pickle)
    tensors, _ = read_header(str(path.absolute()))
    return _finish(source, path.parent, tensors, [str(path.absolute())])


def find_index(folder: Path) -> Path | None:
    """The safetensors index of a folder: ``model.safetensors.index.json``, else the only one."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    preferred = folder / "model.safetensors.index.json"
    index = preferred if preferred.exists() else (indexes[0] if len(indexes) == 1 else None)
    if index is None and len(indexes) > 1:
        raise CheckpointError(f"several safetensors indexes ({', '.join(p.name for p in indexes)}); "
                              "pass the one you mean", file=str(folder))
    return index


def _open_folder(source: str, folder: Path, allow_pickle: bool, index: Path | None = None) -> Checkpoint:
    if index is None:
        index = find_index(folder)
    if index is not None:
        return open_index(source, folder, index)
    single = folder / "model.safetensors"
    files = [single] if single.exists() else sorted(folder.glob("*.safetensors"))
    if files:
        return open_files(source, folder, files)
    pickled = [folder / n for n in PICKLE_NAMES if (folder / n).exists()]
    if pickled:
        if pickled[0].name.endswith(".index.json"):
            shard_names = sorted(set(_load_json(pickled[0])["weight_map"].values()))
            return _open_pickle(source, folder, [_inside(folder, s, pickled[0]) for s in shard_names], allow_pickle)
        return _open_pickle(source, folder, pickled, allow_pickle)
    raise CheckpointError("no safetensors weights found (expected model.safetensors or "
                          "model.safetensors.index.json)", file=str(folder))


def open_files(source: str, folder: Path, files: list[Path], known: dict | None = None) -> Checkpoint:
    """A checkpoint of safetensors files without an index. ``known`` maps a file's path to a header
    already read elsewhere (a Hub shard's, over HTTP); other files are read here."""
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        path = str(f.absolute())
        part = known[path] if known and path in known else read_header(path)[0]
        for name in part:
            if name in tensors:
                raise CheckpointError(f"tensor appears in two files without an index (also in {tensors[name].file})",
                                      file=str(f), tensor=name)
        tensors.update(part)
    return _finish(source, folder, tensors, [str(f.absolute()) for f in files])


def _weight_map(index: Path) -> dict:
    data = _load_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("index has no weight_map", file=str(index))
    return weight_map


def index_shards(folder: Path, index: Path) -> list[str]:
    """The shard files an index names (each checked to stay inside ``folder``), in index order."""
    return list(dict.fromkeys(str(_inside(folder, shard, index, name)) for name, shard in _weight_map(index).items()))


def open_index(source: str, folder: Path, index: Path, known: dict | None = None) -> Checkpoint:
    """A sharded checkpoint; ``known`` maps shard paths to headers read elsewhere (see :func:`open_files`)."""
    weight_map = _weight_map(index)
    headers: dict[str, dict[str, TensorInfo]] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        shard_path = str(_inside(folder, shard, index, name))
        if shard_path not in headers and known and shard_path in known:
            headers[shard_path] = known[shard_path]
        if shard_path not in headers:
            if not os.path.isfile(shard_path):
                raise CheckpointError(f"index points to missing shard {shard}", file=str(index), tensor=name)
            headers[shard_path], _ = read_header(shard_path)
        info = headers[shard_path].get(name)
        if info is None:
            raise CheckpointError(f"index maps the tensor to {shard}, whose header lacks it", file=shard_path, tensor=name)
        tensors[name] = info
    # Keep file order (shard by shard, offset by offset) so reads walk each file forwards.
    headers = dict(sorted(headers.items()))
    order = {f: i for i, f in enumerate(headers)}
    tensors = dict(sorted(tensors.items(), key=lambda kv: (order[kv[1].file], kv[1].begin)))
    return _finish(source, folder, tensors, list(headers))


def _inside(folder: Path, relative: str, index: Path, tensor: str | None = None) -> Path:
    """Resolve an index entry, refusing any that escapes the checkpoint folder (absolute, ``..``).

    The check is on the normalised path, not on symlink targets: in a Hugging Face cache every
    snapshot file is a symlink into the shared blob store, and that is where it is meant to point.
    Paths stay unresolved so files keep their real names (not blob hashes) in reports and errors.
    """
    root = os.path.normpath(os.path.abspath(folder))
    if not isinstance(relative, str) or os.path.isabs(relative) or "\0" in relative:
        raise CheckpointError(f"index entry {relative!r} points outside the checkpoint folder", file=str(index), tensor=tensor)
    target = os.path.normpath(os.path.join(root, relative))
    if os.path.commonpath([root, target]) != root or target == root:
        raise CheckpointError(f"index entry {relative!r} points outside the checkpoint folder", file=str(index), tensor=tensor)
    return Path(target)


def _open_pickle(source: str, folder: Path, files: list[Path], allow_pickle: bool) -> Checkpoint:
    if not allow_pickle:
        raise PickleRefusedError("pickled checkpoint refused: pickle can run arbitrary code; convert it to "
                                 "safetensors or pass --allow-pickle (loads with torch.load(weights_only=True))",
                                 file=str(files[0]))
    from .read import pickle_tensor_infos

    tensors: dict[str, TensorInfo] = {}
    for f in files:
        tensors.update(pickle_tensor_infos(str(f.absolute())))
    ckpt = _finish(source, folder, tensors, [str(f.absolute()) for f in files])
    ckpt.pickled = True
    return ckpt


def _finish(source: str, folder: Path, tensors: dict[str, TensorInfo], files: list[str]) -> Checkpoint:
    config_path = folder / "config.json"
    config = _load_json(config_path) if config_path.exists() else None
    return Checkpoint(source, folder, tensors, files, config, tied=_tied_heads(tensors, config))


def _tied_heads(tensors: dict[str, TensorInfo], config: dict | None) -> dict[str, str]:
    """The head absent from the file because the config ties it to the input embedding.

    Which head a model has comes from its architecture: causal and seq2seq LMs have ``lm_head``,
    BERT-style masked LMs ``cls.predictions.decoder``, and a bare encoder (``BertModel``) none.
    """
    if config is None:
        return {}
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    explicit = config.get("tie_word_embeddings", text_config.get("tie_word_embeddings"))
    # transformers' default for tie_word_embeddings is True when a config does not say.
    if explicit is False:
        return {}
    head = _head_name(config.get("architectures") or [], explicit is True)
    if head is None or head in tensors:
        return {}
    embeddings = [n for n in tensors if n.endswith(EMBEDDING_SUFFIXES) and len(tensors[n].shape) == 2]
    return {head: embeddings[0]} if len(embeddings) == 1 else {}


def _head_name(architectures: list[str], explicitly_tied: bool) -> str | None:
    for arch in architectures:
        if arch.endswith(("ForMaskedLM", "ForPreTraining")):
            return "cls.predictions.decoder.weight"
        if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSeq2SeqLM")):
            return "lm_head.weight"
    # No architecture recorded: only a config that says it ties has a tied lm_head.
    return "lm_head.weight" if explicitly_tied and not architectures else None


def _load_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse JSON: {e}", file=str(path)) from e
