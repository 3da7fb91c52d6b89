#!/usr/bin/env python
"""Sparse surgery on the real MiniLM: how few weights carry a fine-tune, and how to train only them.

Claims checked (the papers' words, our small CPU setting):

* Grafting ("Task-Specific Skill Localization in Fine-tuned Language Models"): a tiny fraction of the
  fine-tune's changes, grafted onto the pretrained weights, recovers most of its accuracy, and the
  grafted model is better calibrated. We report test accuracy and expected calibration error (ECE,
  15 bins) for weight-only grafting (top-k of |ft - pre|) against sparsity, and for the learned mask
  at the same sparsity, next to the full fine-tune and the pretrained model with the fine-tuned head.
* LT-SFT ("Composable Sparse Fine-Tuning for Cross-Lingual Transfer"): training only the K entries
  that moved most in a full fine-tune beats training K random entries; and a "domain" SFT, trained
  with masked language modelling on unlabeled text of the shifted test domain (new words, new
  templates), composed by addition with the task SFT (trained on the source domain), does better on
  that domain than the task SFT alone. As a control, the same composition with a domain SFT trained
  on unlabeled source-domain text: whatever it adds is not about the shift.

The task is soup_minilm's (6 labels: topic x sentiment, 10% label noise in training, held-out words
and templates in validation and test). The pretrained side of every graft is MiniLM itself (saved
under the classifier's parameter names, without the head), so the head always comes from the
fine-tune, as in grafting a classifier onto its pretrained encoder.

    python examples/sparse_minilm.py           # full mode (numbers in the README), ~10 min on 2 cores
    python examples/sparse_minilm.py --fast    # what the tests run
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from surgery.lt_sft import train_lt_sft  # noqa: E402
from minilm_common import example_parser  # noqa: E402
from soup_minilm import accuracy, fine_tune, load_classifier, make_split, make_splits, start_run  # noqa: E402,F401 (make_splits: the tests regenerate the task)

SEED = 1234


@dataclass
class Mode:
    steps: int  # full fine-tune (and each LT-SFT phase)
    lr: float
    batch: int
    sparsities: tuple[float, ...]  # weight-only grafting
    learned: tuple[float, ...]  # learned grafting at these sparsities
    learn_epochs: int
    sft_density: float  # LT-SFT K as a fraction of the encoder's trainable entries


FULL = Mode(steps=110, lr=2e-4, batch=16, sparsities=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1), learned=(1e-4, 1e-3),
            learn_epochs=3, sft_density=0.01)
FAST = Mode(steps=30, lr=2e-4, batch=16, sparsities=(1e-3, 1e-2), learned=(1e-3,), learn_epochs=1, sft_density=0.01)


def probabilities(model, tokenizer, data, batch: int = 100):
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(data), batch):
            enc = tokenizer([t for t, _ in data[i:i + batch]], return_tensors="pt", padding=True)
            out.append(torch.softmax(model(**enc).logits.float(), -1))
    return torch.cat(out)


def ece(probs, labels, bins: int = 15) -> float:
    """Expected calibration error: sum over confidence bins of |accuracy - confidence| weighted by size."""
    import torch

    conf, pred = probs.max(-1)
    right = (pred == torch.tensor(labels)).float()
    total = 0.0
    for b in range(bins):
        inside = (conf > b / bins) & (conf <= (b + 1) / bins)
        if inside.any():
            total += float(inside.float().mean()) * abs(float(right[inside].mean()) - float(conf[inside].mean()))
    return total


def pretrained_without_head(start: Path, out: Path) -> Path:
    """MiniLM under the classifier's parameter names, without the head."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(start / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("classifier.")}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (start / name).exists():
            (out / name).write_text((start / name).read_text())
    return out


def _lt_sft_batches(data, tokenizer, batch: int, steps: int, seed: int):
    import random

    import torch

    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    batches = []
    for s in range(steps):
        idx = [order[(s * batch + j) % len(order)] for j in range(batch)]
        enc = tokenizer([data[i][0] for i in idx], return_tensors="pt", padding=True)
        batches.append({**enc, "labels": torch.tensor([data[i][1] for i in idx])})
    return lambda: batches


