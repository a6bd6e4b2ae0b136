"""Fine-tuning side by side: tunelab vs the Hugging Face Trainer on the same model, data and budget.

    python benchmarks/finetune_vs_hf.py sst2            # both sides, SST-2 (MiniLM-L6)
    python benchmarks/finetune_vs_hf.py conll --side hf # only the HF Trainer, CoNLL-2003

Each side runs in its own process (one after the other, never at the same time) and is timed end to
end: load the model, read and tokenize the data, train, evaluate on the validation file, save. The
validation metric of both sides is computed by the same function (tunelab.evaluate.metrics), on the
same validation file. Results are appended to benchmarks/results/finetune.jsonl and printed.
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
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"

JOBS = {
    "sst2": {"config": "configs/sst2-minilm.yaml", "metric": "accuracy", "hf_epochs": 1},
    "conll": {"config": "configs/conll2003-minilm.yaml", "metric": "f1", "hf_epochs": 3},
}


def peak_rss_mb(pid_usage) -> float:
    return pid_usage.ru_maxrss / 1024


def run_tunelab(job: str, out: Path, overrides: list[str]) -> dict:
    cfg = JOBS[job]["config"]
    cmd = [sys.executable, "-m", "tunelab", "train", cfg, f"output_dir={out}", *overrides, "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"tunelab failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"side": "tunelab", "job": job, "seconds": seconds, "metrics": _scalars(metrics)}


def run_hf(job: str, out: Path, precision: str) -> dict:
    cmd = [sys.executable, __file__, job, "--hf-worker", "--out", str(out), "--precision", precision]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"HF Trainer failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "hf_metrics.json").read_text())
    return {"side": f"hf-trainer-{precision}", "job": job, "seconds": seconds, "metrics": metrics}


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float))}


# ------------------------------------------------------------------------------------------------ HF side


def hf_worker(job: str, out: Path, precision: str) -> None:
    """The Hugging Face way: AutoModel + AutoTokenizer + Trainer with dynamic padding (its defaults)."""
    import numpy as np
    import transformers as tf

    from tunelab.checkpoint.registry import REGISTRY
    from tunelab.evaluate import metrics as M

    model_dir = REGISTRY["minilm-l6"].path()
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    args = dict(
        output_dir=str(out), per_device_train_batch_size=32, per_device_eval_batch_size=64,
        learning_rate=1e-4, num_train_epochs=JOBS[job]["hf_epochs"], warmup_steps=0.06, weight_decay=0.01,
        lr_scheduler_type="linear", save_strategy="no", eval_strategy="no", logging_steps=200, report_to=[],
        bf16=precision == "bf16", use_cpu=True, seed=42, dataloader_num_workers=0,
    )
    if job == "sst2":
        def read(path):
            rows = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf-8")][1:]
            return [r[0] for r in rows], [int(r[1]) for r in rows]

        train_x, train_y = read(DATA / "sst2" / "train.tsv")
        val_x, val_y = read(DATA / "sst2" / "dev.tsv")
        enc = lambda xs, ys: [dict(**tokenizer(x, truncation=True, max_length=128), labels=y) for x, y in zip(xs, ys)]  # noqa: E731
        model = tf.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        trainer = tf.Trainer(model=model, args=tf.TrainingArguments(**args), train_dataset=enc(train_x, train_y),
                             data_collator=tf.DataCollatorWithPadding(tokenizer))
        trainer.train()
        logits = trainer.predict(enc(val_x, val_y)).predictions
        result = M.classification_metrics(np.argmax(logits, -1).tolist(), val_y, ["0", "1"])
        result = {k: v for k, v in result.items() if isinstance(v, float)}
    else:
        from tunelab.data.tagging import read_conll

        train = read_conll(DATA / "conll2003" / "train.txt", tag_column=1)
        val = read_conll(DATA / "conll2003" / "valid.txt", tag_column=1)
        labels = ["O"] + sorted({t for e in train for t in e.tags} - {"O"})
        ids = {t: i for i, t in enumerate(labels)}

        def encode(examples):
            rows = []
            for e in examples:
                x = tokenizer(e.tokens, is_split_into_words=True, truncation=True, max_length=128)
                previous, tags = None, []
                for w in x.word_ids():
                    tags.append(-100 if w is None or w == previous else ids[e.tags[w]])
                    previous = w
                rows.append(dict(**x, labels=tags))
            return rows

        model = tf.AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=len(labels))
        trainer = tf.Trainer(model=model, args=tf.TrainingArguments(**args), train_dataset=encode(train),
                             data_collator=tf.DataCollatorForTokenClassification(tokenizer))
        trainer.train()
        val_rows = encode(val)
        logits = trainer.predict(val_rows).predictions
        predicted, gold = [], []
        for row, feature, e in zip(np.argmax(logits, -1), val_rows, val):
            words = [labels[p] for p, l in zip(row, feature["labels"]) if l != -100]
            predicted.append(words + ["O"] * (len(e.tags) - len(words)))
            gold.append(list(e.tags))
        result = M.span_metrics(predicted, gold, scheme=None)
        result = {k: v for k, v in result.items() if isinstance(v, float)}
    trainer.save_model(str(out / "model"))
    (out / "hf_metrics.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("--side", choices=["both", "tunelab", "hf"], default="both")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="HF Trainer precision")
    parser.add_argument("--out", default=None)
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="tunelab config overrides")
    args = parser.parse_args()
    if args.hf_worker:
        hf_worker(args.job, Path(args.out), args.precision)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    if args.side in ("both", "hf"):
        results.append(run_hf(args.job, Path(args.out or f"/tmp/tunelab-bench/{args.job}-hf-{stamp}"), args.precision))
    if args.side in ("both", "tunelab"):
        results.append(run_tunelab(args.job, Path(args.out or f"/tmp/tunelab-bench/{args.job}-tunelab-{stamp}"),
                                   args.overrides))
    metric = JOBS[args.job]["metric"]
    with open(RESULTS / "finetune.jsonl", "a", encoding="utf-8") as f:
        for r in results:
            r["time"] = stamp
            f.write(json.dumps(r) + "\n")
    print(f"{'side':<20} {'minutes':>8} {metric:>10}")
    for r in results:
        print(f"{r['side']:<20} {r['seconds'] / 60:8.1f} {r['metrics'].get(metric, float('nan')):10.4f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
