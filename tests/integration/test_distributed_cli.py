"""`torchrun -m tunelab train` with 2 CPU processes (gloo), against one process with the same global batch.

train.batch_size is the global batch: each process trains on half of its rows, each objective is divided by
the targets of the whole global accumulation group, so the loss at every step equals one process's (fp32,
within 1e-5). Checkpoints hold full tensors: a 2-process run resumes in 1 process, an FSDP2 run's sharded
state is gathered into a checkpoint and sharded again when a 2-process FSDP2 run resumes from it. A recurrent
LM's carried state (one row per stream, each process its own streams) is saved whole, so its checkpoints
resume with 1 or 2 processes. Under FSDP2, QLoRA keeps its NF4 base whole on each process and matches one
process; decoding (GRPO, train.sample_prompts) runs with the full parameters gathered, where processes decode
different numbers of tokens without waiting on each other.
Each process computes on one thread with a tiny model. (The config errors are unit tests:
tests/unit/train/test_distributed.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tunelab.cli.main import main

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
ALPACA = DATA / "alpaca_demo" / "alpaca_en_demo.json"
HH = DATA / "hh_rlhf" / "harmless-base-pairs.jsonl"
SRC = Path(__file__).resolve().parents[2] / "src"
TOLERANCE = 1e-5


def chat_config(model_dir: Path, out: Path, **train) -> dict:
    # 21 rows in global batches of 4: the last batch of each epoch has one row, so one process gets none
    return {
        "output_dir": str(out),
        "model": {"source": str(model_dir)},
        "task": {"type": "chat"},
        "data": {"train": str(ALPACA), "max_length": 96, "max_train_examples": 21, "max_validation_examples": 6},
        "train": {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "precision": "fp32",
                  "logging_steps": 1, "save_steps": 0, "num_threads": 1, "warmup": 0, **train},
    }


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def one_process(*argv: str) -> None:
    assert main([*argv, "--no-progress"]) == 0


def torchrun(*argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return launch(["-m", "tunelab", *argv, "--no-progress"], nproc)


def launch(target: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """torchrun `target` (-m module ... or a script) on `nproc` CPU processes; asserts that every one succeeded."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def train_losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "train"}


def max_loss_difference(a: Path, b: Path) -> float:
    for run in (a, b):  # one line per step: a resumed run logged the steps after its checkpoint once
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if '"train"' in line]
        assert steps == sorted(set(steps)), steps
    la, lb = train_losses(a), train_losses(b)
    assert la.keys() == lb.keys() and la, (la, lb)
    return max(abs(la[step] - lb[step]) for step in la)


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def run_alone(tmp_path_factory, name: str, make_config) -> Path:
    """A run that 2-process runs are compared with: one process, the same global batch; make_config(out)."""
    directory = tmp_path_factory.mktemp(name)
    torch.set_num_threads(1)
    one_process("train", str(write(directory / "one.yaml", make_config(directory / "one"))))
    return directory / "one"


@pytest.fixture(scope="module")
def one_process_run(chat_llama, tmp_path_factory) -> Path:
    return run_alone(tmp_path_factory, "one-process", lambda out: chat_config(chat_llama, out))


def test_ddp_matches_one_process_and_writes_once(chat_llama, one_process_run, tmp_path):
    two = write(tmp_path / "two.yaml", chat_config(chat_llama, tmp_path / "two", distributed="ddp"))
    done = torchrun("train", str(two))
    assert "distributed: ddp over 2 processes" in done.stdout + done.stderr
    difference = max_loss_difference(one_process_run, tmp_path / "two")
    print(f"\nDDP, 2 processes against 1: max train loss difference {difference:.2e}")
    assert difference < TOLERANCE
    assert max_weight_difference(one_process_run / "model" / "model.safetensors",
                                 tmp_path / "two" / "model" / "model.safetensors") < 1e-4
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"train"' in line]) == 6  # rank 0 alone logs
    assert json.loads((tmp_path / "two" / "env.json").read_text())["world_size"] == 2


