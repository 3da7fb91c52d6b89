"""Session-wide fixtures: real ``transformers`` checkpoints built once from tiny configs.

Each family has a base model and "fine-tuned" variants (the base perturbed with different seeds,
then ``save_pretrained``), so ingredients share an architecture. Nothing here uses the library.
"""
from __future__ import annotations

import os

# Before anything imports huggingface_hub / transformers: no network, no progress bars.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _support import copy_tokenizer, minilm_dir, weight_files, write_st

torch.set_num_threads(1)

LLAMA_SHARD = "100KB"  # the tiny Llama below is ~430 KB: 5 shards and an index


def _perturb(model, seed: int, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters are listed once
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def _save(model, folder: Path, marker: str, gen_tokens: int | None = None, dtype=None, **kw) -> Path:
    model.config.surgery_fixture = marker  # tells configs apart (for --config-from)
    if gen_tokens is not None:
        model.generation_config.max_new_tokens = gen_tokens
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **kw)
    copy_tokenizer(folder)
    return folder


def _family(root: Path, name: str, make, variants: dict[str, int], causal: bool, **save_kw) -> dict[str, Path]:
    out = {}
    torch.manual_seed(1234)
    base = make()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    for i, (variant, seed) in enumerate(variants.items()):
        m = make()
        m.load_state_dict(base_state)
        if seed:
            _perturb(m, seed)
        out[variant] = _save(m, root / f"{name}-{variant}", f"{name}-{variant}",
                             gen_tokens=(10 + i) if causal else None, **save_kw)
    return out


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama(models_root):
    """Llama-like, untied head, float32, saved in 5 shards with an index; plus two bfloat16 variants."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make():
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                            max_position_embeddings=128, tie_word_embeddings=False))

    fam = _family(models_root, "llama", make, {"base": 0, "v1": 1, "v2": 2}, causal=True, max_shard_size=LLAMA_SHARD)
    bf = _family(models_root, "llama", make, {"bf16a": 11, "bf16b": 12}, causal=True, max_shard_size=LLAMA_SHARD,
                 dtype=torch.bfloat16)
    fam.update(bf)
    for p in fam.values():
        assert len(weight_files(p)) >= 3 and (p / "model.safetensors.index.json").exists()
    assert json.loads((fam["bf16a"] / "config.json").read_text())["dtype"] == "bfloat16"
    return SimpleNamespace(**fam, auto="AutoModelForCausalLM")


def _qwen2_config(tie: bool):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie)


@pytest.fixture(scope="session")
def qwen2(models_root):
    """Qwen2-like with tied embeddings (no lm_head.weight in the file), one file each; plus an untied
    variant that stores its own (different) lm_head."""
    from transformers import Qwen2ForCausalLM

    fam = _family(models_root, "qwen2", lambda: Qwen2ForCausalLM(_qwen2_config(True)),
                  {"base": 0, "v1": 1, "v2": 2, "v3": 3}, causal=True)
    base = Qwen2ForCausalLM.from_pretrained(fam["base"])
    untied = Qwen2ForCausalLM(_qwen2_config(False))
    untied.load_state_dict(base.state_dict())
    _perturb(untied, 21)  # lm_head is now its own parameter: it moves away from the embedding
    fam["untied"] = _save(untied, models_root / "qwen2-untied", "qwen2-untied", gen_tokens=20)
    from safetensors import safe_open

    with safe_open(str(fam["base"] / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    with safe_open(str(fam["untied"] / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    return SimpleNamespace(**fam, auto="AutoModelForCausalLM")


@pytest.fixture(scope="session")
def gpt2(models_root):
    """GPT-2: Conv1D weights, head tied to wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def make():
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=64,
                                          bos_token_id=0, eos_token_id=1))

    fam = _family(models_root, "gpt2", make, {"base": 0, "v1": 1, "v2": 2}, causal=True)
    return SimpleNamespace(**fam, auto="AutoModelForCausalLM")


@pytest.fixture(scope="session")
def bert(models_root):
    """BERT with an MLM head tied to the word embeddings (no cls.predictions.decoder.weight stored)."""
    from transformers import BertConfig, BertForMaskedLM

    def make():
        return BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=256, max_position_embeddings=64))

    fam = _family(models_root, "bert", make, {"base": 0, "v1": 1, "v2": 2}, causal=False)
    return SimpleNamespace(**fam, auto="AutoModelForMaskedLM")


@pytest.fixture(scope="session")
def minilm(models_root):
    """The real all-MiniLM-L6-v2 weights, and a perturbed copy.

    The copy is written with ``save_file`` from the original file's own tensors rather than with
    ``save_pretrained``: transformers 5 no longer saves the int64 ``embeddings.position_ids`` buffer
    that the original file stores, and the two inputs must hold the same tensors.
    """
    from safetensors import safe_open

    real = minilm_dir()
    variant = models_root / "minilm-variant"
    variant.mkdir()
    g = torch.Generator().manual_seed(7)
    tensors = {}
    with safe_open(str(real / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if t.is_floating_point():
                t = t + torch.randn(t.shape, generator=g) * 0.01
            tensors[k] = t
    write_st(variant / "model.safetensors", tensors)
    for p in real.iterdir():
        if p.is_file() and p.name != "model.safetensors" and p.name != "README.md":
            shutil.copyfile(p, variant / p.name)
    return SimpleNamespace(real=real, variant=variant, auto="AutoModel")


# -- shared by the task-vector tests ---------------------------------------------------------------

@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Tiny real models and fine-tunes for diff, transfer, merge and LiNeS (see tv_support)."""
    from tv_support import get_zoo

    return get_zoo(tmp_path_factory)


@pytest.fixture(scope="session")
def cli():
    """Run the CLI through typer's runner; assert success (or, with ok=False, failure)."""
    from typer.testing import CliRunner

    from surgery_cli.app import app

    runner = CliRunner()

    def invoke(*args, ok=True):
        result = runner.invoke(app, [str(a) for a in args])
        if ok:
            assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
        else:
            assert result.exit_code != 0, result.output
        return result

    return invoke


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache under tmp. huggingface_hub reads its environment once, at import
    (transformers has imported it already), so its constants are pointed at the cache as well."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def server():
    """The loopback Hub of tests/hub_server.py, one per test module (tests reset its state)."""
    from hub_server import HubServer

    with HubServer() as s:
        yield s

