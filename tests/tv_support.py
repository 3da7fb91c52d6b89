"""Model builders and independent references for the task-vector tests.

Nothing here imports ``surgery``: checkpoints are real ``transformers`` models built from tiny
configs and written with ``save_pretrained``; "fine-tunes" are a base perturbed with seeded noise.
Expected values are computed with plain torch on tensors read back with ``safetensors`` or
``from_pretrained``.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy
import functools
import hashlib
import json
import re
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# Tiny configs


def llama_config(layers: int = 2, vocab: int = 64, intermediate: int = 64, hidden: int = 32, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                       tie_word_embeddings=False, **kw)


def qwen2_config(tie: bool = True, vocab: int = 64):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=tie)


def gpt2_config(layers: int = 3, vocab: int = 64):
    from transformers import GPT2Config

    return GPT2Config(n_embd=32, n_layer=layers, n_head=2, vocab_size=vocab, n_positions=32, bos_token_id=0,
                      eos_token_id=1)


def bert_config(layers: int = 3, vocab: int = 64):
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                      vocab_size=vocab, max_position_embeddings=32)


AUTO = {"llama": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM",
        "bert": "AutoModelForMaskedLM"}


def init_model(config, seed: int):
    import transformers

    torch.manual_seed(seed)
    cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
           "bert": "BertForMaskedLM"}[config.model_type]
    return getattr(transformers, cls)(config).eval()


def perturbed(model, seed: int, scale: float = 0.02):
    """A copy of ``model`` with seeded Gaussian noise added to every parameter (tied ones once)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return m


def save_model(model, folder: Path, *, dtype=None, max_shard_size=None, tokenizer=None) -> Path:
    folder = Path(folder)
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def make_tokenizer(n_words: int, added: tuple[str, ...] = (), chat_template: str | None = None,
                   model_max_length: int = 64):
    """A real (WordLevel) fast tokenizer of ``n_words + 4`` base tokens plus ``added`` tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n_words)}
    for tok in ("[UNK]", "[PAD]", "<s>", "</s>"):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>", model_max_length=model_max_length)
    if added:
        fast.add_tokens(list(added))
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


# ---------------------------------------------------------------------------------------------
# Reading checkpoints without the library


from _support import read_folder as read_tensors, weight_files  # noqa: E402,F401  (one reader for all tests)


def header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def file_dtypes(folder: Path) -> dict[str, str]:
    out = {}
    for f in weight_files(folder):
        h, _ = header(f)
        out.update({k: v["dtype"] for k, v in h.items() if k != "__metadata__"})
    return out


def content_hash(folder: Path) -> str:
    """sha256 over the sorted lines ``name\\t<sha256 of the tensor's stored bytes>\\n``, the bytes
    taken straight from each file at the header's offsets (so independent of sharding)."""
    digests = {}
    for f in weight_files(folder):
        h, start = header(f)
        data = Path(f).read_bytes()
        for name, e in h.items():
            if name == "__metadata__":
                continue
            b, end = e["data_offsets"]
            assert name not in digests
            digests[name] = hashlib.sha256(data[start + b:start + end]).hexdigest()
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\t{digests[name]}\n".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _state_cached(folder: str, auto: str):
    import transformers

    model, info = getattr(transformers, auto).from_pretrained(folder, output_loading_info=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, \
        {k: sorted(v) for k, v in info.items() if isinstance(v, (set, list))}, model.config.to_dict()


def load_state(folder, auto: str = "AutoModelForCausalLM", cache: bool = True):
    """``from_pretrained``: (state dict, loading info, config). Cache inputs only (outputs change)."""
    if cache:
        return _state_cached(str(folder), auto)
    return _state_cached.__wrapped__(str(folder), auto)


def tied_state(folder: Path) -> dict[str, torch.Tensor]:
    """Stored tensors plus an absent ``lm_head.weight`` filled from the embedding when the config ties it."""
    t = read_tensors(folder)
    cfg = json.loads((Path(folder) / "config.json").read_text())
    if "lm_head.weight" not in t and cfg.get("tie_word_embeddings", True):
        emb = [k for k in t if k.endswith(("embed_tokens.weight", "wte.weight"))]
        assert len(emb) == 1
        t["lm_head.weight"] = t[emb[0]]
    return t


# ---------------------------------------------------------------------------------------------
# Comparisons

_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between ``a`` and ``b``, in units in the last place of their dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.numel() == 0:
        return 0
    iv = _INT_VIEW[a.dtype]
    bits = torch.iinfo(iv).bits

    def ordered(x):
        i = x.contiguous().view(iv).to(torch.int64)
        mag = i & ((1 << (bits - 1)) - 1)
        return torch.where(i < 0, -mag, mag)

    return int((ordered(a) - ordered(b)).abs().max())


def assert_ulp(actual: torch.Tensor, expected: torch.Tensor, max_ulp: int = 1, what: str = "") -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: differs"
        return
    d = ulp_distance(actual, expected)
    assert d <= max_ulp, f"{what}: {d} ulp from the float64 reference (at most {max_ulp} allowed)"


def assert_no_output(out: Path) -> None:
    out = Path(out)
    assert not out.exists(), f"{out} exists after a refusal"
    if out.parent.exists():
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not left, f"leftovers next to {out}: {left}"


# ---------------------------------------------------------------------------------------------
# Hand-made checkpoints


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "handmade",
                                                               "tie_word_embeddings": False}))
    return folder