def test_lora_ddp_run_resumes_in_one_process(chat_llama, tmp_path, capsys):
    config = chat_config(chat_llama, tmp_path / "two", save_steps=3, distributed="ddp")
    config["method"] = {"type": "lora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
    torchrun("train", str(write(tmp_path / "two.yaml", config)))
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    for name in ("adapter", "metrics.json", "report.md", "plots"):
        shutil.rmtree(resumed / name, ignore_errors=True) if (resumed / name).is_dir() else (resumed / name).unlink(missing_ok=True)
    (resumed / "config.yaml").write_text((resumed / "config.yaml").read_text().replace(str(tmp_path / "two"), str(resumed)))
    assert [p.name for p in resumed.glob("checkpoint-*")] == ["checkpoint-3"]
    one_process("train", "--resume", str(resumed))
    assert "resumed from step 3" in capsys.readouterr().out
    difference = max_loss_difference(tmp_path / "two", resumed)
    print(f"\nLoRA DDP, 2 processes, resumed at step 3 in 1: max train loss difference {difference:.2e}")
    assert difference < TOLERANCE
    assert max_weight_difference(tmp_path / "two" / "adapter" / "adapter_model.safetensors",
                                 resumed / "adapter" / "adapter_model.safetensors") < 1e-4


def qlora_config(model_dir: Path, out: Path, **train) -> dict:
    config = chat_config(model_dir, out, **train)
    config["method"] = {"type": "qlora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
    return config


@pytest.fixture(scope="module")
def qlora_one_process_run(chat_llama, tmp_path_factory) -> Path:
    return run_alone(tmp_path_factory, "qlora-one-process", lambda out: qlora_config(chat_llama, out))


def test_qlora_ddp_matches_one_process(chat_llama, qlora_one_process_run, tmp_path):
    """QLoRA (an NF4 base, LoRA adapters in fp32) under DDP: the same losses as one process."""
    torchrun("train", str(write(tmp_path / "two.yaml", qlora_config(chat_llama, tmp_path / "two", distributed="ddp"))))
    difference = max_loss_difference(qlora_one_process_run, tmp_path / "two")
    print(f"\nQLoRA DDP, 2 processes against 1: max train loss difference {difference:.2e}")
    assert difference < TOLERANCE


def test_qlora_fsdp_matches_one_process_and_its_adapter_checkpoint_resumes_in_one(chat_llama, qlora_one_process_run,
                                                                                  tmp_path, capsys):
    """QLoRA under FSDP2: the NF4 base weights stay whole on each process (ignored_params), the adapters are
    sharded; the same losses as one process, and a checkpoint of full adapter tensors that one process resumes."""
    config = qlora_config(chat_llama, tmp_path / "fsdp", save_steps=3, distributed="fsdp")
    done = torchrun("train", str(write(tmp_path / "fsdp.yaml", config)))
    assert "distributed: fsdp over 2 processes" in done.stdout + done.stderr
    two = max_loss_difference(qlora_one_process_run, tmp_path / "fsdp")
    assert two < TOLERANCE
    weights = load_file(str(tmp_path / "fsdp" / "checkpoint-3" / "model.safetensors"))
    assert weights and all("lora_" in name for name in weights)  # the trained adapters only, no NF4 base
    assert weights["backbone.layers.0.attn.q_proj.lora_a.weight"].shape == (4, 48)  # whole, not a shard
    final = tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"
    assert max_weight_difference(qlora_one_process_run / "adapter" / "adapter_model.safetensors", final) < 1e-4
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed, ignore=shutil.ignore_patterns("adapter", "metrics.json", "report.md",
                                                                             "plots"))
    (resumed / "config.yaml").write_text((resumed / "config.yaml").read_text().replace(str(tmp_path / "fsdp"), str(resumed)))
    one_process("train", "--resume", str(resumed))
    assert "resumed from step 3" in capsys.readouterr().out
    resumed_in_one = max_loss_difference(tmp_path / "fsdp", resumed)
    print(f"\nQLoRA FSDP2, 2 processes against 1: max train loss difference {two:.2e}; "
          f"resumed at step 3 by 1 process: {resumed_in_one:.2e}")
    assert resumed_in_one < TOLERANCE
    assert max_weight_difference(final, resumed / "adapter" / "adapter_model.safetensors") < 1e-4


def test_fsdp_matches_one_process_and_its_sharded_state_reloads(chat_llama, one_process_run, tmp_path):
    fsdp = write(tmp_path / "fsdp.yaml", chat_config(chat_llama, tmp_path / "fsdp", save_steps=3, distributed="fsdp"))
    torchrun("train", str(fsdp))
    difference = max_loss_difference(one_process_run, tmp_path / "fsdp")
    print(f"\nFSDP2, 2 processes against 1: max train loss difference {difference:.2e}")
    assert difference < TOLERANCE
    # the checkpoint holds full tensors with names of the plain model, and the optimizer state by name
    checkpoint = tmp_path / "fsdp" / "checkpoint-3"
    weights = load_file(str(checkpoint / "model.safetensors"))
    final = load_file(str(one_process_run / "model" / "model.safetensors"))
    assert all(weights[k].shape == final[k].shape for k in weights if k in final)
    optimizer = torch.load(checkpoint / "training.pt", weights_only=False)["optimizer"]
    assert all(isinstance(key, str) for key in optimizer["state"])
    # resumed by 2 FSDP2 processes: every process keeps its shard of the gathered state again
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed, ignore=shutil.ignore_patterns("model", "metrics.json"))
    (resumed / "config.yaml").write_text((resumed / "config.yaml").read_text().replace(str(tmp_path / "fsdp"), str(resumed)))
    done = torchrun("train", "--resume", str(resumed))
    assert "resumed from step 3" in done.stdout
    difference = max_loss_difference(tmp_path / "fsdp", resumed)
    print(f"FSDP2 resumed at step 3 by 2 processes: max train loss difference {difference:.2e}")
    assert difference < TOLERANCE
    assert max_weight_difference(tmp_path / "fsdp" / "model" / "model.safetensors",
                                 resumed / "model" / "model.safetensors") < 1e-5


