"""Online GRPO: learn from reward functions (verifiers, reward models) on completions the model samples itself.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, sec. 4.1). A training batch of B prompts
becomes, at collation time, B x G rows: each prompt with G completions sampled from the current policy (model
in eval mode, batched, with the KV cache; seeded per batch so that a resumed run samples the same). Every
completion is scored by the reward functions (the weighted sum of `task.rewards`), the rewards are normalised
within each group into advantages, and the loss (losses/grpo.py) raises the log-probability of the completions
better than their group's mean and lowers the others', with a per-token KL penalty (weight beta) against the
reference policy: the same model with its LoRA adapters switched off, a `task.reference` model, or (full
fine-tuning) a frozen copy of the model before training. With beta 0 no reference is run.

Under torchrun each process samples the completions of its own share of the prompts. Its decoding loop runs a
forward pass per new token until its own completions end, so the processes run different numbers of forward
passes: under FSDP2 they sample with the full parameters gathered (train/distributed.full_parameters), where a
forward pass makes no collectives.

With task.num_iterations mu > 1 every sampled batch is trained on mu times (the sampler repeats each optimizer
step's batches mu times in a row, and the step keeps their rollouts), and the ratio to the policy that sampled
them is clipped (PPO). With mu = 1 that ratio is 1 and the loss is the advantage-weighted log-probability.

Rewards: a verifier `module:function` is called as function(completion text, example) with the prompt's whole
record (tunelab.evaluate.verifiers); its reward is the Judgement's (the score, or 1 good / 0 bad). A reward model
(a task reward_model run) scores (prompt, completion) encoded exactly as it was trained (data/preference.py):
the prompt rendered with its chat template, the completion and the end-of-turn marker after it, the scalar head
on the last token. A completion succeeds when every verifier says good (a bare score: above 0), or, with
task.success_threshold, when its reward reaches it.

Logged while training (means over the logging window): reward, reward_std (within groups), success_rate,
zero_std_groups (share of groups whose rewards are all equal: no signal), completion_length, truncated (share
that hit max_new_tokens), kl, clip_fraction, and with several functions reward_<name>. Evaluation decodes the
validation prompts greedily: success_rate (the main metric), reward, completion_length, truncated.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from tunelab.data.encoded import IGNORE_INDEX
from tunelab.data.prompts import PromptExample
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.losses import group_advantages, grpo_token_losses, reduce_token_losses, token_logps
from tunelab.train.distributed import full_parameters
from tunelab.train.samples import SampleLog
from tunelab.train.tasks import MetricWindow

Autocast = Callable[[], Any]


# ---------------------------------------------------------------------------------------------- rewards


@dataclass
class RewardScores:
    """Rewards of N completions: the weighted sum, each function's own, and whether each succeeded."""

    total: list[float]
    by_function: dict[str, list[float]]
    success: list[bool]


class VerifierReward:
    """A verifier function (module:function) as a reward: Judgement.reward of each completion."""

    def __init__(self, spec: str, weight: float = 1.0, name: str | None = None) -> None:
        from tunelab.evaluate.verifiers import load_verifier

        self.spec, self.weight = spec, weight
        self.function = load_verifier(spec)
        self.name = name or spec.rpartition(":")[2]

    def judge(self, examples: Sequence[PromptExample], texts: Sequence[str]) -> list:
        """The Judgement of each completion; an exception in the verifier names the example's file and line."""
        from tunelab.evaluate.verifiers import judge

        judgements = []
        for example, text in zip(examples, texts):
            try:
                judgements.append(judge(self.function, text, example.fields, name=self.spec))
            except Exception as error:  # a verifier is user code: say where it failed
                raise DataError(f"{example.source}: verifier {self.spec} failed on this example: "
                                f"{type(error).__name__}: {error}") from error
        return judgements


