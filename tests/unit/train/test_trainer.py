"""The Trainer: gradient accumulation that changes nothing, early stopping and best-checkpoint selection,
checkpoint discovery that ignores half-written directories."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config.loading import validate
from tunelab.config.schema import TrainConfig, TrainSection
from tunelab.data.collate import pad_collate
from tunelab.data.samplers import RandomBatchSampler
from tunelab.train.checkpointing import TrainerState, list_checkpoints, save_checkpoint
from tunelab.train.run import load_any_tokenizer, prepare_data, prepare_model, train
from tunelab.train.tasks import CausalLMStep
from tunelab.train.trainer import BEST, Batches, Trainer

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
SST2_DEV = DATA / "sst2" / "dev.tsv"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"


def make_config(output_dir: Path, **sections) -> TrainConfig:
    raw = {"output_dir": str(output_dir), **sections}
    return validate(TrainConfig, raw, "test config")


def run_quietly(config: TrainConfig) -> dict:
    return train(config, show_progress=False, log=lambda *args: None)


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by {worst:.3e}"
    return worst


def largest_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """The largest change of any weight (names compared without a "bert." prefix)."""
    before = {k.removeprefix("bert."): v for k, v in before.items()}
    after = {k.removeprefix("bert."): v for k, v in after.items()}
    shared = [k for k in before if k in after]
    assert shared, "no weight names in common"
    return max(float((after[k] - before[k]).abs().max()) for k in shared)


# ---------------------------------------------------------------------------------------------------------------
# gradient accumulation: batch_size 8 == batch_size 4 x grad_accum 2


def test_grad_accum_classification_gives_the_same_weights(train_bert_dir, tmp_path):
    def run(batch_size: int, grad_accum: int) -> Path:
        out = tmp_path / f"bs{batch_size}x{grad_accum}"
        run_quietly(make_config(
            out,
            model={"source": str(train_bert_dir)},
            task={"type": "classification"},
            # 62 examples: the last batch of an epoch is 6 examples, or micro-batches of 4 and 2
            data={"train": str(SST2_DEV), "text_field": "sentence", "max_length": 32, "max_train_examples": 62,
                  "validation_split": 0.0},
            train={"max_steps": 9, "batch_size": batch_size, "grad_accum": grad_accum, "lr": 5e-4,
                   "group_by_length": False, "precision": "fp32", "logging_steps": 1, "seed": 3},
        ))
        return out

    whole, accumulated = run(8, 1), run(4, 2)
    a = load_file(str(whole / "model" / "model.safetensors"))
    b = load_file(str(accumulated / "model" / "model.safetensors"))
    assert_same_weights(a, b, atol=1e-6)
    initial = load_file(str(train_bert_dir / "model.safetensors"))
    assert largest_change(initial, a) > 1e-4  # it did train
    # the logged loss of each step is the mean over the same 8 examples either way
    la, lb = train_records(whole), train_records(accumulated)
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 10))
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


def _variable_length_corpus(path: Path, count: int = 32) -> Path:
    """jsonl documents of 1 to 7 tinyshakespeare lines: rows of very different token counts."""
    lines = [line for line in SHAKESPEARE.read_text(encoding="utf-8").splitlines()[:400] if line.strip()]
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        start = 0
        for _ in range(count):
            n = rng.choice([1, 1, 2, 4, 7])
            f.write(json.dumps({"text": "\n".join(lines[start:start + n])}) + "\n")
            start += n
    return path


def _lm_config(out: Path, llama_dir: Path, corpus: Path, batch_size: int, grad_accum: int) -> TrainConfig:
    return make_config(
        out,
        model={"source": str(llama_dir)},
        task={"type": "causal_lm"},
        data={"train": str(corpus), "max_length": 64, "packing": False, "validation_split": 0.0},
        # lr small: at Adam's first step the update is lr * g / (|g| + 1e-8), so for an element with |g| near
        # 1e-8 a last-bit difference of summation order moves the update by a fraction of lr (~1e-3 * lr here)
        train={"max_steps": 4, "batch_size": batch_size, "grad_accum": grad_accum, "lr": 2e-4,
               "group_by_length": False, "precision": "fp32", "logging_steps": 1, "seed": 5},
    )


def test_grad_accum_causal_lm_normalises_over_the_tokens_of_the_whole_batch(train_llama_dir, tmp_path):
    corpus = _variable_length_corpus(tmp_path / "docs.jsonl")

    # by hand: the gradient of the first batch of 8 rows, whole and as two micro-batches of 4
    config = _lm_config(tmp_path / "unused", train_llama_dir, corpus, 8, 1)
    data = prepare_data(config, load_any_tokenizer(config.model.source))
    assert not data.train.features[0].get("position_ids")  # unpacked: one document per row
    sampler = RandomBatchSampler(len(data.train.features), 8, seed=config.train.seed)
    sampler.set_epoch(0, 0)
    first = next(iter(sampler))
    rows = [data.train.features[i] for i in first]
    pad = load_any_tokenizer(config.model.source).pad_token_id
    step = CausalLMStep(pad_token_id=pad)
    model, _ = prepare_model(config, [])
    model.train()

    def gradient(micro_batches, normalise) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        counts = [step.num_targets(pad_collate(m, pad_token_id=pad)) for m in micro_batches]
        for m, n in zip(micro_batches, counts):
            loss_sum, targets = step.loss(model, pad_collate(m, pad_token_id=pad))
            assert targets == n
            normalise(loss_sum, n, counts).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = gradient([rows], lambda s, n, counts: s / sum(counts))
    halves = [rows[:4], rows[4:]]
    counts = [step.num_targets(pad_collate(h, pad_token_id=pad)) for h in halves]
    assert counts[0] != counts[1], "the two micro-batches should hold different numbers of tokens"
    over_batch = gradient(halves, lambda s, n, counts: s / sum(counts))  # what the Trainer does
    per_micro_mean = gradient(halves, lambda s, n, counts: (s / n) / len(counts))  # the common mistake
    scale = float(whole.abs().max())
    assert float((over_batch - whole).abs().max()) < 1e-6 * max(1.0, scale)
    assert float((per_micro_mean - whole).abs().max()) > 1e-3 * scale

    # the Trainer: 4 optimizer steps with batch_size 8 and with 4 x 2 end on the same weights
    runs = {}
    for bs, ga in ((8, 1), (4, 2)):
        out = tmp_path / f"lm-bs{bs}x{ga}"
        run_quietly(_lm_config(out, train_llama_dir, corpus, bs, ga))
        runs[bs] = load_file(str(out / "model" / "model.safetensors"))
    assert_same_weights(runs[8], runs[4], atol=1e-6)
    initial = load_file(str(train_llama_dir / "model.safetensors"))
    assert largest_change(initial, runs[8]) > 1e-4
    la, lb = train_records(tmp_path / "lm-bs8x1"), train_records(tmp_path / "lm-bs4x2")
    for ra, rb in zip(la, lb):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# early stopping and the best checkpoint, with scripted validation metrics


class Killed(Exception):
    """Stands for the SIGKILL of a training process."""


class ScriptedTask:
    """A regression task whose evaluations return the scripted values one after the other (the last one
    repeats), with a per-class table as real tasks have, remembering the weights it was shown each time.
    With kill_at=k, the k-th evaluation (from 1) raises Killed instead."""

    def __init__(self, metric: str, values: list[float], greater: bool, kill_at: int | None = None) -> None:
        self.main_metric, self.greater_is_better = metric, greater
        self.values = list(values)
        self.kill_at = kill_at
        self.seen: list[tuple[float, torch.Tensor]] = []

    def num_targets(self, batch: dict) -> int:
        return int(batch["x"].shape[0])

    def loss(self, model, batch):
        return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum(), int(batch["x"].shape[0])

    def evaluate(self, model, features, batch_size, autocast) -> dict:
        if self.kill_at is not None and len(self.seen) + 1 == self.kill_at:
            raise Killed
        value = self.values.pop(0) if len(self.values) > 1 else self.values[0]
        self.seen.append((value, model.weight.detach().clone()))
        return {self.main_metric: value, "per_class": {"a": {"f1": value}}}


def _regression_trainer(tmp_path: Path, task: ScriptedTask, **settings) -> Trainer:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(32, 4, generator=gen)
    features = [{"x": x.tolist(), "y": float(x.sum())} for x in xs]
    sampler = RandomBatchSampler(len(features), 4, seed=0)

    def make_sampler(epoch, start_batch):
        sampler.set_epoch(epoch, start_batch)
        return sampler

    def collate(rows):
        return {"x": torch.tensor([r["x"] for r in rows]), "y": torch.tensor([r["y"] for r in rows])}

    s = TrainSection(batch_size=4, lr=0.05, precision="fp32", logging_steps=1, **settings)
    return Trainer(model, task, Batches(features, make_sampler, collate), features[:8], s, tmp_path, show_progress=False)


@pytest.mark.parametrize("metric,greater,values,best_index", [
    ("loss", False, [1.0, 0.5, 0.7, 0.9], 1),
    ("accuracy", True, [0.5, 0.8, 0.7, 0.6], 1),
])
def test_early_stopping_restores_the_best_evaluation(tmp_path, metric, greater, values, best_index):
    task = ScriptedTask(metric, values, greater)
    trainer = _regression_trainer(tmp_path, task, max_steps=40, eval_steps=2, early_stopping_patience=2,
                                  metric=metric, greater_is_better=greater)
    final = trainer.fit()
    # evaluations at steps 2 (first), 4 (best), 6 and 8 (no improvement: patience 2 runs out)
    assert trainer.state.global_step == 8 < 40
    assert trainer.state.best_step == 4
    assert final[metric] == values[best_index] and final["step"] == 4
    best_weights = task.seen[best_index][1]
    assert torch.equal(trainer.model.weight.detach(), best_weights)  # the best checkpoint's weights are back
    assert not torch.equal(task.seen[-1][1], best_weights)  # (training had moved on from them)
    assert (tmp_path / BEST / "model.safetensors").exists()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(1, 9))
    validation = [(r["step"], r[metric]) for r in records if r["split"] == "validation"]
    assert validation[:4] == [(2, values[0]), (4, values[1]), (6, values[2]), (8, values[3])]


def test_without_patience_training_runs_to_max_steps_and_keeps_the_best(tmp_path):
    task = ScriptedTask("loss", [3.0, 1.0, 2.0, 2.5, 2.6, 2.7], greater=False)
    trainer = _regression_trainer(tmp_path, task, max_steps=10, eval_steps=2, metric="loss")
    final = trainer.fit()
    assert trainer.state.global_step == 10
    assert final == {"loss": 1.0, "per_class": {"a": {"f1": 1.0}}, "step": 4}
    assert torch.equal(trainer.model.weight.detach(), task.seen[1][1])


def test_the_last_evaluation_wins_when_it_is_the_best(tmp_path):
    task = ScriptedTask("loss", [3.0, 2.0, 1.0], greater=False)
    trainer = _regression_trainer(tmp_path, task, max_steps=6, eval_steps=2, metric="loss")
    final = trainer.fit()
    assert final == {"loss": 1.0, "per_class": {"a": {"f1": 1.0}}, "step": 6}
    assert torch.equal(trainer.model.weight.detach(), task.seen[-1][1])


def test_a_resumed_run_ends_with_the_metrics_of_a_best_evaluation_made_before_the_kill(tmp_path):
    settings = dict(max_steps=10, eval_steps=2, save_steps=2, metric="loss")
    first = ScriptedTask("loss", [1.0, 0.5, 0.7], greater=False, kill_at=4)  # killed while evaluating step 8
    with pytest.raises(Killed):
        _regression_trainer(tmp_path, first, **settings).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]

    second = ScriptedTask("loss", [0.9, 0.95], greater=False)  # evaluations at 8 and at the end (10)
    trainer = _regression_trainer(tmp_path, second, **settings)
    assert trainer.resume() and trainer.state.global_step == 6
    final = trainer.fit()
    assert trainer.state.global_step == 10
    # the best evaluation's metrics, every one of them (not only the scalars of metrics.jsonl), and its weights
    assert final == {"loss": 0.5, "per_class": {"a": {"f1": 0.5}}, "step": 4}
    assert torch.equal(trainer.model.weight.detach(), first.seen[1][1])


def test_a_seeded_collate_is_told_the_progress_of_each_step_also_after_a_resume(tmp_path):
    """A masking-rate schedule reads the progress: 0 at the first step, 1 at the last, the same for every
    micro-batch of a step, and the same in a resumed run."""
    seen: list[tuple[int, float]] = []
    xs = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    features = [{"x": x.tolist(), "y": float(x.sum())} for x in xs]
    sampler = RandomBatchSampler(len(features), 2, seed=0)

    def make_sampler(epoch, start_batch):
        sampler.set_epoch(epoch, start_batch)
        return sampler

    def collate(rows, epoch, progress):
        seen.append((epoch, progress))
        return {"x": torch.tensor([r["x"] for r in rows]), "y": torch.tensor([r["y"] for r in rows])}

    def trainer() -> Trainer:
        torch.manual_seed(0)
        s = TrainSection(batch_size=2, grad_accum=2, lr=0.05, precision="fp32", max_steps=5, save_steps=2,
                         eval_steps=0)
        return Trainer(torch.nn.Linear(4, 1), ScriptedTask("loss", [1.0], greater=False),
                       Batches(features, make_sampler, collate, seeded=True), None, s, tmp_path, show_progress=False)

    trainer().fit()
    steps = [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]  # epoch 0: 4 steps of 2 micro-batches
    assert seen == [(0, p) for p in steps] + [(1, 1.0), (1, 1.0)]  # 4 steps of 2 micro-batches per epoch
    shutil.rmtree(tmp_path / "checkpoint-4")
    seen.clear()
    resumed = trainer()
    assert resumed.resume() and resumed.state.global_step == 2
    resumed.fit()
    assert seen == [(0, p) for p in steps[4:]] + [(1, 1.0), (1, 1.0)]


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def test_list_checkpoints_ignores_half_written_and_best_directories(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in (5, 10):
        save_checkpoint(tmp_path / f"checkpoint-{step}", model, optimizer, scheduler, TrainerState(global_step=step))
    save_checkpoint(tmp_path / BEST, model, None, None, TrainerState(global_step=5))
    half = tmp_path / "checkpoint-999.tmp"  # a save killed before its rename
    half.mkdir()
    (half / "trainer_state.json").write_text('{"global_step": 999}')
    incomplete = tmp_path / "checkpoint-998"  # not produced by save_checkpoint, but never trusted either
    incomplete.mkdir()
    (incomplete / "trainer_state.json").write_text('{"global_step": 998}')
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10"]
    assert not (tmp_path / "checkpoint-10.tmp").exists()  # the completed save left no temporary directory