def test_text_samples_under_fsdp_are_one_process_samples(chat_llama, tmp_path):
    """train.sample_prompts under FSDP2: at each evaluation every process gathers the full parameters and rank 0
    generates alone; the samples are one process's, and training goes on with one process's losses. Without
    validation rows the samples are generated once at the end."""
    samples = {"sample_prompts": ["ROMEO:", "Hello"], "sample_max_new_tokens": 12, "eval_steps": 3}
    one_process("train", str(write(tmp_path / "one.yaml", chat_config(chat_llama, tmp_path / "one", **samples))))
    fsdp = chat_config(chat_llama, tmp_path / "fsdp", distributed="fsdp", **samples)
    torchrun("train", str(write(tmp_path / "fsdp.yaml", fsdp)))
    difference = max_loss_difference(tmp_path / "one", tmp_path / "fsdp")
    validation = max(abs(a - b) for a, b in zip(validation_losses(tmp_path / "one"), validation_losses(tmp_path / "fsdp")))
    print(f"\nFSDP2 with text samples, 2 processes against 1: max train loss difference {difference:.2e}, "
          f"validation {validation:.2e}")
    assert difference < TOLERANCE and validation < TOLERANCE
    texts = {name: [(r["step"], r["prompt"], r["text"]) for r in map(json.loads, (tmp_path / name / "samples.jsonl")
                                                                      .read_text().splitlines())]
             for name in ("one", "fsdp")}
    assert [(step, prompt) for step, prompt, _ in texts["fsdp"]] == [(3, "ROMEO:"), (3, "Hello"), (6, "ROMEO:"),
                                                                     (6, "Hello")]
    assert texts["fsdp"] == texts["one"]
    no_validation = chat_config(chat_llama, tmp_path / "at-end", distributed="fsdp", max_steps=2, **samples)
    no_validation["data"]["validation_split"] = 0.0
    torchrun("train", str(write(tmp_path / "at-end.yaml", no_validation)))
    assert [r["step"] for r in map(json.loads, (tmp_path / "at-end" / "samples.jsonl").read_text().splitlines())] == [2, 2]