class ModelReward:
    """A Bradley-Terry reward model (task reward_model) as a reward: its score of each (prompt, completion)."""

    def __init__(self, source: str, weight: float = 1.0, name: str | None = None, *, batch_size: int = 16,
                 device: torch.device | None = None) -> None:
        self.source, self.weight, self.name, self.batch_size = source, weight, name or "reward_model", batch_size
        self.model, self.tokenizer, self.max_length = load_reward_model(source)
        if device is not None:
            self.model.to(device)

    @torch.no_grad()
    def scores(self, examples: Sequence[PromptExample], texts: Sequence[str]) -> list[float]:
        """The reward model's score of each completion after its prompt, encoded as reward-model training
        encodes a (prompt, answer) (encode_preferences with special_tokens, data/preference.py)."""
        from tunelab.data.preference import _wrapping, fit_lengths, render_prompt_and_answers
        from tunelab.train.preference import _rows

        tokenizer, head = self.tokenizer, "classifier"
        wrap = _wrapping(tokenizer)
        limit = self.max_length - len(wrap[0]) - len(wrap[1])
        prompts, answers = [], []
        for example, text in zip(examples, texts):
            prompt_text, (answer_text,) = render_prompt_and_answers(tokenizer, example.messages, [text],
                                                                   example.source)
            prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
            answer_ids = tokenizer.encode(answer_text, add_special_tokens=False) if answer_text else []
            keep_prompt, keep_answer = fit_lengths(len(prompt_ids), [len(answer_ids)], limit, limit // 2)
            prompts.append(wrap[0] + prompt_ids[len(prompt_ids) - keep_prompt:])
            answers.append(answer_ids[:keep_answer] + wrap[1])
        self.model.eval()
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            rows = _rows(prompts[start:start + self.batch_size], answers[start:start + self.batch_size],
                         _pad_id(tokenizer), labels=False)
            logits = self.model(rows["input_ids"].to(device), rows["attention_mask"].to(device),
                                heads=(head,)).logits[head]  # [b, 1]
            out += logits[:, 0].float().tolist()
        return out


def load_reward_model(source: str):
    """(model, tokenizer, max_length) of a reward model: a task reward_model run directory, or any model source
    whose classifier head has one output."""
    from tunelab.train.run import is_run_dir, load_any, load_run

    max_length = 512
    if is_run_dir(source):
        model, tokenizer, config = load_run(source)
        if config.task.type != "reward_model":
            raise ConfigError(f"reward model {source}: this run trained task {config.task.type}, not reward_model")
        max_length = config.data.max_length
    else:
        model, tokenizer = load_any(source)
    head = model.heads["classifier"] if "classifier" in model.heads else None
    if head is None or head.out.out_features != 1:
        raise ConfigError(f"reward model {source}: it needs a classifier head with one output (a scalar score), "
                          f"as a task reward_model run has")
    model.requires_grad_(False)
    return model.eval(), tokenizer, max_length


class Rewards:
    """The reward functions of task.rewards: score completions, and tell which succeeded."""

    def __init__(self, functions: Sequence[VerifierReward | ModelReward], *,
                 success_threshold: float | None = None) -> None:
        if not functions:
            raise ConfigError("GRPO needs at least one reward function (task.rewards)")
        self.functions = list(functions)
        self.success_threshold = success_threshold
        if success_threshold is None and not any(isinstance(f, VerifierReward) for f in self.functions):
            raise ConfigError("task.success_threshold is needed when every reward is a reward model")
        seen: dict[str, int] = {}
        for function in self.functions:  # unique names for the logged reward_<name>
            seen[function.name] = seen.get(function.name, 0) + 1
            if seen[function.name] > 1:
                function.name = f"{function.name}_{seen[function.name]}"

    @classmethod
    def from_task(cls, task, *, verifiers_only: bool = False) -> "Rewards | None":
        """The reward functions of a config's task section; a bad verifier name is an error naming its key.
        verifiers_only: only load (check) the verifiers, before a run loads its model; returns None."""
        functions: list[VerifierReward | ModelReward] = []
        for i, spec in enumerate(task.rewards):
            try:
                if spec.verifier is not None:
                    functions.append(VerifierReward(spec.verifier, spec.weight))
                elif not verifiers_only:
                    functions.append(ModelReward(spec.reward_model, spec.weight))
            except TunelabError as error:
                key = "verifier" if spec.verifier is not None else "reward_model"
                raise ConfigError(f"task.rewards[{i}].{key}: {error}") from error
        return None if verifiers_only else cls(functions, success_threshold=task.success_threshold)

    def score(self, examples: Sequence[PromptExample], texts: Sequence[str]) -> RewardScores:
        """Rewards of texts[i], the completion of examples[i]: sum_k weight_k * reward_k."""
        n = len(texts)
        total = [0.0] * n
        good = [True] * n
        by_function: dict[str, list[float]] = {}
        for function in self.functions:
            if isinstance(function, VerifierReward):
                judgements = function.judge(examples, texts)
                values = [j.reward for j in judgements]
                for i, j in enumerate(judgements):
                    good[i] = good[i] and (j.verdict == "good" if j.verdict is not None else j.reward > 0)
            else:
                values = function.scores(examples, texts)
            by_function[function.name] = values
            total = [t + function.weight * v for t, v in zip(total, values)]
        if self.success_threshold is not None:
            good = [t >= self.success_threshold for t in total]
        return RewardScores(total, by_function, good)


# ---------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], settings, stop_ids: set[int],
                       autocast: Autocast = contextlib.nullcontext) -> tuple[list[list[int]], list[bool]]:
    """Decode every prompt (batched, KV cache): (each completion's token ids, its end token included when it
    sampled one; whether it ended by itself rather than at settings.max_new_tokens)."""
    from tunelab.generate.decode import decode_tokens

    completions: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    with autocast():
        for step in decode_tokens(model, prompts, settings, stop_ids):
            for row, token in enumerate(step):
                if token is not None and not ended[row]:
                    completions[row].append(token)
                    ended[row] = token in stop_ids
    return completions, ended


