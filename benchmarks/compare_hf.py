"""Speed side by side: tunelab vs the Hugging Face stack (Trainer, PEFT, TRL, `generate`) on the same jobs.

    python benchmarks/compare_hf.py                      # every job, 2 rounds
    python benchmarks/compare_hf.py full generate --rounds 3
    python benchmarks/compare_hf.py sft --sides tunelab,trl-sft

Jobs (each side end to end in its own process: load the model, read and tokenize the data, train, evaluate
on the validation data, save):
  classify  MiniLM-L6 sequence classification, 4,000 SST-2 train phrases, 1 epoch, batch 32 (HF Trainer fp32
            and bf16; the peer is the faster)
  sft       SmolLM2-135M-Instruct LoRA (r 16, every projection) SFT on 64 alpaca examples, batch 8, loss on
            the answers (HF Trainer + PEFT, TRL SFTTrainer unpacked and packed)
  dpo       SmolLM2-135M-Instruct LoRA DPO (beta 0.1) on 32 hh-rlhf pairs (prompt <= 64 tokens, answers <= 128),
            batch 4 pairs (TRL DPOTrainer)
  full      SmolLM2-135M-Instruct full fine-tuning on tinyshakespeare rows of 512 tokens, 32 rows, batch 4
            (HF Trainer fp32 and bf16)
  generate  greedy decoding of 128 new tokens (EOS ignored) from chat prompts, at batch 1 and 8 (transformers
            `generate` fp32 and bf16)

Both sides of a job get the same files (written once into .bench/compare/, cut from ../shared/data), the same
model directory (SmolLM2 exported once from its GGUF with `tunelab export --format hf`), the same
hyperparameters and torch's default threads. The sides run one at a time, in alternation (the order reversed
every round), for --rounds rounds; the table gives medians. tokens/s counts real (non-padding) tokens: the
job's tokens (each training example's full length, as the HF side tokenizes it, times the epochs) over the
end-to-end wall time; "train tok/s" is over the training loop alone. Peak memory is the process's maximum
resident set. The final validation loss of both sides is printed: the speed counts only when they agree. For
`generate`, both sides' greedy tokens are compared instead. The ratio column is tunelab over the best peer.
tunelab puts big CPU tensors on transparent huge pages (torch's THP_MEM_ALLOC_ENABLE=1, which it sets when
imported); the HF sides run without it, as they do by default, or with it under --peer-huge-pages.
Side tunelab-gc (jobs sft, dpo, full) is tunelab with train.gradient_checkpointing: its ratios are gc_speed
and gc_memory (the memory a job saves, and what it costs in speed).
Job `full` also prints model FLOP utilisation: 6 x parameters x train tok/s over the bf16 torch.mm peak that
this script measures first.

Results are appended to benchmarks/results/compare_hf.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".bench" / "compare"

SIDES = {
    "classify": ["tunelab", "hf-fp32", "hf-bf16"],
    "sft": ["tunelab", "tunelab-gc", "hf-peft", "trl-sft", "trl-sft-packed"],
    "dpo": ["tunelab", "tunelab-gc", "trl-dpo"],
    "full": ["tunelab", "tunelab-gc", "hf-fp32", "hf-bf16"],
    "generate": ["tunelab", "hf-fp32", "hf-bf16"],
}
TARGETS = {"classify": 2.0, "sft": 2.0, "dpo": 2.0, "full": 1.5, "generate": 2.0}  # tokens/s ratio

# the hyperparameters both sides use
CLASSIFY = dict(train=4000, validation=1000, batch=32, lr=1e-4, warmup=0.06, weight_decay=0.01, max_length=128)
SFT = dict(train=64, validation=32, batch=8, lr=2e-4, max_length=512, r=16, alpha=32, dropout=0.05)
DPO = dict(train=32, validation=32, batch=4, lr=1e-4, beta=0.1, max_prompt=64, max_answer=128, r=16, alpha=32)
FULL = dict(rows=32, validation_rows=8, length=512, batch=4, lr=5e-5)
GENERATE = dict(new_tokens=128, batch1_prompts=4, batch8_prompts=8)
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------ data


def smollm_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (safetensors, tokenizer, chat template), exported once."""
    out = CACHE / "smollm2-135m-instruct-hf"
    if not (out / "config.json").exists():
        cmd = [sys.executable, "-m", "tunelab", "export", "smollm2-135m-instruct", "--format", "hf", "--out", str(out)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
        if proc.returncode != 0:
            raise SystemExit(f"export failed:\n{proc.stderr[-3000:]}")
    return out


def minilm_dir() -> Path:
    from tunelab.checkpoint.registry import REGISTRY

    return Path(REGISTRY["minilm-l6"].path())


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)