def test_dpo_with_lora_matches_one_process(chat_llama, tmp_path, capsys):
    """Preference pairs: rank 0 computes the reference log-probabilities once, the other process reads them."""
    records = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()]
    short = [r for r in records if max(len(r["chosen"]), len(r["rejected"])) < 260][:20]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in short), encoding="utf-8")

    def config(out: Path, **train) -> dict:
        return {"output_dir": str(out), "model": {"source": str(chat_llama)}, "task": {"type": "preference"},
                "data": {"train": str(pairs), "max_length": 160, "validation_split": 0.2},
                "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["all-linear"]}},
                "train": {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "precision": "fp32", "warmup": 0,
                          "logging_steps": 1, "save_steps": 0, "seed": 7, "num_threads": 1, **train}}

    one_process("train", str(write(tmp_path / "one.yaml", config(tmp_path / "one"))))
    torchrun("train", str(write(tmp_path / "two.yaml", config(tmp_path / "two", distributed="ddp"))))
    assert (tmp_path / "two" / "reference_logps.safetensors").exists()
    difference = max_loss_difference(tmp_path / "one", tmp_path / "two")
    print(f"\nDPO with LoRA, DDP, 2 processes against 1: max train loss difference {difference:.2e}")
    assert difference < TOLERANCE


# ---------------------------------------------------------------------------------------------- decoding under FSDP2

FULL_PARAMETERS = '''"""2 FSDP2 processes decode different numbers of tokens inside full_parameters; then train on."""
import datetime

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tunelab.generate.decode import GenerationSettings
from tunelab.models.llama import LlamaConfig
from tunelab.models.registry import build_model
from tunelab.train.distributed import DistributedContext, full_parameters, wrap_model
from tunelab.train.grpo import sample_completions

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a mismatched collective fails, not hangs
rank = dist.get_rank()
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32)
plain = build_model(config, heads=("lm",))
model = build_model(config, heads=("lm",))
model.load_state_dict(plain.state_dict())
wrap_model(model, DistributedContext("fsdp", rank, rank, 2, torch.device("cpu")))
whole = dict(plain.named_parameters())
shards = {name: param.to_local().clone() for name, param in model.named_parameters()}
block, root = model.backbone.layers[0].attn.q_proj.weight, model.backbone.tok_embeddings.weight


def decode(tokens: int, prompts=((1, 2, 3), (4, 5))):
    """`tokens` new tokens of each prompt (no end token): as many forward passes."""
    settings = GenerationSettings(max_new_tokens=tokens, temperature=1.0, seed=rank)
    completions, _ = sample_completions(model.eval(), [list(p) for p in prompts], settings, set())
    expected, _ = sample_completions(plain.eval(), [list(p) for p in prompts], settings, set())
    assert completions == expected and all(len(c) == tokens for c in completions)


def train_step():
    """The sharded model's loss and gradients equal the plain model's (both processes see the same batch)."""
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    loss = model.train()(ids, torch.ones_like(ids), heads=("lm",)).logits["lm"].square().mean()
    # after forward, as wrap_model set FSDP2 up: a block's parameters are sharded again, the root's kept whole
    assert isinstance(model.backbone.layers[0].attn.q_proj.weight, DTensor)
    assert not isinstance(model.backbone.tok_embeddings.weight, DTensor)
    loss.backward()
    expected = plain.train()(ids, torch.ones_like(ids), heads=("lm",)).logits["lm"].square().mean()
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad.full_tensor(), whole[name].grad, rtol=1e-5, atol=1e-7), name
        param.grad, whole[name].grad = None, None


for round in range(2):  # before the first forward pass (GRPO's first rollout), and after training
    with full_parameters(model):
        for name, param in model.named_parameters():  # whole tensors, equal to the plain model's
            assert not isinstance(param, DTensor) and torch.equal(param, whole[name]), name
        decode(3 + 6 * rank)  # rank 0: 3 forward passes, rank 1: 9
        if rank == 0:  # rank 0 alone decodes (train.sample_prompts, GRPO's evaluation)
            decode(5, prompts=[(7,)])
    for name, param in model.named_parameters():  # back to the same shards
        assert isinstance(param, DTensor) and torch.equal(param.to_local(), shards[name]), name
    train_step()
dist.barrier()
print(f"rank {rank}: decoded and trained")
'''


