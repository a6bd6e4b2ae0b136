"""tunelab's own figures where there is no HF side to run: extractive QA on XQuAD (held-out articles),
SmolLM2-135M-Instruct LoRA SFT on the alpaca sample (validation loss and perplexity before / after),
English-German translation on Multi30k with the Transformer from scratch (sacreBLEU BLEU / chrF on val, and
the time of beam search over the 1,014 sentences), and DialogSum summarization by SmolLM2 with LoRA
(ROUGE-1/2/L before / after).

    python benchmarks/task_figures.py xquad
    python benchmarks/task_figures.py alpaca
    python benchmarks/task_figures.py multi30k      # trains the BPE tokenizer first if it is missing
    python benchmarks/task_figures.py dialogsum
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JOBS = {"xquad": "configs/xquad-minilm.yaml", "alpaca": "configs/alpaca-smollm2-lora.yaml",
        "multi30k": "configs/multi30k-transformer.yaml", "dialogsum": "configs/dialogsum-smollm2-lora.yaml"}
MULTI30K_TOKENIZER = "runs/tokenizers/multi30k-bpe8k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(f"/tmp/tunelab-bench/{args.job}-{stamp}")
    if args.job == "multi30k" and not (ROOT / MULTI30K_TOKENIZER / "tokenizer.json").exists():
        data = "../shared/data/multi30k_en_de"
        subprocess.run([sys.executable, "examples/seq2seq_tokenizer.py", "--out", MULTI30K_TOKENIZER, "--vocab-size",
                        "8000", f"{data}/train.en", f"{data}/train.de"], cwd=ROOT, check=True)
    cmd = [sys.executable, "-m", "tunelab", "train", JOBS[args.job], f"output_dir={out}", *args.overrides, "--no-progress"]
    if args.job in ("alpaca", "dialogsum"):
        cmd.append("train.eval_at_start=true")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    history = [json.loads(line) for line in open(out / "metrics.jsonl")]
    validation = [r for r in history if r["split"] == "validation"]
    final = json.loads((out / "metrics.json").read_text())
    record = {"job": args.job, "time": stamp, "minutes": minutes, "final": {k: v for k, v in final.items()
              if isinstance(v, (int, float))}, "first_validation": validation[0] if validation else None}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "tasks.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if args.job == "multi30k":
        # the final model once more, timed: teacher-forced loss plus beam search over all of val
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tunelab", "eval", str(out), "--json"], cwd=ROOT,
                              capture_output=True, text=True)
        decode_minutes = (time.perf_counter() - start) / 60
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        again = json.loads(proc.stdout)
        with open(RESULTS / "tasks.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"job": "multi30k-eval", "time": stamp, "minutes": decode_minutes, "final": again}) + "\n")
        print(f"Multi30k en-de val (1,014 sentences): BLEU {final['bleu']:.2f}, chrF {final['chrf']:.2f}, "
              f"loss {final['loss']:.4f} ({minutes:.1f} min, final evaluation included; `tunelab eval` alone: "
              f"{decode_minutes:.1f} min, BLEU {again['bleu']:.2f})")
    elif args.job == "dialogsum":
        before = validation[0]
        print(f"SmolLM2-135M-Instruct LoRA on DialogSum (450 train / 50 validation dialogues): "
              + ", ".join(f"{k} {before[k]:.4f} -> {final[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL", "loss"))
              + f" ({minutes:.1f} min)")
    elif args.job == "xquad":
        print(f"XQuAD-en, held-out articles: exact match {final['exact_match']:.4f}, F1 {final['f1']:.4f} "
              f"({minutes:.1f} min)")
    else:
        before = validation[0]
        print(f"SmolLM2-135M-Instruct LoRA SFT on alpaca: validation loss {before['loss']:.4f} -> {final['loss']:.4f}, "
              f"perplexity {before['perplexity']:.3f} -> {final['perplexity']:.3f} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