def completion_text(tokenizer, tokens: list[int], stop_ids: set[int]) -> str:
    """The text of a completion, without its end token."""
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


# ---------------------------------------------------------------------------------------------- the step


class GRPOStep:
    """The trainer's step for task grpo (see the module docstring). `bind` gives it the policy to sample from;
    `collate` samples and scores a batch's completions; `loss` is GRPO's; `evaluate` decodes greedily."""

    head, main_metric, greater_is_better = "lm", "success_rate", True
    online = True  # collate samples from the model: `tunelab plan` times it with the step
    generates = True  # evaluate decodes: under FSDP2 the Trainer gathers the full parameters for it

    def __init__(self, tokenizer, rewards: Rewards, *, num_generations: int = 8, max_new_tokens: int = 128,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, beta: float = 0.04,
                 epsilon: float = 0.2, epsilon_high: float | None = None, num_iterations: int = 1,
                 scale_rewards: bool = True, loss_normalization: str = "token", pad_token_id: int = 0,
                 samples_shown: int = 4) -> None:
        if num_generations < 2:
            raise ConfigError("task.num_generations must be at least 2: advantages compare completions of a group")
        self.tokenizer, self.rewards = tokenizer, rewards
        self.num_generations, self.max_new_tokens = num_generations, max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.beta, self.epsilon, self.epsilon_high = beta, epsilon, epsilon_high
        self.num_iterations, self.scale_rewards = num_iterations, scale_rewards
        self.loss_normalization = loss_normalization
        self.pad_token_id = pad_token_id
        self.samples_shown = samples_shown
        self.model = None
        self.reference: Callable[[], contextlib.AbstractContextManager] | None = None
        self.autocast: Autocast = contextlib.nullcontext
        self.seed = 0
        self.rounds = 0  # rollouts sampled so far: seeds the next one (kept in checkpoints)
        self._buffer: dict[tuple, dict] = {}  # num_iterations > 1: rollouts still to be trained on
        self._window = MetricWindow()
        self.last_samples: list[dict] = []

    @classmethod
    def from_task(cls, task, tokenizer, pad_token_id: int) -> "GRPOStep":
        return cls(tokenizer, Rewards.from_task(task), num_generations=task.num_generations,
                   max_new_tokens=task.max_new_tokens, temperature=task.temperature, top_p=task.top_p,
                   top_k=task.top_k, beta=0.04 if task.beta is None else task.beta, epsilon=task.epsilon,
                   epsilon_high=task.epsilon_high, num_iterations=task.num_iterations,
                   scale_rewards=task.scale_rewards, loss_normalization=task.loss_normalization,
                   pad_token_id=pad_token_id)

    def bind(self, model, *, autocast: Autocast = contextlib.nullcontext, seed: int = 0,
             reference: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        """The policy that collate samples from, the precision it samples in, the seed of its sampling, and the
        reference policy (a context manager factory; needed when beta > 0)."""
        if self.beta > 0 and reference is None:
            raise ConfigError("GRPO with beta > 0 needs a reference policy")
        self.model, self.autocast, self.seed, self.reference = model, autocast, seed, reference

    # ------------------------------------------------------------------ rollouts

    def _stop_ids(self, model) -> set[int]:
        from tunelab.generate.decode import eos_ids

        return eos_ids(model, self.tokenizer)

    def collate(self, features: Sequence[dict]) -> dict:
        """A training batch: the B prompts' B x G sampled completions as rows, with their advantages (and the
        reference / sampling policy's token log-probabilities). With num_iterations > 1 a batch seen again (the
        sampler repeats it) gets the same rollout back."""
        key = tuple(f["index"] for f in features)
        if self.num_iterations > 1 and key in self._buffer:
            entry = self._buffer[key]
            entry["uses"] += 1
            if entry["uses"] >= self.num_iterations:
                del self._buffer[key]
            return dict(entry["batch"])
        batch = self.rollout(features)
        if self.num_iterations > 1:
            self._buffer[key] = {"batch": batch, "uses": 1}
        return dict(batch)

    def rollout(self, features: Sequence[dict]) -> dict:
        """Sample G completions per prompt from the bound policy, score them, and build the training rows."""
        from tunelab.generate.decode import GenerationSettings
        from tunelab.train.preference import _rows

        model = self.model
        if model is None:
            raise TunelabError("GRPOStep.bind(model) must be called before training: collate samples from it")
        G = self.num_generations
        prompts = [list(f["prompt_ids"]) for f in features for _ in range(G)]  # prompt i's group: rows iG..iG+G-1
        examples = [f["example"] for f in features for _ in range(G)]
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                      top_p=self.top_p, top_k=self.top_k, seed=self.seed * 1_000_003 + self.rounds)
        self.rounds += 1
        stop_ids = self._stop_ids(model)
        was_training = model.training
        model.eval()
        try:
            with full_parameters(model):  # FSDP2: each process decodes as many tokens as its own completions need
                completions, ended = sample_completions(model, prompts, settings, stop_ids, self.autocast)
            texts = [completion_text(self.tokenizer, c, stop_ids) for c in completions]
            scores = self.rewards.score(examples, texts)
            rewards = torch.tensor(scores.total, dtype=torch.float32)
            advantages = group_advantages(rewards, G, scale=self.scale_rewards)  # [B*G]
            batch = _rows(prompts, completions, self.pad_token_id)
            batch["advantages"] = advantages
            device = next(model.parameters()).device
            rows = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                if self.beta > 0:
                    with self.reference() as reference, self.autocast():
                        batch["reference_logps"] = self._logps(reference, rows)[0].float().cpu()
                if self.num_iterations > 1:
                    with self.autocast():
                        batch["old_logps"] = self._logps(model, rows)[0].float().cpu()
        finally:
            model.train(was_training)
        self._log_rollout(scores, rewards, completions, ended)
        return batch

    def _logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of each completion token [R, T-1], the completion-token mask [R, T-1])."""
        out = model(batch["input_ids"], batch["attention_mask"], heads=())
        return token_logps(out.hidden, batch["labels"], model.heads[self.head])

    def _log_rollout(self, scores: RewardScores, rewards: torch.Tensor, completions: list[list[int]],
                     ended: list[bool]) -> None:
        n, groups = len(completions), rewards.reshape(-1, self.num_generations)
        self._add("reward", float(rewards.sum()), n)
        self._add("reward_std", float(groups.std(dim=1, unbiased=False).sum()), groups.shape[0])
        self._add("success_rate", float(sum(scores.success)), n)
        self._add("zero_std_groups", float((groups == groups[:, :1]).all(dim=1).sum()), groups.shape[0])
        self._add("completion_length", float(sum(len(c) for c in completions)), n)
        self._add("truncated", float(sum(not e for e in ended)), n)
        if len(scores.by_function) > 1:
            for name, values in scores.by_function.items():
                self._add(f"reward_{name}", float(sum(values)), n)

    # ------------------------------------------------------------------ loss

    def num_targets(self, batch: dict) -> int:
        """What the batch's summed loss is divided by (over the accumulated batch): see loss_normalization."""
        rows = batch["input_ids"].shape[0]
        if self.loss_normalization == "sequence":
            return rows
        if self.loss_normalization == "constant":
            return rows * self.max_new_tokens
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        logps, mask = self._logps(model, batch)  # [R, T-1]
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()  # mu = 1: rho = 1
        reference = batch["reference_logps"].to(logps.device) if "reference_logps" in batch else None
        out = grpo_token_losses(logps, old.to(logps.device), batch["advantages"].to(logps.device), mask,
                                reference_logps=reference, beta=self.beta, epsilon=self.epsilon,
                                epsilon_high=self.epsilon_high)
        tokens = int(mask.sum())
        if "reference_logps" in batch:
            self._add("kl", float(out.kl.sum()), tokens)
        self._add("clip_fraction", float(out.clipped.sum()), tokens)
        return reduce_token_losses(out.losses, mask, self.loss_normalization, max_new_tokens=self.max_new_tokens)

    # ------------------------------------------------------------------ metrics, state

    def _add(self, name: str, total: float, count: int) -> None:
        self._window.add(name, total, count)

    def pop_train_metrics(self) -> dict[str, float]:
        """Means of the training rollouts' metrics since the last call (then starts a new window)."""
        return self._window.pop()

    def state_dict(self) -> dict:
        """What a resumed run needs to sample and train exactly as this one: the rollout count (the seeds) and
        the rollouts of the current batches still to be trained on (num_iterations > 1)."""
        return {"rounds": self.rounds, "buffer": [(list(k), v["uses"], v["batch"]) for k, v in self._buffer.items()]}

    def load_state_dict(self, data: dict) -> None:
        self.rounds = int(data.get("rounds", 0))
        self._buffer = {tuple(k): {"uses": uses, "batch": batch} for k, uses, batch in data.get("buffer", [])}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model, features: Sequence[dict], batch_size: int, autocast) -> dict[str, Any]:
        """Greedy completions of the validation prompts, `batch_size` prompts decoded together, scored by the
        reward functions: success_rate, reward (mean), completion_length, truncated, reward_<name>, prompts."""
        from tunelab.generate.decode import GenerationSettings

        if not features:
            raise TunelabError("no prompts to evaluate")
        was_training = model.training
        model.eval()
        stop_ids = self._stop_ids(model)
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=0.0)
        order = sorted(range(len(features)), key=lambda i: len(features[i]["prompt_ids"]))  # little left padding
        completions: list[list[int]] = [[] for _ in features]
        ended = [False] * len(features)
        try:
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start:start + max(1, batch_size)]
                tokens, done = sample_completions(model, [list(features[i]["prompt_ids"]) for i in chunk], settings,
                                                  stop_ids, autocast)
                for i, t, d in zip(chunk, tokens, done):
                    completions[i], ended[i] = t, d
        finally:
            model.train(was_training)
        examples = [f["example"] for f in features]
        texts = [completion_text(self.tokenizer, c, stop_ids) for c in completions]
        scores = self.rewards.score(examples, texts)
        n = len(features)
        metrics: dict[str, Any] = {"success_rate": sum(scores.success) / n, "reward": sum(scores.total) / n,
                                   "completion_length": sum(len(c) for c in completions) / n,
                                   "truncated": sum(not e for e in ended) / n}
        if len(scores.by_function) > 1:
            metrics.update({f"reward_{name}": sum(v) / n for name, v in scores.by_function.items()})
        metrics["prompts"] = n
        self.last_samples = [{"prompt": examples[i].messages[-1]["content"], "text": texts[i],
                              "reward": scores.total[i], "success": scores.success[i]}
                             for i in range(min(self.samples_shown, n))]
        return metrics