def test_full_parameters_lets_each_process_decode_its_own_number_of_tokens(tmp_path):
    """Inside train.distributed.full_parameters an FSDP2 model's forward passes make no collectives: the 2
    processes decode 3 and 9 tokens (and rank 0 more on its own) with the plain model's results, and no
    process waits on another. Leaving it restores the shards and FSDP2's resharding after forward; training
    goes on with the plain model's loss and gradients."""
    script = tmp_path / "full_parameters.py"
    script.write_text(FULL_PARAMETERS)
    done = launch([str(script)])
    assert "rank 0: decoded and trained" in done.stdout and "rank 1: decoded and trained" in done.stdout


# ---------------------------------------------------------------------------------------------- GRPO


@pytest.fixture(scope="module")
def grpo_data(tmp_path_factory) -> Path:
    """16 training and 4 validation sums, and a verifier rewarding the share of e's in a completion."""
    from tunelab.data.arithmetic import arithmetic_problems

    directory = tmp_path_factory.mktemp("grpo-data")
    train = arithmetic_problems(16, seed=0, kinds=["1+1"])
    validation = arithmetic_problems(4, seed=1, kinds=["1+1"], exclude={r["problem"] for r in train})
    for name, records in (("train", train), ("validation", validation)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "checks.py").write_text("def e_share(output, example):\n"
                                         "    return output.count('e') / max(1, len(output))\n")
    return directory


def grpo_config(model_dir: Path, data: Path, out: Path, **train) -> dict:
    """4 prompts a step (2 per process) with 4 sampled completions each, up to 6 tokens."""
    return {"output_dir": str(out), "model": {"source": str(model_dir)},
            "task": {"type": "grpo", "rewards": [{"verifier": f"{data / 'checks.py'}:e_share"}],
                     "num_generations": 4, "max_new_tokens": 6, "temperature": 1.0, "beta": 0.04},
            "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"),
                     "max_length": 64},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "eval_steps": 2,
                      "logging_steps": 1, "warmup": 0, "save_steps": 2, "num_threads": 1, **train}}


