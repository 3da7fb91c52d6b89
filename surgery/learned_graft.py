"""Learned grafting ("Task-Specific Skill Localization in Fine-tuned Language Models", Panigrahi et al. 2023).

The mask is relaxed to gamma = basepatch + (1 - 2 * basepatch) * sigmoid(S - b) over the grafted
entries, theta(gamma) = pre + gamma * (ft - pre), and S is trained by gradient through the model on
the task loss (b = 10 and S ~ U[0, 1) start gamma at the weight-only top-k mask, basepatch). Each
epoch evaluates the rounded mask round(gamma) and the best one (by training plus validation score)
is kept. The paper's update S -= lr * (1 - 2 * basepatch) * dL/dgamma * sigmoid'(S - b), with its
very large learning rate (1e7, since sigmoid' is ~4.5e-5 at -10 and fine-tuning deltas are small),
is plain gradient descent on S.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import PlanError


@dataclass
class LearnedMask:
    masks: dict  # checkpoint tensor name -> bool tensor
    history: list = field(default_factory=list)  # per epoch: train/val score of the rounded mask, density
    best_epoch: int = -1


def read_jsonl(path, task: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
                label = int(row["label"]) if task == "classification" else None
            except (ValueError, KeyError, TypeError) as e:
                need = "text and an integer label" if task == "classification" else "text"
                raise PlanError(f"{path}:{i}: each line must be a JSON object with {need} ({e})") from None
            rows.append({"text": text, "label": label})
    if not rows:
        raise PlanError(f"{path}: no examples")
    return rows


def _auto(task: str):
    import transformers

    if task == "classification":
        return transformers.AutoModelForSequenceClassification
    if task == "lm":
        return transformers.AutoModelForCausalLM
    raise PlanError(f"--task must be classification or lm, not {task!r}")


def learn_mask(base, ft, names: Sequence[str], basepatch: dict, *, data: list[dict], eval_data: list[dict] | None,
               task: str = "classification", epochs: int = 5, lr: float = 1e7, sigmoid_bias: float = 10.0,
               batch_size: int = 16, max_length: int = 128, seed: int = 0, device: str = "cpu") -> LearnedMask:
    """Train the relaxed mask over ``names`` (checkpoint tensor names), starting from ``basepatch``
    (name -> bool tensor), and return the best rounded mask."""
    import torch
    from torch.func import functional_call
    from transformers import AutoTokenizer

    from .io.checkpoint import open_checkpoint

    torch.manual_seed(seed)
    auto = _auto(task)
    model = auto.from_pretrained(str(Path(ft))).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(Path(ft)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base_ckpt, ft_ckpt = open_checkpoint(base), open_checkpoint(ft)
    params = dict(model.named_parameters())
    to_param = _parameter_names(names, params)
    pre, delta, S, bp = {}, {}, {}, {}
    for name in names:
        p = to_param[name]
        pre[p] = base_ckpt.read(name, device).to(torch.float32)
        delta[p] = ft_ckpt.read(name, device).to(torch.float32) - pre[p]
        bp[p] = basepatch[name].to(device).reshape(pre[p].shape).to(torch.float32)
        S[p] = torch.rand(pre[p].shape, device=device, requires_grad=True)
    for p in params.values():
        p.requires_grad_(False)
    opt = torch.optim.SGD(list(S.values()), lr=lr)

    def gamma(p):
        return bp[p] + (1 - 2 * bp[p]) * torch.sigmoid(S[p] - sigmoid_bias)

    def batches(rows, shuffle):
        order = torch.randperm(len(rows)).tolist() if shuffle else range(len(rows))
        order = list(order)
        for i in range(0, len(order), batch_size):
            chunk = [rows[j] for j in order[i:i + batch_size]]
            enc = tok([r["text"] for r in chunk], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
            if task == "classification":
                enc["labels"] = torch.tensor([r["label"] for r in chunk], device=device)
            else:
                enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            yield enc

    def score(rows, rounded) -> float:
        """Accuracy (classification) or minus the mean token loss (lm) with the rounded mask."""
        weights = {p: pre[p] + rounded[p] * delta[p] for p in pre}
        right, total, loss_sum = 0, 0, 0.0
        with torch.no_grad():
            for enc in batches(rows, False):
                out = functional_call(model, weights, args=(), kwargs=dict(enc))
                if task == "classification":
                    right += int((out.logits.argmax(-1) == enc["labels"]).sum())
                    total += len(enc["labels"])
                else:
                    n = int((enc["labels"] != -100).sum())
                    loss_sum += float(out.loss) * n
                    total += n
        return right / total if task == "classification" else -loss_sum / max(total, 1)

    result = LearnedMask({})
    best = -math.inf
    for epoch in range(epochs + 1):
        if epoch:  # epoch 0 scores basepatch itself
            for enc in batches(data, True):
                weights = {p: pre[p] + gamma(p) * delta[p] for p in pre}
                loss = functional_call(model, weights, args=(), kwargs=dict(enc)).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            rounded = {p: torch.round(gamma(p)) for p in pre}
        train = score(data, rounded)
        val = score(eval_data, rounded) if eval_data else None
        kept = int(sum(r.sum() for r in rounded.values()))
        result.history.append({"epoch": epoch, "train": train, "val": val, "kept": kept})
        total_score = train + (val if val is not None else 0.0)
        if total_score > best:
            best = total_score
            result.best_epoch = epoch
            result.masks = {name: rounded[to_param[name]].bool().cpu() for name in names}
    return result


def _parameter_names(names: Sequence[str], params: dict) -> dict[str, str]:
    """Checkpoint tensor name -> model parameter name (they differ by the base-model prefix when a
    headless checkpoint is loaded into a model with a head)."""
    out = {}
    for name in names:
        if name in params:
            out[name] = name
            continue
        matches = [p for p in params if p.endswith("." + name)]
        if len(matches) != 1:
            raise PlanError(f"tensor {name} is not a parameter of the fine-tuned model")
        out[name] = matches[0]
    return out