# ---------------------------------------------------------------------------------------------- the run


class RepeatedGroups:
    """A batch sampler that yields each optimizer step's batches (`group` of them: grad_accum) `times` times in a
    row, so that GRPO trains num_iterations steps on every sampled batch. A last, partial group is filled up with
    the epoch's first batches, so that every optimizer step has `group` batches."""

    def __init__(self, base, group: int, times: int) -> None:
        if base.num_batches < group:
            raise ConfigError(f"the training prompts make {base.num_batches} batches, fewer than the {group} of one "
                              f"optimizer step (train.grad_accum) that task.num_iterations repeats: use fewer")
        self.base, self.group, self.times = base, group, times
        self.start_batch = 0

    @property
    def num_batches(self) -> int:
        return -(-self.base.num_batches // self.group) * self.group * self.times

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.base.set_epoch(epoch, 0)
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def batches(self) -> list[list[int]]:
        base = self.base.batches()
        if len(base) % self.group:
            base = base + base[: self.group - len(base) % self.group]
        out = []
        for start in range(0, len(base), self.group):
            out += base[start:start + self.group] * self.times
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start_batch:]


def policy_reference(model, config) -> Callable[[], contextlib.AbstractContextManager] | None:
    """The reference policy of a GRPO run, as a factory of context managers yielding it (None with beta 0):
    task.reference loaded once, else the model with its adapters off (LoRA, DoRA, QLoRA), else a frozen copy
    of the model as it is now (before training)."""
    from tunelab.peft import lora_disabled, lora_modules

    task = config.task
    if task.beta == 0:
        return None
    if task.reference is not None:
        from tunelab.train.run import load_any

        reference, _ = load_any(task.reference, dtype=config.model.dtype)
        reference.to(next(model.parameters()).device).eval().requires_grad_(False)
        return lambda: contextlib.nullcontext(reference)
    if lora_modules(model):
        return lambda: lora_disabled(model)
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return lambda: contextlib.nullcontext(frozen)


