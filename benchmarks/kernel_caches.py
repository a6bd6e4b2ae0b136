"""Peak memory and speed of BERT pretraining (configs/wikitext2-bert-mlm.yaml, one thread, 150 steps) with
oneDNN's cache of compiled kernels bounded to 64 (what importing tunelab sets) and at its default of 1,024.
Every step has its own number of masked positions, so a matmul of a new shape at almost every step.
Each run is `tunelab train` in a process of its own; the peak is that process's maximum resident set size.

    python benchmarks/kernel_caches.py              # needs the tokenizer of the config's header
    python benchmarks/kernel_caches.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/wikitext2-bert-mlm.yaml"
SIDES = {"oneDNN cache of 64 kernels (tunelab's default)": {},
         "oneDNN's default cache of 1,024": {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}}


def run(steps: int, env: dict[str, str], out: Path) -> tuple[float, float]:
    """(peak RSS in MB, training tokens per second over the steps after the first 50)."""
    command = [sys.executable, "-m", "tunelab", "train", CONFIG, f"output_dir={out}", "train.num_threads=1",
               f"train.max_steps={steps}", "train.eval_at_start=false", "train.eval_steps=0", "train.save_steps=0",
               "train.logging_steps=50", "data.max_validation_examples=16"]
    base = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    proc = subprocess.Popen(command, env={**base, **env}, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own usage: its peak RSS in KB
    if status:
        raise SystemExit(f"tunelab train failed (wait status {status})")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train" and r["step"] > 50]
    tokens = sum(r["tokens_per_second"] for r in train) / max(1, len(train))
    return usage.ru_maxrss / 1024, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, env) in enumerate(SIDES.items()):
            peak, speed = run(args.steps, env, Path(tmp) / str(i))
            print(f"{name}: peak RSS {peak:,.0f} MB, {speed:,.0f} training tokens/s after step 50", flush=True)


if __name__ == "__main__":
    main()