def _mlm_batches(texts: list[str], tokenizer, batch: int, steps: int, seed: int):
    """Masked-LM batches (15% of tokens, BERT's 80/10/10 rule), drawn once with a fixed seed."""
    import torch
    from transformers import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    torch.manual_seed(seed)
    batches = []
    for s in range(steps):
        chunk = [texts[(s * batch + j) % len(texts)] for j in range(batch)]
        batches.append(dict(collate([tokenizer(t) for t in chunk])))
    return lambda: batches


def compose_domain_and_task(work: Path, mode: Mode, data, tokenizer, start: Path, pre: Path, task, k: int,
                            pretrained: list[str], frozen: str, log) -> dict:
    """LT-SFT a masked-LM "domain" SFT on unlabeled text (shifted test domain, and source domain as a
    control), compose each with the task SFT ``task`` by ``surgery sft apply`` onto the pretrained
    encoder, and measure accuracy on the shifted test split. The masked-LM head is trained densely
    and left out of the domain SFT, as the paper's language SFTs leave theirs."""
    import dataclasses

    import torch
    from transformers import BertForMaskedLM

    from surgery.lt_sft import export_sft
    from surgery.recipes.sft import apply

    task_sft = export_sft(task, work / "task.sft", base=pre, force=True)
    out = {"k": k}
    texts = {"target": [t for t, _ in make_split("domain-unlabeled", len(data["train"]))],  # held-out words, templates
             "source": [t for t, _ in make_split("train", len(data["train"]), seed=SEED + 1)]}
    arms = {"task SFT alone": [task_sft]}
    for domain, unlabeled in texts.items():
        torch.manual_seed(3)
        mlm = BertForMaskedLM.from_pretrained(start)  # the encoder of the start; a fresh MLM head
        in_base = [n for n, _ in mlm.named_parameters() if n in set(pretrained)]
        result = train_lt_sft(mlm, _mlm_batches(unlabeled, tokenizer, mode.batch, mode.steps, seed=3), k=k,
                              full_steps=mode.steps, sparse_steps=mode.steps, lr=mode.lr, base_names=in_base,
                              exclude=frozen)
        sft = export_sft(dataclasses.replace(result, absolute=[]), work / f"domain-{domain}.sft", base=pre,
                         recipe={"operation": "lt_sft", "objective": "masked-lm", "domain": domain}, force=True)
        arms[f"{domain}-domain SFT + task SFT"] = [sft, task_sft]
    for label, sfts in arms.items():
        folder = apply(pre, sfts, work / ("composed-" + label.split()[0]), force=True)
        out[label] = accuracy(load_classifier(folder), tokenizer, data["test"])
        log(f"composition, {label}: test {out[label]:.1%} (shifted domain)")
    return out


