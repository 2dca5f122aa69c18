"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def timed(fn):
    """(result, seconds, peak GiB allocated by this process) of fn(), with the device synchronised."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def header() -> dict:
    """The card, torch version and date every result file starts with."""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def report(res: dict, out: str) -> None:
    """Write the results as JSON and print them as a short table."""
    Path(out).write_text(json.dumps(res, indent=2))
    print(f"\n{'metric':<40}{'value':>14}")
    for k, v in res.items():
        print(f"{k:<40}{v:>14.4g}" if isinstance(v, float) else f"{k:<40}{v!s:>14}")


def parser(default_out: str) -> argparse.ArgumentParser:
    """The flags every bench takes: the checkpoint to load and the JSON file to write."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/bagel-full")
    ap.add_argument("--out", default=default_out)
    return ap