def bind_policy(step: GRPOStep, model, config) -> None:
    """Give a GRPO step its policy, precision, seed and reference, as the run's Trainer will train them."""
    from tunelab.train.trainer import autocast_context, resolve_precision

    device = next(model.parameters()).device
    autocast = autocast_context(resolve_precision(config.train.precision, device), device)
    step.bind(model, autocast=autocast, seed=config.train.seed, reference=policy_reference(model, config))


class GRPOSamples:
    """The Trainer's on_evaluate(step, metrics): the first validation prompts' greedy completions with their
    rewards, printed, appended to samples.jsonl ({"step", "prompt", "text", "reward", "success"}) and written to
    TensorBoard (Text tab)."""

    def __init__(self, step: GRPOStep, run_dir: str | Path, *, echo: Callable[[str], None] = print,
                 tensorboard: bool = True) -> None:
        self.step = step
        self.log = SampleLog(run_dir, echo=echo, tensorboard=tensorboard)

    def __call__(self, step: int, metrics: dict | None = None) -> list[dict]:
        records = [{"step": step, "prompt": s["prompt"] + "\n", **{k: s[k] for k in ("text", "reward", "success")}}
                   for s in self.step.last_samples]
        rate = f", success rate {metrics['success_rate']:.3f}" if metrics and "success_rate" in metrics else ""
        notes = [(f"[reward {r['reward']:.3f}, {'success' if r['success'] else 'no success'}]",
                  f"reward {r['reward']:.3f}") for r in records]
        self.log.write(step, records, about=rate, notes=notes)
        return records

    def close(self) -> None:
        self.log.close()