def check_grpo_run(run: Path) -> list[dict]:
    """The records of a finished 4-step GRPO run, checked: evaluation, samples.jsonl and the model from rank 0."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert all("reward" in r and "kl" in r for r in records if r["split"] == "train")
    assert [r["step"] for r in records if r["split"] == "validation"] == [2, 4]
    assert (run / "model" / "model.safetensors").exists() and (run / "samples.jsonl").exists()
    assert (run / "checkpoint-2" / "training.pt").exists()
    return records


@pytest.fixture(scope="module")
def grpo_ddp_run(chat_llama, grpo_data, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("grpo-ddp")
    config = grpo_config(chat_llama, grpo_data, directory / "run", distributed="ddp")
    torchrun("train", str(write(directory / "grpo.yaml", config)))
    return directory / "run"


def test_grpo_trains_with_ddp(grpo_ddp_run):
    """Online GRPO: each process samples the completions of its share of the prompts (no equality with one
    process: the samples differ); evaluation, samples.jsonl and the model come from rank 0."""
    check_grpo_run(grpo_ddp_run)


def test_grpo_trains_with_fsdp_as_with_ddp_and_resumes(chat_llama, grpo_data, grpo_ddp_run, tmp_path):
    """GRPO under FSDP2: each process samples its completions with the full parameters gathered, and rank 0
    decodes the validation prompts alone (a collective forward pass there would hang). Both processes sample
    the same rows with the same seeds and (up to rounding) weights as under DDP: the same rewards and losses.
    Its checkpoint at step 2, resumed by 2 FSDP2 processes, gives the same steps 3 and 4."""
    config = grpo_config(chat_llama, grpo_data, tmp_path / "fsdp", distributed="fsdp")
    done = torchrun("train", str(write(tmp_path / "fsdp.yaml", config)))
    assert "distributed: fsdp over 2 processes" in done.stdout + done.stderr
    run = tmp_path / "fsdp"
    records = check_grpo_run(run)
    ddp = [json.loads(line) for line in (grpo_ddp_run / "metrics.jsonl").read_text().splitlines()]
    rewards = {r["step"]: r["reward"] for r in records if r["split"] == "train"}
    assert rewards == {r["step"]: r["reward"] for r in ddp if r["split"] == "train"}
    difference = max_loss_difference(grpo_ddp_run, run)
    assert difference < TOLERANCE
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("model", "metrics.json", "report.md", "plots"))
    (resumed / "config.yaml").write_text((resumed / "config.yaml").read_text().replace(str(run), str(resumed)))
    assert "resumed from step 2" in torchrun("train", "--resume", str(resumed)).stdout
    check_grpo_run(resumed)
    resumed_difference = max_loss_difference(run, resumed)
    print(f"\nGRPO, FSDP2 against DDP (2 processes each): max train loss difference {difference:.2e}; "
          f"FSDP2 resumed at step 2: {resumed_difference:.2e}")
    assert resumed_difference < TOLERANCE


# ---------------------------------------------------------------------------------------------- recurrent LM


def lstm_config(text: Path, out: Path, **train) -> dict:
    """A tiny LSTM LM from scratch with a char tokenizer trained by the run: 4 streams (the global batch) of 12
    chunks of 10 characters, so 14 steps cross an epoch boundary (the state restarts from zeros). Weight and
    embedding dropout draw the same masks in any number of processes; the dropouts drawn per row (input,
    hidden, output) would not, so they are off. AdamW takes its multi-tensor path: with the fused kernel's
    rounding the two runs drift apart by 1.2e-5 at lr 1e-2 (train.fused_optimizer)."""
    return {
        "output_dir": str(out),
        "model": {"architecture": {"family": "rnn", "cell": "lstm", "hidden_size": 24, "embedding_size": 16,
                                   "num_layers": 2, "weight_dropout": 0.3, "embedding_dropout": 0.1},
                  "train_tokenizer": {"type": "char"}},
        "task": {"type": "recurrent_lm"},
        "data": {"train": str(text), "validation_split": 0.2, "bptt": 10},
        "train": {"max_steps": 14, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "warmup": 0, "logging_steps": 1,
                  "eval_steps": 7, "save_steps": 9, "eval_batch_size": 3, "num_threads": 1, "fused_optimizer": False,
                  **train},
    }


def carried_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / "training.pt", weights_only=False)["task"]["state"]


def validation_losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "validation"]


def resumable_copy(run: Path, to: Path) -> Path:
    """`run` as it was when killed just after its checkpoint-9 (the resume trims the later metric lines)."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("model", "metrics.json", "report.md", "plots"))
    (to / "config.yaml").write_text((to / "config.yaml").read_text().replace(str(run), str(to)))
    assert [p.name for p in to.glob("checkpoint-[0-9]*")] == ["checkpoint-9"]
    return to