def prepare(job: str) -> Path:
    """The job's files in .bench/compare/<job>/ (made once; the same for every side). Generation takes its
    prompts from the SFT job's files."""
    if job == "generate":
        return prepare("sft")
    folder = CACHE / job
    if (folder / "ready").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if job == "classify":
        lines = (DATA / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
        _write_lines(folder / "train.tsv", lines[: 1 + CLASSIFY["train"]])
        lines = (DATA / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
        _write_lines(folder / "validation.tsv", lines[: 1 + CLASSIFY["validation"]])
    elif job == "sft":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smollm_dir())
        records = json.loads((DATA / "alpaca_demo" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
        conversations = []
        for r in records:
            user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
            if len(tokenizer.apply_chat_template(messages, tokenize=True)) <= SFT["max_length"]:
                conversations.append(messages)  # no example is cut: both sides train on the same tokens
        n, v = SFT["train"], SFT["validation"]
        _write_lines(folder / "train.jsonl", [json.dumps({"messages": m}) for m in conversations[:n]])
        _write_lines(folder / "validation.jsonl", [json.dumps({"messages": m}) for m in conversations[n: n + v]])
        prompts = [m[:1] for m in conversations[n + v: n + v + GENERATE["batch8_prompts"]]]
        _write_lines(folder / "prompts.jsonl", [json.dumps({"messages": m}) for m in prompts])
    elif job == "dpo":
        from transformers import AutoTokenizer

        from tunelab.data.preference import load_preferences

        tokenizer = AutoTokenizer.from_pretrained(smollm_dir())
        pairs, _ = load_preferences(DATA / "hh_rlhf" / "harmless-base-pairs.jsonl", format="hh-rlhf")
        kept = []
        for p in pairs:
            if len(p.prompt) != 1:
                continue  # single-turn prompts
            prompt = tokenizer.apply_chat_template(p.prompt, tokenize=True, add_generation_prompt=True)
            answers = [len(tokenizer(a + "<|im_end|>\n")["input_ids"]) for a in (p.chosen, p.rejected)]
            if len(prompt) <= DPO["max_prompt"] and max(answers) <= DPO["max_answer"] and p.chosen != p.rejected:
                kept.append({"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                             "rejected": [{"role": "assistant", "content": p.rejected}]})
        n, v = DPO["train"], DPO["validation"]
        if len(kept) < n + v:
            raise SystemExit(f"only {len(kept)} hh-rlhf pairs fit the lengths; the job needs {n + v}")
        _write_lines(folder / "train.jsonl", [json.dumps(k) for k in kept[:n]])
        _write_lines(folder / "validation.jsonl", [json.dumps(k) for k in kept[n: n + v]])
    elif job == "full":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smollm_dir())
        lines = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        parts, start = [], 0
        for rows in (FULL["rows"], FULL["validation_rows"]):
            need, text, count = rows * FULL["length"] + 8, [], 0
            while count < need:  # whole lines until the rows are full (the rest is dropped by both sides)
                text.append(lines[start])
                count += len(tokenizer(lines[start])["input_ids"])
                start += 1
            parts.append("".join(text))
        for name, text in zip(("train.txt", "validation.txt"), parts):
            (folder / name).write_text(text, encoding="utf-8")
    (folder / "ready").write_text("")
    return folder


def text_rows(tokenizer, path: Path) -> list[list[int]]:
    """The run_clm way: tokenize the text, add EOS, cut into rows of FULL["length"], drop the rest."""
    ids = tokenizer(path.read_text(encoding="utf-8"))["input_ids"] + [tokenizer.eos_token_id]
    n = FULL["length"]
    return [ids[i: i + n] for i in range(0, len(ids) - n + 1, n)]


def job_tokens(job: str, folder: Path) -> int:
    """The real tokens one epoch of the job trains on, tokenized the HF way: each example's full length (a
    preference pair counts both rows: prompt + chosen, prompt + rejected). The same count divides every side's
    time, so tokens/s ratios are ratios of wall time."""
    from transformers import AutoTokenizer

    if job == "classify":
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        lines = (folder / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
        return sum(len(tokenizer(line.rsplit("\t", 1)[0], truncation=True, max_length=CLASSIFY["max_length"])
                       ["input_ids"]) for line in lines)
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir())
    if job == "full":
        return sum(len(row) for row in text_rows(tokenizer, folder / "train.txt"))
    records = [json.loads(line) for line in (folder / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    if job == "sft":
        conversations = [r["messages"] for r in records]
    else:
        conversations = [r["prompt"] + r[answer] for r in records for answer in ("chosen", "rejected")]
    return sum(len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)) for c in conversations)


# ------------------------------------------------------------------------------------------------ tunelab side


def tunelab_config(job: str, folder: Path, out: Path) -> dict:
    common = dict(output_dir=str(out))
    train = dict(epochs=1, schedule="linear", warmup=0.0, weight_decay=0.0, precision="auto", seed=42,
                 save_steps=0, eval_steps=0, logging_steps=1)
    if job == "classify":
        c = CLASSIFY
        return {**common, "model": {"source": str(minilm_dir())}, "task": {"type": "classification"},
                "data": {"train": str(folder / "train.tsv"), "validation": str(folder / "validation.tsv"),
                         "text_field": "sentence", "label_field": "label", "max_length": c["max_length"]},
                "method": {"type": "full"},
                "train": {**train, "batch_size": c["batch"], "lr": c["lr"], "warmup": c["warmup"],
                          "weight_decay": c["weight_decay"]}}
    lora = {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": PROJECTIONS}}
    if job == "sft":
        lora["lora"]["dropout"] = SFT["dropout"]
        return {**common, "model": {"source": str(smollm_dir())}, "task": {"type": "chat", "train_on": "assistant"},
                "data": {"train": str(folder / "train.jsonl"), "validation": str(folder / "validation.jsonl"),
                         "format": "messages", "max_length": SFT["max_length"]},
                "method": lora, "train": {**train, "batch_size": SFT["batch"], "lr": SFT["lr"]}}
    if job == "dpo":
        return {**common, "model": {"source": str(smollm_dir())},
                "task": {"type": "preference", "loss": "dpo", "beta": DPO["beta"]},
                "data": {"train": str(folder / "train.jsonl"), "validation": str(folder / "validation.jsonl"),
                         "format": "preference", "max_length": DPO["max_prompt"] + DPO["max_answer"],
                         "max_prompt_length": DPO["max_prompt"]},
                "method": lora, "train": {**train, "batch_size": DPO["batch"], "lr": DPO["lr"]}}
    if job == "full":
        return {**common, "model": {"source": str(smollm_dir())}, "task": {"type": "causal_lm"},
                "data": {"train": str(folder / "train.txt"), "validation": str(folder / "validation.txt"),
                         "documents": "file", "max_length": FULL["length"]},
                "method": {"type": "full"}, "train": {**train, "batch_size": FULL["batch"], "lr": FULL["lr"]}}
    raise ValueError(job)


def tunelab_result(out: Path) -> dict:
    """Validation loss and training-loop seconds from a tunelab run directory."""
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train"]
    return {"val_loss": metrics.get("loss"), "train_seconds": train[-1].get("elapsed") if train else None}


def tunelab_generate(folder: Path) -> dict:
    import torch

    from tunelab.generate import GenerationSettings, generate
    from tunelab.train.run import load_any

    model, tokenizer = load_any(str(smollm_dir()), dtype=torch.bfloat16)
    model.eval()
    prompts = [tokenizer.apply_chat_template(json.loads(line)["messages"], add_generation_prompt=True)
               for line in (folder / "prompts.jsonl").read_text().splitlines()]
    prompts = [tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p for p in prompts]
    settings = GenerationSettings(max_new_tokens=GENERATE["new_tokens"], eos_token_ids=[])
    return _timed_generation(lambda batch: [c.token_ids for c in generate(model, tokenizer, batch, settings)],
                             prompts)


def _timed_generation(run, prompts: list[list[int]]) -> dict:
    """Batch 1 over the first prompts, one at a time, then batch 8: tokens/s of each, and the tokens."""
    run(prompts[:1])  # warm-up
    start, outputs = time.perf_counter(), []
    for p in prompts[: GENERATE["batch1_prompts"]]:
        outputs += run([p])
    batch1 = time.perf_counter() - start
    start = time.perf_counter()
    batched = run(prompts[: GENERATE["batch8_prompts"]])
    batch8 = time.perf_counter() - start
    n1, n8 = sum(len(o) for o in outputs), sum(len(o) for o in batched)
    return {"batch1_tokens_per_second": n1 / batch1, "batch8_tokens_per_second": n8 / batch8,
            "outputs": [list(map(int, o)) for o in batched]}


# ------------------------------------------------------------------------------------------------ HF side


def _training_args(out: Path, precision: str, **kw):
    import transformers as tf

    settings = dict(
        output_dir=str(out), num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        save_strategy="no", eval_strategy="no", logging_steps=1, report_to=[], bf16=precision == "bf16",
        use_cpu=True, seed=42, dataloader_num_workers=0, disable_tqdm=True)
    return tf.TrainingArguments(**{**settings, **kw})


def _lora_config(dropout: float, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=PROJECTIONS, task_type=task_type)


def hf_worker(job: str, side: str, folder: Path, out: Path) -> dict:
    import torch
    import transformers as tf

    precision = "bf16" if side.endswith("bf16") or side.startswith(("hf-peft", "trl")) else "fp32"
    if job == "classify":
        model_dir = minilm_dir()
        tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
        model = tf.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

        def rows(name):
            lines = (folder / name).read_text(encoding="utf-8").splitlines()[1:]
            items = []
            for line in lines:
                text, label = line.rsplit("\t", 1)
                enc = tokenizer(text, truncation=True, max_length=CLASSIFY["max_length"])
                items.append({**enc, "labels": int(label)})
            return items

        train, validation = rows("train.tsv"), rows("validation.tsv")
        args = _training_args(out, precision, per_device_train_batch_size=CLASSIFY["batch"],
                              per_device_eval_batch_size=64, learning_rate=CLASSIFY["lr"],
                              warmup_steps=CLASSIFY["warmup"], weight_decay=CLASSIFY["weight_decay"])
        trainer = tf.Trainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                             data_collator=tf.DataCollatorWithPadding(tokenizer))
    elif job == "sft" and side == "hf-peft":
        from peft import get_peft_model

        tokenizer = tf.AutoTokenizer.from_pretrained(smollm_dir())
        model = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(smollm_dir()), _lora_config(SFT["dropout"]))

        def rows(name):
            items = []
            for line in (folder / name).read_text(encoding="utf-8").splitlines():
                messages = json.loads(line)["messages"]
                ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
                prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                                       return_dict=False)
                labels = [-100] * len(prompt) + list(ids[len(prompt):])
                items.append({"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": labels})
            return items

        train, validation = rows("train.jsonl"), rows("validation.jsonl")
        args = _training_args(out, precision, per_device_train_batch_size=SFT["batch"], per_device_eval_batch_size=8,
                              learning_rate=SFT["lr"])
        trainer = tf.Trainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                             data_collator=tf.DataCollatorForSeq2Seq(tokenizer, padding=True))
    elif job == "sft":
        import datasets
        from trl import SFTConfig, SFTTrainer

        def dataset(name):
            rows = [json.loads(line)["messages"] for line in (folder / name).read_text().splitlines()]
            return datasets.Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])

        config = SFTConfig(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=SFT["batch"],
                           per_device_eval_batch_size=8, learning_rate=SFT["lr"], lr_scheduler_type="linear",
                           warmup_steps=0, weight_decay=0.0, save_strategy="no", eval_strategy="no", logging_steps=1,
                           report_to=[], bf16=True, use_cpu=True, seed=42, disable_tqdm=True,
                           max_length=SFT["max_length"], packing=side.endswith("packed"))
        trainer = SFTTrainer(model=str(smollm_dir()), args=config, train_dataset=dataset("train.jsonl"),
                             eval_dataset=dataset("validation.jsonl"), peft_config=_lora_config(SFT["dropout"]))
    elif job == "dpo":
        import datasets
        from trl import DPOConfig, DPOTrainer

        def dataset(name):
            return datasets.Dataset.from_list([json.loads(line) for line in (folder / name).read_text().splitlines()])

        config = DPOConfig(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=DPO["batch"],
                           per_device_eval_batch_size=DPO["batch"], learning_rate=DPO["lr"], lr_scheduler_type="linear",
                           warmup_steps=0, weight_decay=0.0, save_strategy="no", eval_strategy="no", logging_steps=1,
                           report_to=[], bf16=True, use_cpu=True, seed=42, disable_tqdm=True, beta=DPO["beta"],
                           max_length=DPO["max_prompt"] + DPO["max_answer"])
        trainer = DPOTrainer(model=str(smollm_dir()), args=config, train_dataset=dataset("train.jsonl"),
                             eval_dataset=dataset("validation.jsonl"), peft_config=_lora_config(0.0))
    elif job == "full":
        tokenizer = tf.AutoTokenizer.from_pretrained(smollm_dir())
        model = tf.AutoModelForCausalLM.from_pretrained(smollm_dir())

        def rows(name):
            return [{"input_ids": row, "labels": row} for row in text_rows(tokenizer, folder / name)]

        train, validation = rows("train.txt"), rows("validation.txt")
        args = _training_args(out, precision, per_device_train_batch_size=FULL["batch"],
                              per_device_eval_batch_size=FULL["batch"], learning_rate=FULL["lr"])
        trainer = tf.Trainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                             data_collator=tf.default_data_collator)
    elif job == "generate":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        tokenizer = tf.AutoTokenizer.from_pretrained(smollm_dir())
        model = tf.AutoModelForCausalLM.from_pretrained(smollm_dir(), dtype=dtype).eval()
        tokenizer.padding_side = "left"
        prompts = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True,
                                                 add_generation_prompt=True, return_dict=False)
                   for line in (folder / "prompts.jsonl").read_text().splitlines()]
        n = GENERATE["new_tokens"]

        def run(batch):
            enc = tokenizer.pad({"input_ids": [list(p) for p in batch]}, return_tensors="pt")
            with torch.inference_mode():
                out_ids = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id or 0)
            return [row[enc["input_ids"].shape[1]:].tolist() for row in out_ids]

        return _timed_generation(run, prompts)
    else:
        raise ValueError(job)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    val_loss = trainer.evaluate()["eval_loss"]
    trainer.save_model(str(out / "model"))
    return {"train_seconds": train_seconds, "val_loss": val_loss}