ROLLOUT_PANELS = (("reward", "success_rate"), ("kl",), ("completion_length",), ("truncated", "zero_std_groups",
                                                                                 "clip_fraction"))


def plot_rollouts(run_dir: str | Path) -> Path | None:
    """plots/rollouts.png: the sampled completions' reward and success rate, KL, length, and the shares truncated,
    in groups of equal rewards and clipped, over the training steps (from metrics.jsonl)."""
    from tunelab.evaluate.plots import plot_training_panels
    from tunelab.evaluate.report import read_history

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        return None
    return plot_training_panels(read_history(run_dir / "metrics.jsonl"), ROLLOUT_PANELS,
                                run_dir / "plots" / "rollouts.png", title="GRPO rollouts (sampled completions)")


def prepare_grpo(config, tokenizer, labels=None):
    """PreparedData of task grpo: the prompt records of data.train (and data.validation, or validation_split of
    train), encoded; each feature carries its PromptExample as "example" (what the reward functions read)."""
    from tunelab.data.prompts import encode_prompts, load_prompts
    from tunelab.train.run import PreparedData, _limit, _split

    Rewards.from_task(config.task, verifiers_only=True)  # a misnamed verifier fails before the model loads
    d = config.data
    file_format = "auto" if d.format in ("alpaca", "messages") else d.format
    train = load_prompts(d.train_paths(), format=file_format)
    validation = load_prompts(d.validation_paths(), format=file_format) if d.validation_paths() else None
    train, validation = _split(config, train, validation)
    train, validation = _limit(train, d.max_train_examples), _limit(validation, d.max_validation_examples)
    max_prompt = d.max_prompt_length or d.max_length - config.task.max_new_tokens

    def encode(examples: list[PromptExample]):
        rows = encode_prompts(examples, tokenizer, max_prompt)
        for feature in rows.features:
            feature["example"] = examples[feature["index"]]
        return rows

    train_rows = encode(train)
    val_rows = encode(validation) if validation else None
    kept = [f["example"] for f in val_rows.features] if val_rows is not None else []
    return PreparedData(train_rows, val_rows, [], kept, len(train))