@pytest.fixture(scope="module")
def lstm_runs(tmp_path_factory) -> dict[str, Path]:
    """The text, and the 1-process and 2-process (ddp) runs of the same config."""
    directory = tmp_path_factory.mktemp("lstm")
    text = directory / "text.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:600], encoding="utf-8")
    torch.set_num_threads(1)
    one_process("train", str(write(directory / "one.yaml", lstm_config(text, directory / "one"))))
    ddp = lstm_config(text, directory / "ddp", distributed="ddp")
    done = torchrun("train", str(write(directory / "ddp.yaml", ddp)))
    assert "distributed: ddp over 2 processes" in done.stdout + done.stderr
    return {"text": text, "one": directory / "one", "ddp": directory / "ddp"}


def test_recurrent_lm_ddp_matches_one_process(lstm_runs):
    one, two = lstm_runs["one"], lstm_runs["ddp"]
    difference = max_loss_difference(one, two)
    print(f"\nrecurrent LM (LSTM), DDP, 2 processes against 1: max train loss difference {difference:.2e}")
    assert difference < TOLERANCE
    assert len(train_losses(two)) == 14 and len(validation_losses(two)) == 2  # steps 7 and 14, rank 0 alone
    assert max(abs(a - b) for a, b in zip(validation_losses(one), validation_losses(two))) < TOLERANCE
    # the checkpoint holds the state of all 4 streams, each [1, 4, 24], as one process has it
    state, expected = carried_state(two / "checkpoint-9"), carried_state(one / "checkpoint-9")
    assert state.keys() == expected.keys() and len(state) == 4  # (h, c) of 2 layers
    assert all(state[k].shape == (1, 4, 24) for k in state)
    assert max(float((state[k] - expected[k]).abs().max()) for k in state) < TOLERANCE


def test_recurrent_lm_fsdp_matches_one_process(lstm_runs, tmp_path):
    """FSDP2 shards the recurrent model as one unit (its weight dropout swaps W_hh in a functional call)."""
    config = lstm_config(lstm_runs["text"], tmp_path / "fsdp", distributed="fsdp")
    torchrun("train", str(write(tmp_path / "fsdp.yaml", config)))
    difference = max_loss_difference(lstm_runs["one"], tmp_path / "fsdp")
    print(f"\nrecurrent LM (LSTM), FSDP2, 2 processes against 1: max train loss difference {difference:.2e}")
    assert difference < TOLERANCE
    assert carried_state(tmp_path / "fsdp" / "checkpoint-9")["layer.0.0"].shape == (1, 4, 24)


def test_recurrent_lm_checkpoints_resume_with_another_number_of_processes(lstm_runs, tmp_path, capsys):
    """Checkpoint 9 is mid-epoch (12 chunks an epoch), where the carried state matters: a 2-process checkpoint
    resumed by 1 process, and a 1-process one by 2, give the losses of the uninterrupted 1-process run."""
    by_one = resumable_copy(lstm_runs["ddp"], tmp_path / "by-one")
    one_process("train", "--resume", str(by_one))
    assert "resumed from step 9" in capsys.readouterr().out
    by_two = resumable_copy(lstm_runs["one"], tmp_path / "by-two")
    assert "resumed from step 9" in torchrun("train", "--resume", str(by_two)).stdout
    for name, run in (("2 processes resumed by 1", by_one), ("1 process resumed by 2", by_two)):
        difference = max_loss_difference(lstm_runs["one"], run)
        print(f"\nrecurrent LM, {name} at step 9: max train loss difference {difference:.2e}")
        assert difference < TOLERANCE
        assert max_weight_difference(lstm_runs["one"] / "model" / "model.safetensors",
                                     run / "model" / "model.safetensors") < 1e-4