def run(fast: bool = False, workdir: str | os.PathLike | None = None, log=print) -> dict:
    t0 = time.perf_counter()
    import torch

    from surgery.recipes.graft import graft
    from surgery.recipes.mask_report import overlap

    work, data, tokenizer, start = start_run("sparse-", fast, workdir)
    mode = FAST if fast else FULL
    pre = pretrained_without_head(start, work / "pretrained")
    ft = fine_tune(start, work / "ft", data["train"], tokenizer, seed=1, lr=mode.lr, steps=mode.steps, batch=mode.batch)
    for name in ("train", "val"):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in data[name]))

    labels = [y for _, y in data["test"]]

    def evaluate(folder) -> dict:
        model = load_classifier(folder)
        probs = probabilities(model, tokenizer, data["test"])
        return {"test": accuracy(model, tokenizer, data["test"]), "ece": ece(probs, labels)}

    results = {"fast": fast, "workdir": str(work), "ft": evaluate(ft)}
    log(f"full fine-tune ({mode.steps} steps): test {results['ft']['test']:.1%}, ECE {results['ft']['ece']:.3f}")
    head_only = graft(pre, ft, work / "graft-0", sparsity=0.0, force=True)  # the pretrained body, the fine-tuned head
    results["head_only"] = evaluate(head_only)
    log(f"pretrained body + fine-tuned head: test {results['head_only']['test']:.1%}, "
        f"ECE {results['head_only']['ece']:.3f}")
    gain = results["ft"]["test"] - results["head_only"]["test"]
    results["weight_only"], results["learned"] = [], []
    for s in mode.sparsities:
        folder = graft(pre, ft, work / f"graft-{s:g}", sparsity=s, mask_out=work / f"mask-{s:g}.safetensors", force=True)
        row = {"sparsity": s, **evaluate(folder)}
        row["recovered"] = (row["test"] - results["head_only"]["test"]) / gain if gain else float("nan")
        results["weight_only"].append(row)
        log(f"weight-only graft, sparsity {s:g}: test {row['test']:.1%} ({row['recovered']:.0%} of the gain), "
            f"ECE {row['ece']:.3f}")
    for s in mode.learned:
        folder = graft(pre, ft, work / f"learned-{s:g}", sparsity=s, learn=True, data=work / "train.jsonl",
                       eval_data=work / "val.jsonl", epochs=mode.learn_epochs, batch_size=32,
                       mask_out=work / f"learned-mask-{s:g}.safetensors", device="cpu", force=True)
        row = {"sparsity": s, **evaluate(folder)}
        row["recovered"] = (row["test"] - results["head_only"]["test"]) / gain if gain else float("nan")
        pair = overlap([work / f"mask-{s:g}.safetensors", work / f"learned-mask-{s:g}.safetensors"])["pairs"][0]
        row["iou_with_weight_only"] = pair["iou"]
        row["kept"] = pair["kept_b"]
        results["learned"].append(row)
        log(f"learned graft, sparsity {s:g}: test {row['test']:.1%} ({row['recovered']:.0%} of the gain), "
            f"ECE {row['ece']:.3f}, {row['kept']} entries, IoU with the weight-only mask {pair['iou']:.2f}")

    # LT-SFT against a random mask of the same size, from the same start
    start_model = load_classifier(start)
    pretrained = [n for n, _ in start_model.named_parameters() if not n.startswith("classifier.")]
    frozen = r"(?i)layernorm|word_embeddings"
    candidates = [n for n, p in start_model.named_parameters() if n in pretrained and not __import__("re").search(frozen, n)]
    total = sum(dict(start_model.named_parameters())[n].numel() for n in candidates)
    k = int(mode.sft_density * total)
    batches = _lt_sft_batches(data["train"], tokenizer, mode.batch, mode.steps, seed=1)
    torch.manual_seed(1)
    lt = train_lt_sft(start_model, batches, k=k, full_steps=mode.steps, sparse_steps=mode.steps, lr=mode.lr,
                      base_names=pretrained, exclude=frozen)
    lt_acc = accuracy(lt.model, tokenizer, data["test"])
    g = torch.Generator().manual_seed(2)
    random_model = load_classifier(start)
    params = dict(random_model.named_parameters())
    order = torch.randperm(total, generator=g)[:k]
    flat = torch.zeros(total, dtype=torch.bool)
    flat[order] = True
    random_masks, at = {}, 0
    for n in candidates:
        size = params[n].numel()
        random_masks[n] = flat[at:at + size].reshape(params[n].shape)
        at += size
    torch.manual_seed(1)
    rnd = train_lt_sft(random_model, batches, k=k, full_steps=0, sparse_steps=mode.steps, lr=mode.lr,
                       base_names=pretrained, exclude=frozen, masks=random_masks)
    rnd_acc = accuracy(rnd.model, tokenizer, data["test"])
    results["lt_sft"] = {"k": k, "density": mode.sft_density, "lt_sft": lt_acc, "random": rnd_acc}
    log(f"LT-SFT, K = {k} ({mode.sft_density:.0%} of the encoder's trainable entries): test {lt_acc:.1%}; "
        f"random mask of the same K: {rnd_acc:.1%}")
    results["composition"] = compose_domain_and_task(work, mode, data, tokenizer, start, pre, lt, k,
                                                     pretrained, frozen, log)
    results["seconds"] = time.perf_counter() - t0
    log(f"done in {results['seconds']:.0f}s")
    return results


def main(argv=None) -> dict:
    ap = example_parser(__doc__, json_out=True)
    args = ap.parse_args(argv)
    results = run(fast=args.fast, workdir=args.workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