# ------------------------------------------------------------------------------------------------ driver


def _env(side: str = "tunelab", *, peer_huge_pages: bool = False) -> dict:
    """A side's environment. tunelab sets THP_MEM_ALLOC_ENABLE=1 for itself when it is imported (huge pages for
    big tensors; importing it here put that into this process's environment too), so the HF sides run without
    it, as they do by default, unless `peer_huge_pages` (--peer-huge-pages)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if not side.startswith("tunelab"):
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        if peer_huge_pages:
            env["THP_MEM_ALLOC_ENABLE"] = "1"
    return env


def run_side(job: str, side: str, folder: Path, work: Path, *, peer_huge_pages: bool = False) -> dict:
    """One side of one job in its own process: wall seconds, peak resident memory and the side's figures."""
    out = work / f"{job}-{side}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ours = side.startswith("tunelab") and job != "generate"
    if ours:
        import yaml

        config = tunelab_config(job, folder, out / "run")
        config["train"]["gradient_checkpointing"] = side == "tunelab-gc"
        (out / "config.yaml").write_text(yaml.safe_dump(config))
        cmd = [sys.executable, "-m", "tunelab", "train", str(out / "config.yaml"), "--no-progress"]
    else:
        cmd = [sys.executable, __file__, "--worker", job, side, "--folder", str(folder), "--out", str(out)]
    env = _env(side, peer_huge_pages=peer_huge_pages)
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{job} / {side} failed; the last lines of {out / 'log.txt'}:\n"
                         f"{(out / 'log.txt').read_text()[-3000:]}")
    figures = tunelab_result(out / "run") if ours else \
        json.loads((out / "result.json").read_text())
    return {"job": job, "side": side, "seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, **figures}


def matmul_peak() -> dict:
    """GFLOP/s of torch.mm on square matrices (the best of a few sizes and repeats), fp32 and bf16."""
    import torch

    best = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = []
        for n in (1024, 2048, 3072):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)
            for _ in range(3):
                start = time.perf_counter()
                torch.mm(a, b)
                rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
        best[name] = max(rates)
    return best


