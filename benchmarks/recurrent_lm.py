"""Recurrent language models on WikiText-2 (word level): perplexity on test.txt of a unigram model, an
interpolated Kneser-Ney trigram, and LSTM / GRU / Elman-RNN LMs (trained on valid.txt: the train split is not
in ../shared/data), all over the same vocabulary (valid.txt's words, <unk> for the rest) and the same test
stream; then SST-2 sentiment with the pretrained LSTM against the same network from random initialisation.

    python benchmarks/recurrent_lm.py baselines        # seconds
    python benchmarks/recurrent_lm.py lstm             # configs/wikitext2-lstm.yaml (also: gru, rnn)
    python benchmarks/recurrent_lm.py sentiment --lm RUN_DIR   # configs/sst2-lstm.yaml and -scratch.yaml
    python benchmarks/recurrent_lm.py all              # everything above, in order, and a summary

Every job appends its figures to benchmarks/results/recurrent.jsonl; runs go to /tmp/tunelab-bench/.
Extra arguments are config overrides for the training runs (e.g. train.epochs=1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2"
WORDS = ROOT / "runs" / "wikitext2-words"  # what the configs' model.tokenizer names
LM_CONFIG = "configs/wikitext2-lstm.yaml"


def record(entry: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "recurrent.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "load": os.getloadavg()[0], **entry}) + "\n")


def ensure_vocabulary() -> None:
    if (WORDS / "tokenizer.json").exists():
        return
    from tunelab.tokenizer.word_level import train_word_level

    train_word_level([WIKITEXT / "valid.txt"]).save(WORDS)
    print(f"wrote the word vocabulary of valid.txt to {WORDS.relative_to(ROOT)}")


def baselines() -> list[dict]:
    from tunelab.data.stream import encode_stream
    from tunelab.data.text import load_text
    from tunelab.evaluate.ngram import KneserNeyLM, UnigramLM, stream_perplexity
    from tunelab.tokenizer import Tokenizer

    ensure_vocabulary()
    tokenizer = Tokenizer.from_dir(WORDS)
    train = encode_stream(load_text(WIKITEXT / "valid.txt"), tokenizer)
    test = encode_stream(load_text(WIKITEXT / "test.txt"), tokenizer)
    V = tokenizer.vocab_size
    rows = []
    for name, make in [("unigram (add-one)", lambda: UnigramLM(train, V)),
                       ("Kneser-Ney trigram (interpolated, modified)", lambda: KneserNeyLM(train, V, order=3))]:
        start = time.perf_counter()
        result = stream_perplexity(make(), test)
        row = {"job": "baseline", "model": name, "perplexity": result["perplexity"], "loss": result["loss"],
               "tokens": result["tokens"], "minutes": (time.perf_counter() - start) / 60}
        record(row)
        rows.append(row)
        print(f"{name:45s} test perplexity {row['perplexity']:8.2f}  ({result['tokens']:,} tokens, vocabulary {V:,})")
    return rows


def tunelab(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"tunelab {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def train_lm(cell: str, overrides: list[str]) -> dict:
    ensure_vocabulary()
    out = Path(f"/tmp/tunelab-bench/wikitext2-{cell}-{time.strftime('%Y%m%d-%H%M%S')}")
    start = time.perf_counter()
    tunelab(["train", LM_CONFIG, f"output_dir={out}", f"model.architecture.cell={cell}", *overrides, "--no-progress"])
    minutes = (time.perf_counter() - start) / 60
    final = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "model" / "config.json").read_text())
    row = {"job": cell, "model": f"{cell.upper()} {config['num_layers']}x{config['hidden_size']}", "run": str(out),
           "perplexity": final["perplexity"], "loss": final["loss"], "tokens": final["tokens"], "minutes": minutes,
           "overrides": overrides}
    record(row)
    print(f"{row['model']:45s} test perplexity {row['perplexity']:8.2f}  ({minutes:.1f} min; run {out})")
    return row


def sentiment(lm_run: str, overrides: list[str]) -> list[dict]:
    rows = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, config, extra in [("pretrained on WikiText-2", "configs/sst2-lstm.yaml", [f"model.source={lm_run}"]),
                                ("random initialisation", "configs/sst2-lstm-scratch.yaml", [])]:
        out = Path(f"/tmp/tunelab-bench/{Path(config).stem}-{stamp}")
        start = time.perf_counter()
        tunelab(["train", config, f"output_dir={out}", *extra, *overrides, "--no-progress"])
        minutes = (time.perf_counter() - start) / 60
        final = json.loads((out / "metrics.json").read_text())
        row = {"job": "sentiment", "model": f"LSTM, {name}", "run": str(out), "accuracy": final["accuracy"],
               "f1": final["f1"], "minutes": minutes, "overrides": overrides}
        record(row)
        rows.append(row)
        print(f"SST-2 dev, {row['model']:35s} accuracy {row['accuracy']:.4f}  macro F1 {row['f1']:.4f}  "
              f"({minutes:.1f} min)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=["baselines", "lstm", "gru", "rnn", "sentiment", "all"])
    parser.add_argument("overrides", nargs="*", help="config overrides for the training runs")
    parser.add_argument("--lm", help="sentiment: the pretrained LSTM run directory")
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.job == "baselines":
        baselines()
    elif args.job in ("lstm", "gru", "rnn"):
        train_lm(args.job, args.overrides)
    elif args.job == "sentiment":
        if not args.lm:
            parser.error("sentiment needs --lm RUN_DIR (a run of configs/wikitext2-lstm.yaml)")
        sentiment(args.lm, args.overrides)
    else:
        rows = baselines()
        lms = [train_lm(cell, args.overrides) for cell in ("lstm", "gru", "rnn")]
        rows += lms + sentiment(lms[0]["run"], [])
        print("\nWikiText-2 test perplexity (trained on valid.txt) and SST-2 dev accuracy:")
        for row in rows:
            figure = f"perplexity {row['perplexity']:8.2f}" if "perplexity" in row else f"accuracy {row['accuracy']:.4f}"
            print(f"  {row['model']:45s} {figure}  {row['minutes']:5.1f} min")


if __name__ == "__main__":
    main()
