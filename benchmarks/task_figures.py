"""tunelab's own figures where there is no HF side to run: extractive QA on XQuAD (held-out articles),
SmolLM2-135M-Instruct LoRA SFT on the alpaca sample (validation loss and perplexity before / after), a
character-level GPT pretrained from scratch on tinyshakespeare (validation loss in nats per character),
BERT pretraining on WikiText-2 (MLM and NSP accuracy, masked-token perplexity), then fine-tuning the result
on rotten tomatoes against the same architecture from random initialisation, English-German translation on
Multi30k with the Transformer from scratch (sacreBLEU BLEU / chrF on val, and the time of beam search over
the 1,014 sentences), and DialogSum summarization by SmolLM2 with LoRA (ROUGE-1/2/L before / after) and by a BERT2BERT
encoder-decoder warm-started from MiniLM-L6, and LoRA DPO of SmolLM2-135M-Instruct on HH-RLHF harmless-base (reward
accuracy and chosen - rejected margin of the held-out pairs, before and while training), and online GRPO of
SmolLM2-135M-Instruct with LoRA on arithmetic problems checked by a verifier (greedy success rate on 200 held-out
problems before training and at each evaluation), and the feedback loop on SST-2 with MiniLM-L6 (dev accuracy by
round), next to a control loop that trains on as many pool rows chosen at random.

    python benchmarks/task_figures.py xquad
    python benchmarks/task_figures.py alpaca
    python benchmarks/task_figures.py shakespeare
    python benchmarks/task_figures.py bert-mlm
    python benchmarks/task_figures.py multi30k      # trains the BPE tokenizer first if it is missing
    python benchmarks/task_figures.py dialogsum
    python benchmarks/task_figures.py dialogsum-bert2bert
    python benchmarks/task_figures.py hh-dpo
    python benchmarks/task_figures.py grpo          # writes the arithmetic problems first if they are missing
    python benchmarks/task_figures.py sst2-loop
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JOBS = {"xquad": "configs/xquad-minilm.yaml", "alpaca": "configs/alpaca-smollm2-lora.yaml",
        "shakespeare": "configs/tinyshakespeare-gpt.yaml", "bert-mlm": "configs/wikitext2-bert-mlm.yaml",
        "multi30k": "configs/multi30k-transformer.yaml", "dialogsum": "configs/dialogsum-smollm2-lora.yaml",
        "dialogsum-bert2bert": "configs/dialogsum-bert2bert.yaml", "hh-dpo": "configs/hh-rlhf-smollm2-dpo.yaml",
        "grpo": "configs/arithmetic-smollm2-grpo.yaml", "sst2-loop": "configs/sst2-minilm-loop.yaml"}
MULTI30K_TOKENIZER = "runs/tokenizers/multi30k-bpe8k"
WIKITEXT_WORDPIECE = "runs/tokenizers/wikitext2-wordpiece8k"  # configs/wikitext2-bert-mlm.yaml's tokenizer
ARITHMETIC = "runs/data/arithmetic"  # configs/arithmetic-smollm2-grpo.yaml reads its train.jsonl, validation.jsonl
FINE_TUNE = "configs/rotten-tomatoes-bert-mlm.yaml"


def run_config(config: str, out: Path, *overrides: str) -> tuple[dict, list[dict], float]:
    """Train `config` into `out`; (final metrics, validation records, minutes)."""
    cmd = [sys.executable, "-m", "tunelab", "train", config, f"output_dir={out}", *overrides, "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    history = [json.loads(line) for line in open(out / "metrics.jsonl")]
    validation = [r for r in history if r["split"] == "validation"]
    return json.loads((out / "metrics.json").read_text()), validation, minutes


def numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def bert_mlm(out: Path, overrides: list[str], stamp: str) -> dict:
    """Pretrain, then fine-tune the result and the same architecture from random initialisation."""
    final, validation, minutes = run_config(JOBS["bert-mlm"], out / "pretrain", *overrides)
    before = validation[0]
    print(f"BERT pretraining (4 layers, 256 wide) on WikiText-2 valid.txt, validated on test.txt ({minutes:.1f} min):\n"
          f"  MLM accuracy {before['mlm_accuracy']:.4f} -> {final['mlm_accuracy']:.4f}, masked-token perplexity "
          f"{before['mlm_perplexity']:.1f} -> {final['mlm_perplexity']:.2f}\n"
          f"  NSP accuracy {before['nsp_accuracy']:.4f} -> {final['nsp_accuracy']:.4f} (best step {final['step']})")
    tuned, _, tuned_minutes = run_config(FINE_TUNE, out / "fine-tune", f"model.source={out / 'pretrain'}")
    # the architecture and tokenizer as the pretraining ran, its overrides included
    pretrained = yaml.safe_load((out / "pretrain" / "config.yaml").read_text())["model"]
    scratch, _, scratch_minutes = run_config(FINE_TUNE, out / "scratch", "model.source=null",
                                             f"model.architecture={json.dumps(pretrained['architecture'])}",
                                             f"model.tokenizer={pretrained['tokenizer']}")
    print(f"rotten tomatoes (985 held-out sentences), the same architecture:\n"
          f"  pretrained above: accuracy {tuned['accuracy']:.4f}, macro F1 {tuned['f1']:.4f} ({tuned_minutes:.1f} min)\n"
          f"  random init:      accuracy {scratch['accuracy']:.4f}, macro F1 {scratch['f1']:.4f} ({scratch_minutes:.1f} min)")
    return {"job": "bert-mlm", "time": stamp, "minutes": minutes, "final": numbers(final), "first_validation": before,
            "fine_tune": {"pretrained": numbers(tuned), "random_init": numbers(scratch),
                          "minutes": [tuned_minutes, scratch_minutes]}}


def feedback_loop(out: Path, overrides: list[str], stamp: str) -> dict:
    """The loop of configs/sst2-minilm-loop.yaml (the gold labels judge; the errors are relabelled), then the same
    loop with a control judge that calls a random seventh of the answers bad (as many rows, chosen at random)."""
    runs = {}
    for name, extra in (("errors", []), ("control", ["feedback.collect=[{type: verifier, function: "
                                                      "benchmarks/loop_control.py:random_seventh}]"])):
        cmd = [sys.executable, "-m", "tunelab", "feedback", "loop", JOBS["sst2-loop"], f"output_dir={out / name}",
               f"feedback.store={out / name / 'feedback.db'}", *extra, *overrides, "--no-progress"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        minutes = (time.perf_counter() - start) / 60
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        rounds = [json.loads(line) for line in open(out / name / "loop.jsonl", encoding="utf-8")]
        runs[name] = {"minutes": minutes, "rounds": [{k: r[k] for k in ("round", "score", "rows", "replayed", "bad",
                                                                        "good", "seconds")} for r in rounds]}
        label = "errors relabelled" if name == "errors" else "control: random rows"
        print(f"{label} ({minutes:.1f} min): dev accuracy by round " + ", ".join(f"{r['score']:.4f}" for r in rounds)
              + "; rows trained on per round " + ", ".join(str(r["rows"]) for r in rounds))
    return {"job": "sst2-loop", "time": stamp, **runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(f"/tmp/tunelab-bench/{args.job}-{stamp}")
    if args.job == "bert-mlm":
        if not (ROOT / WIKITEXT_WORDPIECE / "tokenizer.json").exists():
            subprocess.run([sys.executable, "-m", "tunelab", "tokenizer", "train", "--data",
                            "../shared/data/wikitext2/valid.txt", "--type", "wordpiece", "--vocab-size", "8000",
                            "--out", WIKITEXT_WORDPIECE], cwd=ROOT, check=True)
        record = bert_mlm(out, args.overrides, stamp)
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "tasks.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return
    if args.job == "sst2-loop":
        record = feedback_loop(out, args.overrides, stamp)
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "tasks.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return
    if args.job == "multi30k" and not (ROOT / MULTI30K_TOKENIZER / "tokenizer.json").exists():
        data = "../shared/data/multi30k_en_de"
        subprocess.run([sys.executable, "examples/seq2seq_tokenizer.py", "--out", MULTI30K_TOKENIZER, "--vocab-size",
                        "8000", f"{data}/train.en", f"{data}/train.de"], cwd=ROOT, check=True)
    if args.job == "grpo" and not (ROOT / ARITHMETIC / "validation.jsonl").exists():
        subprocess.run([sys.executable, "examples/arithmetic_data.py", "--out", ARITHMETIC, "--train", "2000",
                        "--validation", "200", "--seed", "0"], cwd=ROOT, check=True)
    extra = ["train.eval_at_start=true"] if args.job in ("alpaca", "dialogsum", "grpo") else []
    final, validation, minutes = run_config(JOBS[args.job], out, *args.overrides, *extra)
    history = [json.loads(line) for line in open(out / "metrics.jsonl")]
    record = {"job": args.job, "time": stamp, "minutes": minutes, "final": {k: v for k, v in final.items()
              if isinstance(v, (int, float))}, "first_validation": validation[0] if validation else None}
    if args.job == "shakespeare":
        train = [r for r in history if r["split"] == "train"]
        speeds = sorted(r["tokens_per_second"] for r in train)
        samples = [json.loads(line) for line in open(out / "samples.jsonl", encoding="utf-8")]
        record["tokens_per_second_median"] = speeds[len(speeds) // 2]
        print(f"tinyshakespeare char GPT from scratch: validation loss {final['loss']:.4f} nats/char "
              f"(perplexity {final['perplexity']:.3f}) after {final['step']} steps, {minutes:.1f} min in all, "
              f"{speeds[len(speeds) // 2]:.0f} tokens/s (median of the logging windows)")
        print(f"last sample (step {samples[-1]['step']}):\n{samples[-1]['prompt']}{samples[-1]['text']}")
    elif args.job == "multi30k":
        # the final model once more, timed: teacher-forced loss plus beam search over all of val
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "tunelab", "eval", str(out), "--json"], cwd=ROOT,
                              capture_output=True, text=True)
        decode_minutes = (time.perf_counter() - start) / 60
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        again = json.loads(proc.stdout)
        record["eval_minutes"], record["eval"] = decode_minutes, again
        print(f"Multi30k en-de val (1,014 sentences): BLEU {final['bleu']:.2f}, chrF {final['chrf']:.2f}, "
              f"loss {final['loss']:.4f} ({minutes:.1f} min, final evaluation included; `tunelab eval` alone: "
              f"{decode_minutes:.1f} min, BLEU {again['bleu']:.2f})")
    elif args.job == "dialogsum-bert2bert":
        print(f"BERT2BERT (MiniLM-L6 warm start) on DialogSum (450 train / 50 validation dialogues): "
              + ", ".join(f"{k} {final[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL", "loss")) + f" ({minutes:.1f} min)")
    elif args.job == "dialogsum":
        before = validation[0]
        print(f"SmolLM2-135M-Instruct LoRA on DialogSum (450 train / 50 validation dialogues): "
              + ", ".join(f"{k} {before[k]:.4f} -> {final[k]:.4f}" for k in ("rouge1", "rouge2", "rougeL", "loss"))
              + f" ({minutes:.1f} min)")
    elif args.job == "hh-dpo":
        # before training the policy is its reference: loss ln 2, every implicit reward 0 (not evaluated)
        train_log = [r for r in history if r["split"] == "train"]
        record["validation_curve"] = [{k: r[k] for k in ("step", "reward_accuracy", "margin", "loss")} for r in validation]
        record["train_margin_first_last"] = [train_log[0]["margin"], train_log[-1]["margin"]]
        print(f"SmolLM2-135M-Instruct LoRA DPO on HH-RLHF harmless-base ({final['pairs']} validation pairs), "
              f"{minutes:.1f} min: reward accuracy {final['reward_accuracy']:.4f}, margin {final['margin']:.4f}, "
              f"loss {final['loss']:.4f} (best step {final['step']}; before training 0, 0, {math.log(2):.4f})")
        print("validation by step: " + ", ".join(f"{r['step']}: accuracy {r['reward_accuracy']:.3f}, margin "
                                                  f"{r['margin']:.3f}" for r in validation))
        print(f"training pairs, margin of the first and last logging window: {train_log[0]['margin']:.3f} -> "
              f"{train_log[-1]['margin']:.3f}")
    elif args.job == "grpo":
        # the baseline is the evaluation at step 0 (the untrained model, greedy); final: the best evaluation
        before, train_log = validation[0], [r for r in history if r["split"] == "train"]
        keys = ("success_rate", "reward", "completion_length", "truncated")
        record["validation_curve"] = [{k: r[k] for k in ("step", *keys)} for r in validation]
        window = lambda rows: {k: sum(r[k] for r in rows) / len(rows) for k in ("reward", "success_rate",  # noqa: E731
                                                                                 "completion_length", "kl")}
        record["train_first_last"] = [window(train_log[:5]), window(train_log[-5:])]
        print(f"SmolLM2-135M-Instruct LoRA GRPO on arithmetic ({final['prompts']} held-out problems, greedy), "
              f"{minutes:.1f} min: success rate {before['success_rate']:.3f} -> {final['success_rate']:.3f} "
              f"(best step {final['step']}), completion length {before['completion_length']:.1f} -> "
              f"{final['completion_length']:.1f} tokens, truncated {before['truncated']:.3f} -> "
              f"{final['truncated']:.3f}")
        print("validation by step: " + ", ".join(f"{r['step']}: {r['success_rate']:.3f}" for r in validation))
        first, last = record["train_first_last"]
        print(f"sampled completions (T=0.8), first and last 5 logging windows: reward {first['reward']:.3f} -> "
              f"{last['reward']:.3f}, length {first['completion_length']:.1f} -> {last['completion_length']:.1f}, "
              f"KL {first['kl']:.4f} -> {last['kl']:.4f}")
    elif args.job == "xquad":
        print(f"XQuAD-en, held-out articles: exact match {final['exact_match']:.4f}, F1 {final['f1']:.4f} "
              f"({minutes:.1f} min)")
    else:
        before = validation[0]
        print(f"SmolLM2-135M-Instruct LoRA SFT on alpaca: validation loss {before['loss']:.4f} -> {final['loss']:.4f}, "
              f"perplexity {before['perplexity']:.3f} -> {final['perplexity']:.3f} ({minutes:.1f} min)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "tasks.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