def summarise(job: str, runs: list[dict], tokens: int | None, peak: dict, n_params: int) -> list[dict]:
    rows = []
    for side in SIDES[job]:
        mine = [r for r in runs if r["side"] == side]
        if not mine:
            continue
        row = {"job": job, "side": side, "rounds": len(mine), "seconds": statistics.median(r["seconds"] for r in mine),
               "peak_mb": statistics.median(r["peak_mb"] for r in mine)}
        if job == "generate":
            for k in ("batch1_tokens_per_second", "batch8_tokens_per_second"):
                row[k] = statistics.median(r[k] for r in mine)
            row["tokens_per_second"] = row["batch1_tokens_per_second"]
        else:
            row["val_loss"] = statistics.median(r["val_loss"] for r in mine)
            row["tokens_per_second"] = tokens / row["seconds"]
            train = [r["train_seconds"] for r in mine if r.get("train_seconds")]
            if train:
                row["train_tokens_per_second"] = tokens / statistics.median(train)
                if job == "full":
                    row["mfu"] = 6 * n_params * row["train_tokens_per_second"] / (peak["bf16"] * 1e9)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'job':9} {'side':15} {'wall s':>8} {'tok/s':>8} {'train tok/s':>11} {'peak MB':>8} {'val loss':>9}  extra"
    print(head)
    print("-" * len(head))
    for r in rows:
        extra = ""
        if r["job"] == "generate":
            extra = f"batch 1: {r['batch1_tokens_per_second']:.1f} tok/s, batch 8: {r['batch8_tokens_per_second']:.1f}"
        if "mfu" in r:
            extra = f"MFU {r['mfu']:.1%}"
        print(f"{r['job']:9} {r['side']:15} {r['seconds']:8.1f} {r['tokens_per_second']:8.1f} "
              f"{r.get('train_tokens_per_second', float('nan')):11.1f} {r['peak_mb']:8.0f} "
              f"{r.get('val_loss', float('nan')):9.4f}  {extra}")