# ---------------------------------------------------------------------------------------------
# References (float64 brute force)


def task_vector(ft: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``ft - base`` as a float32 task vector (the correctly rounded float32 difference)."""
    return (ft.double() - base.double()).float()


def topk_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep entries whose magnitude is at least the k-th largest, k = max(1, int(density * numel))."""
    n = tau.numel()
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    k = max(1, int(density * n))
    thr = torch.sort(tau.abs().reshape(-1), descending=True).values[k - 1]
    return tau.abs() >= thr


def ties_merge(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sign election from the weighted sum (zero goes to +), then the weighted disjoint mean, float64."""
    terms = [t.double() * w for t, w in zip(taus, weights)]
    total = sum(terms)
    sign = torch.where(total >= 0, 1.0, -1.0).double()
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for term, w in zip(terms, weights):
        agree = torch.sign(term) == sign
        num += torch.where(agree, term, torch.zeros_like(term))
        den += torch.where(agree, torch.full_like(term, w), torch.zeros_like(term))
    den[den == 0] = 1
    return num / den


LAYER_RE = {"llama": re.compile(r"^model\.layers\.(\d+)\."), "gpt2": re.compile(r"^transformer\.h\.(\d+)\."),
            "bert": re.compile(r"^bert\.encoder\.layer\.(\d+)\.")}


def expected_lambda(arch: str, name: str, depth: int, alpha: float, beta: float) -> float:
    m = LAYER_RE[arch].match(name)
    if m is None:
        return alpha
    return alpha + beta * int(m.group(1)) / (depth - 1)


# ---------------------------------------------------------------------------------------------
# The model zoo: every checkpoint the task-vector tests use, built on first use, once per session

FT_TEMPLATE = "{% for m in messages %}FT:{{ m['content'] }}{% endfor %}"
TARGET_TEMPLATE = "{% for m in messages %}TARGET:{{ m['content'] }}{% endfor %}"
FT_MAX_LENGTH = 40
NEW_TOKENS = tuple(f"<new{i}>" for i in range(8))  # the fine-tune's grown vocabulary: 64 -> 72


class Zoo:
    """``zoo["llama/ft1"]`` is the folder of that checkpoint, built (with what it derives from) on demand."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._models: dict[str, object] = {}
        self._paths: dict[str, Path] = {}

    # in-memory models ------------------------------------------------------------------------
    def model(self, key: str):
        if key not in self._models:
            self._models[key] = self._build(key)
        return self._models[key]

    def _build(self, key: str):
        fam, _, variant = key.partition("/")
        if fam == "llama12":
            cfg = functools.partial(llama_config, layers=12, hidden=16, intermediate=32)
        elif fam == "llama":
            cfg = llama_config
        elif fam.endswith("-bf16"):  # the same models as the float32 family, stored in bfloat16
            return self.model(f"{fam[:-5]}/{variant}")
        else:
            cfg = {"gpt2": gpt2_config, "bert": bert_config, "qwen2": qwen2_config}[fam]
        if variant == "base":
            return init_model(cfg(), 1)
        if variant == "target":
            return init_model(cfg(), 2)
        if variant.startswith("ft") and variant[2:].isdigit():
            return perturbed(self.model(f"{fam}/base"), 10 + int(variant[2:]))
        if variant == "ft-vocab":  # grown vocabulary: new embedding and head rows, then fine-tuned
            m = copy.deepcopy(self.model(f"{fam}/base"))
            torch.manual_seed(5)
            m.resize_token_embeddings(72, mean_resizing=False)
            with torch.no_grad():
                m.get_input_embeddings().weight[64:] = torch.randn(8, m.config.hidden_size) * 0.05
                if not m.config.tie_word_embeddings:
                    m.get_output_embeddings().weight[64:] = torch.randn(8, m.config.hidden_size) * 0.05
            return perturbed(m, 14)
        if variant == "target-untied":  # qwen2: a new base that stores its own head
            return init_model(cfg(tie=False), 2)
        if variant == "target-narrow":
            return init_model(cfg(intermediate=48), 2)
        if variant == "target-bias":
            return init_model(cfg(attention_bias=True), 2)
        if variant == "base-bias":
            return init_model(cfg(attention_bias=True), 3)
        if variant == "ft-bias":
            return perturbed(self.model(f"{fam}/base-bias"), 15)
        if variant == "ft-untied":  # qwen2: the fine-tune unties its head and moves it
            from transformers import Qwen2ForCausalLM

            m = Qwen2ForCausalLM(qwen2_config(tie=False)).eval()
            sd = self.model(f"{fam}/base").state_dict()
            m.load_state_dict({k: v for k, v in sd.items()}, strict=False)
            with torch.no_grad():
                m.lm_head.weight.copy_(sd["model.embed_tokens.weight"])
            return perturbed(m, 16)
        raise KeyError(key)

    # folders ----------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Path:
        if key not in self._paths:
            fam, _, variant = key.partition("/")
            folder = self.root / key.replace("/", "-")
            if variant == "base-sharded":
                save_model(self.model(f"{fam}/base"), folder, dtype=self._dtype(fam), max_shard_size="30KB",
                           tokenizer=self.tokenizer(key))
            else:
                save_model(self.model(key), folder, dtype=self._dtype(fam), tokenizer=self.tokenizer(key))
            config = json.loads((folder / "config.json").read_text())
            config["tv_marker"] = key  # tells the configs of otherwise identical architectures apart
            (folder / "config.json").write_text(json.dumps(config, indent=2))
            self._paths[key] = folder
        return self._paths[key]

    @staticmethod
    def _dtype(fam: str):
        return torch.bfloat16 if fam.endswith("-bf16") else None

    @staticmethod
    def tokenizer(key: str):
        fam, _, variant = key.partition("/")
        if fam not in ("llama", "gpt2", "llama-bf16", "gpt2-bf16"):
            return None
        if variant == "ft-vocab":
            return make_tokenizer(60, NEW_TOKENS, chat_template=FT_TEMPLATE, model_max_length=FT_MAX_LENGTH)
        if variant == "target":
            return make_tokenizer(60, chat_template=TARGET_TEMPLATE, model_max_length=48)
        return make_tokenizer(60)


_ZOOS: dict[str, Zoo] = {}


def get_zoo(tmp_path_factory) -> Zoo:
    """One zoo per pytest session (shared by every test module that asks)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _ZOOS:
        _ZOOS[key] = Zoo(tmp_path_factory.mktemp("tv_models"))
    return _ZOOS[key]


_PRECISION = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24, torch.float64: 53}


def spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ulp of ``dtype`` at each value of ``x`` (float64), ignoring subnormals."""
    _, e = torch.frexp(x.double().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - _PRECISION[dtype])


def assert_float32_bound(actual: torch.Tensor, ref64: torch.Tensor, magnitude64: torch.Tensor, what: str = "",
                         max_ulp: int = 1, steps: int = 8) -> None:
    """``actual`` is the float64 reference cast to its dtype, up to ``max_ulp`` ulp, plus what float32
    arithmetic can lose on the way: ``steps`` roundings of float32 at the size of the terms (``magnitude64``,
    the sum of the terms' absolute values). Any wrong coefficient or term is far outside this bound."""
    assert actual.shape == ref64.shape, (what, actual.shape, ref64.shape)
    err = (actual.double() - ref64.double()).abs()
    allowed = max_ulp * spacing(ref64, actual.dtype) + steps * 2.0 ** -24 * magnitude64.double().abs()
    bad = err > allowed
    assert not bad.any(), (f"{what}: {int(bad.sum())} entries off the float64 reference by more than the bound; "
                           f"worst error {float((err - allowed).max()):.3g} beyond it")
