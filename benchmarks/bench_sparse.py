#!/usr/bin/env python
"""Benchmark: grafting and sparse fine-tune extraction with an exact global top-k, against a soup.

The checkpoints are bench_soup's (same builder, same cache under ``benchmarks/_work/models``); model 0
is the base, model 1 its fine-tune. In separate subprocesses, interleaved within each repetition, on
the same warm page cache (bench_soup's runner, warming and I/O floors):

* ``surgery soup m0 m1``: a plain soup of the same two models, the yardstick of the targets;
* ``surgery graft --base m0 --ft m1 --sparsity S``: blocks only (the default), global top-k of |m1 - m0|;
* the same with ``--mask-out`` (the mask file written in the same pass);
* ``surgery sft extract --base m0 --ft m1 --density S``: every float tensor, one SFT file;
* the I/O floors: reading m0 and m1 once, and three times (what three streamed passes read), and
  writing one model-sized file with an fsync.

mergekit has no grafting or sparse fine-tune extraction, so it has no row here.

Reads are counted in the same run, in-process (not timed): every mapped view of an input tensor
the graft and the extraction take, per tensor; the target is at most three per input tensor.

Correctness in the same run, against an independent numpy reference: the float64 |m1 - m0|
rounded to float32 over the selected tensors, its k-th largest value by ``np.partition``, ties at it
kept in tensor then flat order. The graft must take m1's entry exactly where selected and m0's
elsewhere; the SFT's indices must be the selected ones and its values float32(m1 - m0) there.

Results go to ``benchmarks/results/sparse-<scale>.json`` and a markdown table is printed.

    python benchmarks/bench_sparse.py --keep              # full size: 309.6M parameters
    python benchmarks/bench_sparse.py --scale small       # ~20M parameters, a quick end-to-end check
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_soup as bs  # noqa: E402  (one model builder, one runner, one floor)

FRACTION = 0.01
ROWS = {  # key: (what, floor)
    "io-floor-2in": ("read m0 m1, write 1 model, fsync", None),
    "io-floor-2in-3pass": ("read m0 m1 three times, write 1 model, fsync", None),
    "surgery-soup2": ("soup m0 m1 (the yardstick)", "io-floor-2in"),
    "surgery-graft": ("graft, global top-k of blocks", "io-floor-2in-3pass"),
    "surgery-graft-maskout": ("graft + --mask-out", "io-floor-2in-3pass"),
    "surgery-sft-extract": ("sft extract, global top-k of all float tensors", "io-floor-2in-3pass"),
}


def command(key: str, models: list[Path], out: Path, shard: str, fraction: float) -> list[str]:
    m0, m1 = map(str, models[:2])
    if key.startswith("io-floor"):
        passes = 3 if key.endswith("3pass") else 1
        return bs.floor_command(models[:2] * passes, out, model_bytes(models[0]), True)
    common = ["--device", "cpu", "-q", "--force"]
    if key == "surgery-soup2":
        return [bs.executable("surgery"), "soup", m0, m1, "-o", str(out), "--max-shard-size", shard, *common]
    if key.startswith("surgery-graft"):
        extra = ["--mask-out", str(out) + ".mask.safetensors"] if key.endswith("maskout") else []
        return [bs.executable("surgery"), "graft", "--base", m0, "--ft", m1, "--sparsity", str(fraction),
                "-o", str(out), "--max-shard-size", shard, *extra, *common]
    if key == "surgery-sft-extract":
        return [bs.executable("surgery"), "sft", "extract", "--base", m0, "--ft", m1, "--density", str(fraction),
                "-o", str(out) + ".sft", *common]
    raise ValueError(key)


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


# --------------------------------------------------------------------------------------------
# Reads per input tensor, counted in-process
# --------------------------------------------------------------------------------------------

def count_reads(models: list[Path], work: Path, fraction: float) -> dict:
    """Run graft and sft extract in this process, counting every view of an input tensor taken
    through the mapped reader (the only way the numpy path reads) and every torch read."""
    from surgery.io import mapped
    from surgery.io.checkpoint import Checkpoint
    from surgery.recipes import graft, sft

    counts: Counter = Counter()
    view, read = mapped.MappedFiles.view, Checkpoint.read

    def counting_view(self, info):
        counts[(info.file, info.name)] += 1
        return view(self, info)

    def counting_read(self, name, device="cpu"):
        counts[(self.resolve(name).file, self.resolve(name).name)] += 1
        return read(self, name, device)

    mapped.MappedFiles.view, Checkpoint.read = counting_view, counting_read
    out = {}
    try:
        for label, run in (("graft", lambda o: graft.graft(models[0], models[1], o, sparsity=fraction, force=True)),
                           ("sft-extract", lambda o: sft.extract(models[0], models[1], Path(str(o) + ".sft"),
                                                                 density=fraction, force=True))):
            counts.clear()
            target = work / f"reads-{label}"
            run(target)
            per = Counter(counts.values())
            out[label] = {"tensors_read": len(counts), "max_reads_per_tensor": max(counts.values()),
                          "histogram": {str(k): v for k, v in sorted(per.items())}}
            shutil.rmtree(target, ignore_errors=True)
            Path(str(target) + ".sft").unlink(missing_ok=True)
    finally:
        mapped.MappedFiles.view, Checkpoint.read = view, read
    return out


# --------------------------------------------------------------------------------------------
# Correctness: an independent numpy reference
# --------------------------------------------------------------------------------------------

def magnitudes(a, b):
    """float32(|float64(a) - float64(b)|) of two bf16 torch tensors, as a flat numpy array."""
    import numpy as np
    import torch

    d = a.reshape(-1).to(torch.float64) - b.reshape(-1).to(torch.float64)
    return np.abs(d.numpy()).astype(np.float32)


def reference_selection(m0, m1, names: list[str], keep: int) -> dict:
    """Per tensor, the flat indices of the ``keep`` largest magnitudes over ``names`` together,
    ties at the k-th value taken first in ``names`` order, then flat order."""
    import numpy as np

    mags = {n: magnitudes(m1.get(n), m0.get(n)) for n in names}
    every = np.concatenate([mags[n] for n in names])
    threshold = np.partition(every, every.size - keep)[every.size - keep]
    del every
    need = keep - sum(int((mags[n] > threshold).sum()) for n in names)
    chosen = {}
    for n in names:
        above = mags[n] > threshold
        ties = np.flatnonzero(mags[n] == threshold)[:max(need, 0)]
        need -= len(ties)
        above[ties] = True
        chosen[n] = np.flatnonzero(above)
    return {"threshold": float(threshold), "indices": chosen}


def stored_order(folder: Path) -> list[str]:
    """Tensor names in the order they are stored: shard by shard (as the index first names the
    shards), by position inside each file. Ties at the threshold are kept in this order."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    names = []
    for shard in dict.fromkeys(index.values()):
        with open(folder / shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        names += sorted(header, key=lambda n: header[n]["data_offsets"][0])
    return names


def check_correctness(models: list[Path], graft_out: Path | None, sft_out: Path | None, fraction: float) -> dict:
    import numpy as np
    import torch
    from safetensors import safe_open

    from surgery.layers import block_index

    t0 = time.perf_counter()
    m0, m1 = bs.Folder(models[0]), bs.Folder(models[1])
    names = [n for n in stored_order(models[1]) if m0.get(n).is_floating_point()]
    res: dict = {}
    if graft_out is not None and graft_out.is_dir():
        blocks = [n for n in names if block_index(n) is not None]
        total = sum(m0.get(n).numel() for n in blocks)
        keep = int(round(fraction * total))
        ref = reference_selection(m0, m1, blocks, keep)
        out = bs.Folder(graft_out)
        wrong, kept = [], 0
        for n in names:
            got, a, b = out.get(n).reshape(-1), m0.get(n).reshape(-1), m1.get(n).reshape(-1)
            want = a.clone()
            if n in ref["indices"]:
                idx = torch.from_numpy(ref["indices"][n])
                want[idx] = b[idx]
                kept += len(idx)
            if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
                wrong.append(n)
        res["graft"] = {"keep": keep, "kept_by_reference": kept, "threshold": ref["threshold"],
                        "tensors_not_bit_identical": wrong, "ok": not wrong and kept == keep}
    if sft_out is not None and sft_out.exists():
        total = sum(m0.get(n).numel() for n in names)
        keep = int(round(fraction * total))
        ref = reference_selection(m0, m1, names, keep)
        wrong = []
        with safe_open(str(sft_out), "np") as f:
            stored = set(f.keys())
            for n in names:
                idx = ref["indices"][n]
                if not len(idx):
                    if n + ".indices" in stored:
                        wrong.append(n)
                    continue
                if n + ".indices" not in stored:
                    wrong.append(n)
                    continue
                got_idx = f.get_tensor(n + ".indices").astype(np.int64)
                d = (m1.get(n).reshape(-1).to(torch.float64) - m0.get(n).reshape(-1).to(torch.float64)).numpy()
                if not np.array_equal(got_idx, idx) or \
                        not np.array_equal(f.get_tensor(n + ".values"), d[idx].astype(np.float32)):
                    wrong.append(n)
        res["sft"] = {"keep": keep, "threshold": ref["threshold"], "tensors_wrong": wrong, "ok": not wrong}
    res["check_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def run(args, work: Path) -> dict:
    cfg, root, key, size = bs.prepare_models(args, bs.SCALES[args.scale], 1, work / "models")
    shard = args.shard_size or cfg["shard"]
    models = bs.model_dirs(root)
    files = bs.input_files(models[:2])
    size["input_bytes_each"] = model_bytes(models[0])
    outs = work / "out-sparse" / key
    outs.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    keys = [k for k in ROWS if not args.only or k in args.only.split(",")]
    samples: dict[str, list[dict]] = {k: [] for k in keys}
    for rep in range(args.repeat):
        for k in keys:
            out = outs / (k + (".bin" if k.startswith("io-floor") else ""))
            cmd = command(k, models, out, shard, args.fraction)
            if not k.startswith("io-floor"):
                size.setdefault("commands", {})[k] = cmd
            produced = [out, Path(str(out) + ".sft"), Path(str(out) + ".mask.safetensors")]
            r = bs.timed(cmd, produced, files, logs / f"sparse-{key}-{k}-{rep}.log", args.threads)
            samples[k].append(r)
            bs.log(f"rep {rep + 1}/{args.repeat} {k:22s} {r['wall_s']:7.2f}s  {r['peak_rss_mb']:8.1f} MB")
        for p in outs.glob("*.bin"):
            p.unlink()
    size["runs"] = samples
    size["summary"] = {k: bs.summarize(v) for k, v in samples.items()}
    sft_file = outs / "surgery-sft-extract.sft"
    if sft_file.exists():
        size["sft_file_bytes"] = sft_file.stat().st_size
    if not args.no_reads:
        bs.log("counting reads")
        size["reads"] = count_reads(models, outs, args.fraction)
    if not args.no_check:
        bs.log("checking correctness")
        size["correctness"] = check_correctness(models, outs / "surgery-graft" if "surgery-graft" in keys else None,
                                                sft_file if "surgery-sft-extract" in keys else None, args.fraction)
        bs.log(f"correctness checked in {size['correctness']['check_s']:.1f}s")
    if not args.keep:
        shutil.rmtree(outs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return size


def targets(size: dict) -> dict:
    sm, out = size["summary"], {}
    soup = sm.get("surgery-soup2", {}).get("wall_s")
    for k in ("surgery-graft", "surgery-graft-maskout", "surgery-sft-extract"):
        if k not in sm:
            continue
        if soup:
            v = sm[k]["wall_s"] / soup
            out[f"{k} / surgery-soup2 (wall, target <= 3)"] = f"{v:.2f}x {'PASS' if v <= 3 else 'FAIL'}"
        rss = sm[k]["peak_rss_mb"]
        out[f"{k} peak RSS (target < 1000 MB)"] = f"{rss:.0f} MB {'PASS' if rss < 1000 else 'FAIL'}"
    for label, r in size.get("reads", {}).items():
        m = r["max_reads_per_tensor"]
        out[f"{label}: reads of each input tensor (target <= 3)"] = f"max {m} {'PASS' if m <= 3 else 'FAIL'}"
    for label, c in size.get("correctness", {}).items():
        if isinstance(c, dict):
            out[f"{label} equals the numpy reference (bit for bit)"] = "PASS" if c["ok"] else "FAIL"
    return out


def table(result: dict) -> str:
    size = result["size"]
    sm = size["summary"]
    soup = sm.get("surgery-soup2", {}).get("wall_s")
    lines = ["| tool | computes | wall s | peak RSS MB | CPU s | wall / soup of two | wall / floor |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for k, s in sm.items():
        what, floor = ROWS[k]
        spread = f" ({s['wall_min_s']:.2f}-{s['wall_max_s']:.2f})" if s["n"] > 1 else ""
        fl = sm.get(floor, {}).get("wall_s") if floor else None
        lines.append(f"| {k} | {what} | {s['wall_s']:.2f}{spread} | {s['peak_rss_mb']:.0f} | {s['cpu_s']:.2f} | "
                     f"{bs.ratio(s['wall_s'], soup) if k.startswith('surgery') else '-'} | {bs.ratio(s['wall_s'], fl)} |")
    lines += ["", "| target | result |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in result["targets"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(bs.SCALES), default="full",
                    help="full: 309.6M parameters (default); small: ~20M, a quick end-to-end check")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per tool; the median is reported")
    ap.add_argument("--shard-size", default=None, help="input and output shard size (default: 200MB full, 10MB small)")
    ap.add_argument("--fraction", type=float, default=FRACTION,
                    help=f"graft sparsity and SFT density: the fraction of entries kept (default {FRACTION})")
    ap.add_argument("--only", default=None, help="comma-separated rows to time (default all): " + ", ".join(ROWS))
    ap.add_argument("--keep", action="store_true",
                    help="reuse checkpoints cached under the work folder (shared with bench_soup.py), and leave them")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--no-reads", action="store_true", help="skip counting reads")
    bs.add_shared_args(ap)
    bs.add_output_args(ap, "sparse")
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 3 if args.scale == "full" else 1
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "sparse", "scale": args.scale, "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "argv": sys.argv[1:], "roles": {"base": "m0", "fine-tune": "m1"}, "fraction": args.fraction,
              "repeat": args.repeat, "env": bs.versions()}
    result["size"] = run(args, work)
    result["targets"] = targets(result["size"])
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.name or 'sparse-' + args.scale}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