def ratios(job: str, rows: list[dict], runs: list[dict]) -> dict:
    """tunelab over the best peer: tokens/s (and, for generate, each batch size), peak memory; the agreement."""
    mine = next((r for r in rows if r["side"] == "tunelab"), None)
    peers = [r for r in rows if not r["side"].startswith("tunelab")]
    if mine is None or not peers:
        return {}
    if job == "generate":
        out = {}
        for k in ("batch1_tokens_per_second", "batch8_tokens_per_second"):
            out[k.replace("_tokens_per_second", "")] = mine[k] / max(p[k] for p in peers)
        ours = next(r["outputs"] for r in runs if r["side"] == "tunelab")
        theirs = next((r["outputs"] for r in runs if r["side"] == "hf-fp32"), None)
        if theirs is not None:
            same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
            out["greedy_tokens_equal_to_hf_fp32"] = same / max(1, sum(len(x) for x in ours))
        out["speed"] = min(out["batch1"], out["batch8"])
        return out
    best = max(peers, key=lambda p: p["tokens_per_second"])
    out = {"peer": best["side"], "speed": mine["tokens_per_second"] / best["tokens_per_second"],
           "train_speed": mine.get("train_tokens_per_second", 0) / best.get("train_tokens_per_second", 1),
           "memory": mine["peak_mb"] / best["peak_mb"], "val_loss": (mine["val_loss"], best["val_loss"])}
    gc = next((r for r in rows if r["side"] == "tunelab-gc"), None)
    if gc is not None:  # the same job with train.gradient_checkpointing
        out.update({"gc_speed": gc["tokens_per_second"] / best["tokens_per_second"],
                    "gc_memory": gc["peak_mb"] / best["peak_mb"], "gc_val_loss": gc["val_loss"]})
    return out


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count()}
    for name in ("torch", "transformers", "peft", "trl", "tunelab"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jobs", nargs="*", help=f"any of {', '.join(SIDES)} (default: every job)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sides", help="comma-separated sides to run (default: all of each job)")
    parser.add_argument("--peer-huge-pages", action="store_true",
                        help="run the HF sides with THP_MEM_ALLOC_ENABLE=1 too (tunelab sets it for itself)")
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job, side = args.worker
        figures = tunelab_generate(args.folder) if side == "tunelab" else \
            hf_worker(job, side, args.folder, args.out)
        (args.out / "result.json").write_text(json.dumps(figures))
        return
    jobs = args.jobs or list(SIDES)
    unknown = [j for j in jobs if j not in SIDES]
    if unknown:
        parser.error(f"unknown job(s) {', '.join(unknown)}; the jobs are {', '.join(SIDES)}")
    wanted = set(args.sides.split(",")) if args.sides else None
    peak = matmul_peak()
    print(f"torch.mm peak: {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} GFLOP/s bf16")
    work = CACHE / "runs"
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(), "matmul_peak_gflops": peak,
              "rounds": args.rounds, "peer_huge_pages": args.peer_huge_pages, "jobs": {}}
    n_params = 134_515_008  # SmolLM2-135M (tied embeddings counted once)
    all_rows = []
    for job in jobs:
        folder = prepare(job)
        sides = [s for s in SIDES[job] if wanted is None or s in wanted]
        runs = []
        for round_ in range(args.rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                result = run_side(job, side, folder, work, peer_huge_pages=args.peer_huge_pages)
                runs.append(result)
                print(f"  {job} / {side} round {round_ + 1}: {result['seconds']:.1f} s, "
                      f"{result['peak_mb']:.0f} MB", flush=True)
        tokens = None if job == "generate" else job_tokens(job, folder)
        rows = summarise(job, runs, tokens, peak, n_params)
        all_rows += rows
        record["jobs"][job] = {"rows": rows, "ratios": ratios(job, rows, runs)}
        print_table(rows)
        r = record["jobs"][job]["ratios"]
        if r:
            line = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())
            print(f"  tunelab / best peer: {line}  (target: speed >= {TARGETS[job]})\n", flush=True)
    print_table(all_rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "compare_hf.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
