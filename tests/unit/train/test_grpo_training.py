"""Online GRPO (train/grpo.py) on the tiny random chat Llama of tests/conftest.py (ChatML template): rewards from
verifiers with weights and from a reward model (scored as reward-model training encodes a pair), KL 0 while the
policy is its reference, rollouts reused for num_iterations steps and exact resume, a reward that rises, and clear
config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tunelab
from tunelab.config.loading import validate
from tunelab.config.schema import TrainConfig
from tunelab.data.preference import PreferencePair, encode_preferences
from tunelab.data.prompts import PromptExample
from tunelab.errors import ConfigError
from tunelab.peft import LoraSettings, apply_lora, lora_disabled
from tunelab.train.grpo import GRPOStep, ModelReward, RepeatedGroups, Rewards, VerifierReward
from tunelab.train.preference import RewardModelStep
from tunelab.train.run import train

CHECKS = '''
def e_share(output, example):
    """A reward for a particular letter: the share of the completion's characters that are 'e'."""
    return output.count("e") / max(1, len(output))

def says_answer(output, example):
    return str(example["answer"]) in output

def long_enough(output, example):
    return ("good" if len(output) >= 3 else "bad", "too short")
'''


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, chat_llama) -> Path:
    """A tiny random LlamaForSequenceClassification with one output (a scalar reward) and the same tokenizer."""
    import shutil

    import transformers as tf

    path = tmp_path_factory.mktemp("grpo-rm")
    config = tf.LlamaConfig.from_pretrained(chat_llama)
    config.num_labels = 1
    torch.manual_seed(1)
    model = tf.LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # scores that differ from one text to the next
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (chat_llama / name).exists():
            shutil.copy(chat_llama / name, path / name)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grpo-data")
    (root / "checks.py").write_text(CHECKS)
    records = [{"prompt": f"What is {a} + {b}?", "answer": a + b} for a in range(1, 7) for b in range(1, 7)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"checks": root / "checks.py", "prompts": root / "prompts.jsonl"}


def make_config(output_dir: Path, model: Path, files: dict, *, task: dict | None = None, method: str = "full",
                **train_options) -> TrainConfig:
    task_section = {"type": "grpo", "rewards": [{"verifier": f"{files['checks']}:e_share"}], "num_generations": 4,
                    "max_new_tokens": 6, **(task or {})}
    train_section = {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "warmup": 0,
                     "logging_steps": 1, "save_steps": 0, "seed": 3, "eval_batch_size": 16, **train_options}
    raw = {"output_dir": str(output_dir), "model": {"source": str(model)}, "task": task_section,
           "data": {"train": str(files["prompts"]), "validation_split": 0.25, "max_length": 64},
           "method": {"type": method, "lora": {"r": 4, "alpha": 8, "target_modules": ["all-linear"]}},
           "train": train_section}
    return validate(TrainConfig, raw, "test config")


def history(run_dir: Path, split: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == split]


def quiet(config: TrainConfig, **kw) -> dict:
    return train(config, show_progress=False, log=lambda *a: None, **kw)


def example(prompt: str, **fields) -> PromptExample:
    return PromptExample([{"role": "user", "content": prompt}], prompt, {"prompt": prompt, **fields}, "test.jsonl:1")


# ------------------------------------------------------------------------------------------------ rewards


def test_rewards_are_the_weighted_sum_and_success_needs_every_verdict(files):
    checks = files["checks"]
    rewards = Rewards([VerifierReward(f"{checks}:says_answer", 2.0), VerifierReward(f"{checks}:e_share", -0.5),
                       VerifierReward(f"{checks}:long_enough", 1.0)])
    examples = [example("What is 2 + 3?", answer=5)] * 3
    scores = rewards.score(examples, ["5", "the 5 eee", "four"])
    # "5": 2 * 1 - 0.5 * 0 + 1 * 0 (too short: bad)
    # "the 5 eee": 2 * 1 - 0.5 * 4/9 + 1 * 1;  "four": 2 * 0 - 0.5 * 0 + 1 * 1
    assert scores.total == pytest.approx([2.0, 3.0 - 2 / 9, 1.0])
    assert scores.by_function == {"says_answer": [1.0, 1.0, 0.0], "e_share": pytest.approx([0.0, 4 / 9, 0.0]),
                                  "long_enough": [0.0, 1.0, 1.0]}
    # success: every verdict good, and a bare score counts when above 0 ("5" has no "e": e_share 0 is not)
    assert scores.success == [False, True, False]
    threshold = Rewards(rewards.functions, success_threshold=2.0)
    assert threshold.score(examples, ["5", "the 5 eee", "four"]).success == [True, True, False]


def test_a_failing_verifier_names_the_example(files):
    rewards = Rewards([VerifierReward(f"{files['checks']}:says_answer")])
    with pytest.raises(Exception, match=r"test.jsonl:1: verifier .*says_answer failed on this example: KeyError"):
        rewards.score([example("no answer field")], ["5"])


def test_reward_model_scores_as_reward_model_training_encodes_a_pair(reward_model_dir):
    reward = ModelReward(str(reward_model_dir), batch_size=2)
    examples = [example("What is 2 + 3?"), example("Name a colour."), example("Say hi.")]
    texts = ["It is 5.", "Blue, and also green.", ""]
    scores = reward.scores(examples, texts)
    # the same pairs through the reward-model task's own encoding and step
    model, tokenizer = tunelab.load(reward_model_dir)
    pairs = [PreferencePair(e.messages, t, t, e.source) for e, t in zip(examples, texts)]
    features = encode_preferences(pairs, tokenizer, 512, special_tokens=True).features
    step = RewardModelStep(tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        expected = step.pair_output(model, step.collate(features)).chosen_rewards
    assert len(set(round(s, 4) for s in scores)) == 3  # the texts get different scores
    assert torch.allclose(torch.tensor(scores), expected, atol=1e-5)


def test_a_run_of_another_task_is_not_a_reward_model(tmp_path, chat_llama, files):
    config = make_config(tmp_path / "sft", chat_llama, files, max_steps=1)
    quiet(config)  # a grpo run: its model has no classifier head, and its task is not reward_model
    with pytest.raises(ConfigError, match="this run trained task grpo, not reward_model"):
        ModelReward(str(tmp_path / "sft"))


# ------------------------------------------------------------------------------------------------ the step


def _bound_step(model_dir: Path, files: dict, *, beta: float = 0.04, num_iterations: int = 1):
    from tunelab.data.prompts import encode_prompts, load_prompts

    model, tokenizer = tunelab.load(model_dir)
    apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["all-linear"]))  # B = 0: the policy is the base
    step = GRPOStep(tokenizer, Rewards([VerifierReward(f"{files['checks']}:e_share")]), num_generations=4,
                    max_new_tokens=6, beta=beta, num_iterations=num_iterations,
                    pad_token_id=tokenizer.pad_token_id)
    step.bind(model.train(), seed=0, reference=lambda: lora_disabled(model))
    examples = load_prompts(files["prompts"])
    features = encode_prompts(examples, tokenizer, 48).features
    for f in features:
        f["example"] = examples[f["index"]]
    return model, step, features


def test_kl_is_zero_while_the_policy_is_its_reference(chat_llama, files):
    model, step, features = _bound_step(chat_llama, files)
    batch = step.collate(features[:2])
    assert batch["input_ids"].shape[0] == 8 and batch["advantages"].shape == (8,)
    assert model.training  # sampled in eval mode, put back
    loss, count = step.loss(model, batch)
    metrics = step.pop_train_metrics()
    assert metrics["kl"] == 0.0 and metrics["clip_fraction"] == 0.0
    assert count == int((batch["labels"][:, 1:] != -100).sum()) == step.num_targets(batch)
    # with rho = 1 and KL 0 the loss is -sum A_i |o_i|: per token, the advantage of its completion
    lengths = (batch["labels"][:, 1:] != -100).sum(dim=1).float()
    assert float(loss.detach()) == pytest.approx(float(-(batch["advantages"] * lengths).sum()), abs=1e-5)
    assert set(metrics) >= {"reward", "reward_std", "success_rate", "zero_std_groups", "completion_length",
                            "truncated"}


def test_rollouts_are_reused_for_num_iterations_steps(chat_llama, files):
    model, step, features = _bound_step(chat_llama, files, num_iterations=2)
    first = step.collate(features[:2])
    again = step.collate(features[:2])
    assert step.rounds == 1 and torch.equal(first["input_ids"], again["input_ids"])
    assert "old_logps" in first and not step._buffer  # used twice: dropped
    third = step.collate(features[:2])  # a third time is a new rollout
    assert step.rounds == 2 and "old_logps" in third

    class Base:  # three batches of one, grad_accum 2: the last group is filled with the epoch's first batch
        num_batches = 3

        def batches(self):
            return [[0], [1], [2]]

        def set_epoch(self, epoch, start_batch=0):
            pass

    sampler = RepeatedGroups(Base(), group=2, times=2)
    assert list(sampler) == [[0], [1], [0], [1], [2], [0], [2], [0]] and len(sampler) == 8
    sampler.set_epoch(0, 5)
    assert list(sampler) == [[0], [2], [0]]


def test_multiple_iterations_clip_and_resume_exactly(tmp_path, chat_llama, files):
    task = {"num_iterations": 2, "epsilon": 0.05}
    straight = make_config(tmp_path / "straight", chat_llama, files, task=task, max_steps=6, grad_accum=2,
                           batch_size=2)
    quiet(straight)
    train_log = history(tmp_path / "straight", "train")
    assert len(train_log) == 6
    assert sum(r["clip_fraction"] for r in train_log[1::2]) > 0  # second steps on a rollout: rho moved, clipped
    assert all(r["clip_fraction"] == 0 for r in train_log[0::2])  # first steps: rho = 1
    # stopped after step 3 (mid-way through a rollout's two steps), then resumed: the same run
    stopped = make_config(tmp_path / "resumed", chat_llama, files, task=task, max_steps=3, grad_accum=2,
                          batch_size=2, save_steps=3)
    quiet(stopped)
    resumed = stopped.model_copy(update={"train": stopped.train.model_copy(update={"max_steps": 6})})
    quiet(resumed, resume=True)
    a, _ = tunelab.load(tmp_path / "straight" / "model")
    b, _ = tunelab.load(tmp_path / "resumed" / "model")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert [r["loss"] for r in history(tmp_path / "resumed", "train")] == [r["loss"] for r in train_log]


# ------------------------------------------------------------------------------------------------ training


def test_the_reward_rises(tmp_path, chat_llama, files):
    config = make_config(tmp_path / "run", chat_llama, files, max_steps=24, eval_steps=12, eval_at_start=True,
                         logging_steps=4)
    final = quiet(config)
    log = history(tmp_path / "run", "train")
    validation = history(tmp_path / "run", "validation")
    assert log[-1]["reward"] > 1.5 * log[0]["reward"]  # sampled completions hold more and more 'e's
    assert validation[0]["step"] == 0 and validation[-1]["reward"] > validation[0]["reward"]
    assert set(final) >= {"success_rate", "reward", "completion_length", "truncated", "prompts", "step"}
    assert all(0.0 <= r["kl"] for r in log) and log[-1]["kl"] > 0  # the policy has left its reference
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 12, 24} and {"prompt", "text", "reward", "success"} <= set(samples[0])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Samples at step 24" in report and "reward " in report
    assert (tmp_path / "run" / "plots" / "rollouts.png").exists() and "plots/rollouts.png" in report
    assert (tmp_path / "run" / "plots" / "success_rate.png").exists()
    assert not (tmp_path / "run" / "plots" / "prompts.png").exists()  # a count, not a curve


def test_lora_with_beta_zero_runs_no_reference(tmp_path, chat_llama, files, monkeypatch):
    import tunelab.peft

    calls = []
    monkeypatch.setattr(tunelab.peft, "lora_disabled", lambda model: calls.append(model))
    config = make_config(tmp_path / "run", chat_llama, files, task={"beta": 0.0}, method="lora", max_steps=2)
    quiet(config)
    assert not calls and "kl" not in history(tmp_path / "run", "train")[0]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    from tunelab.evaluate.runner import evaluate_source

    again = evaluate_source(str(tmp_path / "run"))  # the base model and the saved adapter, decoded greedily
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["reward"] == pytest.approx(final["reward"], abs=1e-6) and again["prompts"] == final["prompts"]


# ------------------------------------------------------------------------------------------------ config errors


def test_config_errors_are_clear(tmp_path, chat_llama, files):
    with pytest.raises(ConfigError, match="task grpo needs task.rewards"):
        make_config(tmp_path / "a", chat_llama, files, task={"rewards": []})
    with pytest.raises(ConfigError, match="a reward is either a verifier"):
        make_config(tmp_path / "a", chat_llama, files, task={"rewards": [{"weight": 2.0}]})
    with pytest.raises(ConfigError, match="task.num_generations applies to task grpo, not chat"):
        validate(TrainConfig, {"output_dir": "x", "model": {"source": "m"}, "data": {"train": "t.jsonl"},
                               "task": {"type": "chat", "num_generations": 4}}, "c")
    with pytest.raises(ConfigError, match="task.success_threshold"):
        make_config(tmp_path / "a", chat_llama, files, task={"rewards": [{"reward_model": "runs/rm"}]})
    with pytest.raises(ConfigError, match="data.format 'conll' holds no prompts"):
        validate(TrainConfig, {"output_dir": "x", "model": {"source": "m"}, "data": {"train": "t", "format": "conll"},
                               "task": {"type": "grpo", "rewards": [{"verifier": "a:b"}]}}, "c")
    unknown = make_config(tmp_path / "b", chat_llama, files,
                          task={"rewards": [{"verifier": "tunelab.evaluate.verifiers:final_numbr"}]})
    with pytest.raises(ConfigError, match=r"task.rewards\[0\].verifier: verifier 'tunelab.evaluate.verifiers:"
                                          r"final_numbr': tunelab.evaluate.verifiers has no function 'final_numbr'"):
        quiet(unknown)
    missing = make_config(tmp_path / "c", chat_llama, files, task={"rewards": [{"verifier": "nowhere.mod:f"}]})
    with pytest.raises(ConfigError, match=r"task.rewards\[0\].verifier: .*cannot import 'nowhere.mod'"):
        quiet(missing)
