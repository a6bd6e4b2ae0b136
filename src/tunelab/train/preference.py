"""Learning from preferences: the task steps of DPO and its relatives, KTO and reward models, and the reference.

A preference batch holds B pairs as 2B rows, every chosen answer (after its prompt) then every rejected one,
so both go through one forward pass; a row's labels are its answer tokens, and `sequence_logps` sums their
log-probabilities. The loss of each pair comes from losses/preference.py; the trainer divides the summed
loss by the pairs of the whole accumulated batch.

The reference policy pi_ref of DPO, IPO and KTO is the model before training: with LoRA / DoRA / QLoRA the
same model with its adapters switched off (no copy); with full fine-tuning the model itself before the
first step. Its log-probabilities are computed ONCE for the training and validation examples, before
training, kept in the examples' features ("reference_chosen", ...) and saved in the run directory
(reference_logps.safetensors), so that neither the epochs nor a resumed run compute them again. SimPO and
ORPO need no reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from tunelab.data.encoded import IGNORE_INDEX
from tunelab.errors import ConfigError, TunelabError
from tunelab.evaluate import metrics as M
from tunelab.losses import bradley_terry_loss, dpo_loss, ipo_loss, kto_loss, orpo_loss, sequence_logps, simpo_loss
from tunelab.train.tasks import MetricWindow, lm_projection

REFERENCE_FILE = "reference_logps.safetensors"
PREFERENCE_LOSSES = ("dpo", "cdpo", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
DEFAULT_BETA = {"dpo": 0.1, "cdpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}


def _rows(prompts: Sequence[list[int]], answers: Sequence[list[int]], pad_token_id: int, *,
          labels: bool = True) -> dict[str, torch.Tensor]:
    """prompt + answer rows, right-padded: input_ids, attention_mask [R, T] and labels (the answer tokens)."""
    longest = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids, mask, targets = [], [], []
    for prompt, answer in zip(prompts, answers):
        n = len(prompt) + len(answer)
        ids.append(list(prompt) + list(answer) + [pad_token_id] * (longest - n))
        mask.append([1] * n + [0] * (longest - n))
        targets.append([IGNORE_INDEX] * len(prompt) + list(answer) + [IGNORE_INDEX] * (longest - n))
    batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if labels:
        batch["labels"] = torch.tensor(targets)
    return batch


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _eval_batches(features: Sequence[dict], batch_size: int) -> Iterator[list[int]]:
    """Indices of evaluation (and reference) batches, in length order: little padding, and the same batches
    every time, so that an untrained policy reproduces its reference log-probabilities exactly."""
    order = sorted(range(len(features)), key=lambda i: features[i]["length"])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class _SequenceScorer:
    """What the DPO-family and KTO steps share: rows -> per-row answer log-probabilities; the reference pass."""

    head = "lm"
    reference_keys: tuple[str, ...] = ()  # the row kinds whose reference log-probabilities a feature keeps

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id
        self._window = MetricWindow()

    def row_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probabilities of each row's labelled tokens [R], their counts [R])."""
        out = model(batch["input_ids"], batch["attention_mask"], heads=())
        return sequence_logps(out.hidden, batch["labels"], lm_projection(model.heads[self.head]))

    def batch_logps(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """{row kind: log-probabilities [B]} of a collated batch of B features."""
        raise NotImplementedError

    @torch.inference_mode()
    def attach_reference(self, model, features: Sequence[dict], batch_size: int, autocast) -> int:
        """Compute the reference log-probabilities of every feature with `model` (the reference policy, e.g.
        under lora_disabled) and keep them in the features as "reference_<kind>"; returns the rows scored.

        The batches are the evaluation's (same rows, same padding), so that an untrained policy evaluated
        later reproduces these numbers bit for bit: every reward is then exactly 0.
        """
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        rows = 0
        for indices in _eval_batches(features, batch_size):
            chunk = [features[i] for i in indices]
            with autocast():
                values = self.batch_logps(model, _to(self.collate(chunk), device))
            for kind, logps in values.items():
                for feature, value in zip(chunk, logps.float().tolist()):
                    feature[f"reference_{kind}"] = value
                rows += len(chunk)
        model.train(was_training)
        return rows

    def _reference(self, features: Sequence[dict], kind: str) -> torch.Tensor | None:
        key = f"reference_{kind}"
        if all(key in f for f in features):
            return torch.tensor([f[key] for f in features], dtype=torch.float32)
        return None

    def _need(self, batch: dict, key: str) -> torch.Tensor:
        if key not in batch:
            raise TunelabError(f"the batch has no {key} log-probabilities: the reference pass "
                               f"(attach_reference) must run before training or evaluation")
        return batch[key]

    # training-time metrics, averaged over the logging window (the trainer logs them with the loss)
    def _add(self, name: str, total: float, count: int) -> None:
        self._window.add(name, total, count)

    def pop_train_metrics(self) -> dict[str, float]:
        """Means of the training rewards since the last call (then starts a new window)."""
        return self._window.pop()


class PreferenceStep(_SequenceScorer):
    """DPO (sigmoid; conservative with label_smoothing), IPO, SimPO and ORPO on pairs.

    Metrics: reward_accuracy (share of pairs whose reward ranks the chosen answer strictly above the
    rejected one), margin (mean chosen - rejected reward), chosen_reward, rejected_reward, the mean summed
    log-probabilities chosen_logps / rejected_logps, and loss. The rewards are DPO's implicit
    beta log pi / pi_ref (dpo, cdpo, ipo), SimPO's beta / |y| log pi, ORPO's length-normalised log pi.
    """

    main_metric, greater_is_better = "reward_accuracy", True
    rows_per_example = 2  # a chosen and a rejected row per pair

    def __init__(self, loss: str = "dpo", *, beta: float | None = None, label_smoothing: float = 0.0,
                 gamma: float = 1.0, pad_token_id: int = 0) -> None:
        super().__init__(pad_token_id)
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(f"unknown preference loss {loss!r} (known: {', '.join(PREFERENCE_LOSSES)})")
        self.loss_type = loss
        self.beta = DEFAULT_BETA[loss] if beta is None else beta
        self.label_smoothing = label_smoothing
        self.gamma = gamma
        self.needs_reference = loss not in REFERENCE_FREE
        self.reference_keys = ("chosen", "rejected") if self.needs_reference else ()

    def collate(self, features: Sequence[dict]) -> dict:
        """2B rows: every prompt + chosen answer, then every prompt + rejected answer; the cached reference
        log-probabilities as reference_chosen / reference_rejected [B] when the features have them."""
        prompts = [f["prompt_ids"] for f in features]
        batch = _rows(prompts + prompts, [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features],
                      self.pad_token_id)
        for kind in ("chosen", "rejected"):
            reference = self._reference(features, kind)
            if reference is not None:
                batch[f"reference_{kind}"] = reference
        return batch

    def batch_logps(self, model, batch):
        logps, _ = self.row_logps(model, batch)
        pairs = logps.shape[0] // 2
        return {"chosen": logps[:pairs], "rejected": logps[pairs:]}

    def num_targets(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def pair_output(self, model, batch: dict):
        """The loss function's PreferenceOutput for the batch's pairs, and the policy log-probabilities."""
        logps, counts = self.row_logps(model, batch)
        pairs = logps.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        chosen_n, rejected_n = counts[:pairs], counts[pairs:]
        kind = self.loss_type
        if kind in ("dpo", "cdpo"):
            out = dpo_loss(chosen, rejected, self._need(batch, "reference_chosen"),
                           self._need(batch, "reference_rejected"), beta=self.beta,
                           label_smoothing=self.label_smoothing)
        elif kind == "ipo":
            out = ipo_loss(chosen, rejected, self._need(batch, "reference_chosen"),
                           self._need(batch, "reference_rejected"), beta=self.beta)
        elif kind == "simpo":
            out = simpo_loss(chosen, rejected, chosen_n, rejected_n, beta=self.beta, gamma=self.gamma)
        else:
            out = orpo_loss(chosen, rejected, chosen_n, rejected_n, beta=self.beta)
        return out, chosen.detach(), rejected.detach()

    def loss(self, model, batch):
        out, _, _ = self.pair_output(model, batch)
        n = out.losses.shape[0]
        self._add("reward_accuracy", float((out.chosen_rewards > out.rejected_rewards).sum()), n)
        self._add("margin", float(out.margins.sum()), n)
        self._add("chosen_reward", float(out.chosen_rewards.sum()), n)
        self._add("rejected_reward", float(out.rejected_rewards.sum()), n)
        return out.losses.sum(), n

    @torch.inference_mode()
    def evaluate(self, model, features, batch_size, autocast) -> dict:
        model.eval()
        device = next(model.parameters()).device
        total, chosen_rewards, rejected_rewards = 0.0, [], []
        chosen_logps, rejected_logps = 0.0, 0.0
        terms: dict[str, float] = {}
        for indices in _eval_batches(features, batch_size):
            batch = _to(self.collate([features[i] for i in indices]), device)
            with autocast():
                out, chosen, rejected = self.pair_output(model, batch)
            total += float(out.losses.float().sum())
            chosen_rewards += out.chosen_rewards.float().tolist()
            rejected_rewards += out.rejected_rewards.float().tolist()
            chosen_logps += float(chosen.sum())
            rejected_logps += float(rejected.sum())
            for name, value in out.terms.items():
                terms[name] = terms.get(name, 0.0) + float(value.float().sum())
        n = len(chosen_rewards)
        if n == 0:
            raise TunelabError("no preference pairs to evaluate")
        result = {"loss": total / n, **M.preference_metrics(chosen_rewards, rejected_rewards),
                  "chosen_reward": sum(chosen_rewards) / n, "rejected_reward": sum(rejected_rewards) / n,
                  "chosen_logps": chosen_logps / n, "rejected_logps": rejected_logps / n, "pairs": n}
        result.update({name: value / n for name, value in terms.items()})
        return result


class KTOStep(_SequenceScorer):
    """KTO on single answers labelled desirable or not (Ethayarajh et al. 2024).

    A batch of B examples is B rows (prompt + answer, with gradient) and B mismatched rows (prompt + another
    example's answer, without gradient: they only estimate the reference point z0). Metrics: loss, kl (z0 over
    the evaluated examples), desirable_reward / undesirable_reward (mean beta log pi / pi_ref), margin (their
    difference) and reward_accuracy: the share of examples on the side of z0 their label says (a desirable
    answer's reward above beta z0, an undesirable one's below).
    """

    main_metric, greater_is_better = "loss", False
    needs_reference = True
    reference_keys = ("completion", "kl")

    def __init__(self, *, beta: float | None = None, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 pad_token_id: int = 0) -> None:
        super().__init__(pad_token_id)
        self.beta = DEFAULT_BETA["kto"] if beta is None else beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def collate(self, features: Sequence[dict]) -> dict:
        """B rows prompt + answer, and B rows prompt + the mismatched answer as kl_input_ids, kl_attention_mask
        and kl_labels; desirable [B]; the cached reference log-probabilities when the features have them."""
        prompts = [f["prompt_ids"] for f in features]
        batch = _rows(prompts, [f["completion_ids"] for f in features], self.pad_token_id)
        kl_rows = _rows(prompts, [f["kl_ids"] for f in features], self.pad_token_id)
        batch.update({f"kl_{k}": v for k, v in kl_rows.items()})
        batch["desirable"] = torch.tensor([bool(f["desirable"]) for f in features])
        for kind in self.reference_keys:
            reference = self._reference(features, kind)
            if reference is not None:
                batch[f"reference_{kind}"] = reference
        return batch

    def num_targets(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]

    @staticmethod
    def _kl_rows(batch: dict) -> dict:
        return {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
                "labels": batch["kl_labels"]}

    def batch_logps(self, model, batch):
        return {"completion": self.row_logps(model, batch)[0], "kl": self.row_logps(model, self._kl_rows(batch))[0]}

    def example_output(self, model, batch: dict):
        logps, _ = self.row_logps(model, batch)
        with torch.no_grad():  # z0 is not back-propagated through: its rows need no graph
            kl_logps, _ = self.row_logps(model, self._kl_rows(batch))
        out = kto_loss(logps, self._need(batch, "reference_completion"), batch["desirable"], kl_logps,
                       self._need(batch, "reference_kl"), beta=self.beta, desirable_weight=self.desirable_weight,
                       undesirable_weight=self.undesirable_weight)
        return out

    def loss(self, model, batch):
        out = self.example_output(model, batch)
        desirable = batch["desirable"]
        n = out.losses.shape[0]
        self._add("kl", float(out.kl) * n, n)
        self._add("desirable_reward", float(out.rewards[desirable].sum()), int(desirable.sum()))
        self._add("undesirable_reward", float(out.rewards[~desirable].sum()), int((~desirable).sum()))
        return out.losses.sum(), n

    @torch.inference_mode()
    def evaluate(self, model, features, batch_size, autocast) -> dict:
        """z0 is estimated once over every evaluated example (the mean mismatched log-ratio, clamped at 0),
        then each example's loss and reward are taken against it."""
        model.eval()
        device = next(model.parameters()).device
        ratios, kl_ratios, labels = [], [], []
        for indices in _eval_batches(features, batch_size):
            batch = _to(self.collate([features[i] for i in indices]), device)
            with autocast():
                values = self.batch_logps(model, batch)
            ratios.append(values["completion"].float() - self._need(batch, "reference_completion"))
            kl_ratios.append(values["kl"].float() - self._need(batch, "reference_kl"))
            labels.append(batch["desirable"])
        if not ratios:
            raise TunelabError("no examples to evaluate")
        ratio, kl_ratio, desirable = torch.cat(ratios), torch.cat(kl_ratios), torch.cat(labels)
        # kto_loss with the policy's log-ratios as "policy" and zeros as "reference"
        out = kto_loss(ratio, torch.zeros_like(ratio), desirable, kl_ratio, torch.zeros_like(kl_ratio), beta=self.beta,
                       desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        threshold = self.beta * float(out.kl)
        right = torch.where(desirable, out.rewards > threshold, out.rewards < threshold)
        mean = lambda t: float(t.mean()) if t.numel() else 0.0  # noqa: E731
        good, bad = mean(out.rewards[desirable]), mean(out.rewards[~desirable])
        return {"loss": float(out.losses.mean()), "kl": float(out.kl), "reward_accuracy": float(right.float().mean()),
                "margin": good - bad, "desirable_reward": good, "undesirable_reward": bad,
                "examples": int(ratio.numel())}


class RewardModelStep:
    """A Bradley-Terry reward model: a scalar head (the classifier head with one output) on the last token of
    prompt + answer; loss -log sigma(r_chosen - r_rejected). Metrics: reward_accuracy (its preference
    accuracy), margin, chosen_reward, rejected_reward, loss."""

    head, main_metric, greater_is_better = "classifier", "reward_accuracy", True
    needs_reference = False
    rows_per_example = 2

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id
        self._window = MetricWindow()

    def collate(self, features: Sequence[dict]) -> dict:
        prompts = [f["prompt_ids"] for f in features]
        answers = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        return _rows(prompts + prompts, answers, self.pad_token_id, labels=False)

    def num_targets(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def pair_output(self, model, batch):
        scores = model(batch["input_ids"], batch["attention_mask"], heads=(self.head,)).logits[self.head]  # [2B, 1]
        scores = scores[:, 0].float()
        pairs = scores.shape[0] // 2
        return bradley_terry_loss(scores[:pairs], scores[pairs:])

    def loss(self, model, batch):
        out = self.pair_output(model, batch)
        n = out.losses.shape[0]
        self._window.add("reward_accuracy", float((out.margins > 0).sum()), n)
        self._window.add("margin", float(out.margins.sum()), n)
        return out.losses.sum(), n

    def pop_train_metrics(self) -> dict[str, float]:
        return self._window.pop()

    @torch.inference_mode()
    def evaluate(self, model, features, batch_size, autocast) -> dict:
        model.eval()
        device = next(model.parameters()).device
        total, chosen, rejected = 0.0, [], []
        for indices in _eval_batches(features, batch_size):
            batch = _to(self.collate([features[i] for i in indices]), device)
            with autocast():
                out = self.pair_output(model, batch)
            total += float(out.losses.sum())
            chosen += out.chosen_rewards.tolist()
            rejected += out.rejected_rewards.tolist()
        if not chosen:
            raise TunelabError("no preference pairs to evaluate")
        n = len(chosen)
        return {"loss": total / n, **M.preference_metrics(chosen, rejected), "chosen_reward": sum(chosen) / n,
                "rejected_reward": sum(rejected) / n, "pairs": n}

    @torch.inference_mode()
    def scores(self, model, features: Sequence[dict], batch_size: int, autocast) -> list[float]:
        """The reward of each single answer (features of data.preference.encode_answers), in feature order."""
        model.eval()
        device = next(model.parameters()).device
        rewards: list[float] = [0.0] * len(features)
        for indices in _eval_batches(features, batch_size):
            chunk = [features[i] for i in indices]
            batch = _to(_rows([f["prompt_ids"] for f in chunk], [f["answer_ids"] for f in chunk], self.pad_token_id,
                              labels=False), device)
            with autocast():
                out = model(batch["input_ids"], batch["attention_mask"], heads=(self.head,)).logits[self.head]  # [B, 1]
            for i, value in zip(indices, out[:, 0].float().tolist()):
                rewards[i] = value
        return rewards


# ---------------------------------------------------------------------------------------------- the reference


@contextlib.contextmanager
def reference_model(model, *, source: str | None = None, dtype: str | None = None,
                    trained: bool = False) -> Iterator[Any]:
    """The reference policy pi_ref, for as long as the block runs.

    `source` (a model to load: task.reference, or a full fine-tuning run's model.source) when given; else
    the model with its adapters switched off (LoRA, DoRA, QLoRA: no copy, the base weights are the
    reference); else, for a model that has not been trained yet (`trained` false), the model itself.
    Loading `source` holds a second model in memory while the block runs.
    """
    from tunelab.peft import lora_disabled, lora_modules

    if source is not None:
        from tunelab.train.run import load_any

        reference, _ = load_any(source, dtype=dtype)
        reference.to(next(model.parameters()).device).eval()
        try:
            yield reference
        finally:
            del reference
    elif lora_modules(model):
        with lora_disabled(model):
            yield model
    elif not trained:
        yield model
    else:
        raise ConfigError("implicit rewards compare the model with its reference, the model it was trained from; "
                          "this model has no adapters to switch off: give the reference with task.reference=SOURCE "
                          "(or use task.loss simpo or orpo, which need none)")


def reference_context(config) -> dict:
    """What the reference of a run is, for the cache's fingerprint: the reference model (task.reference, or the
    run's model.source with its adapters off / before training), its dtype, the precision and the method."""
    return {"reference": config.task.reference or config.model.name, "dtype": config.model.dtype,
            "precision": config.train.precision, "method": config.method.type}


def reference_fingerprint(step, features: Sequence[dict], context: dict) -> str:
    """A digest of what the reference log-probabilities depend on: the rows (token ids) and `context` (the
    reference model, dtype and precision)."""
    digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode())
    for feature in features:
        for key in ("prompt_ids", *[f"{kind}_ids" for kind in step.reference_keys]):
            digest.update(json.dumps(feature[key]).encode())
    return digest.hexdigest()


def load_reference_cache(path: Path, split: str, step, features: Sequence[dict], fingerprint: str) -> bool:
    """Put the cached reference log-probabilities of `split` into the features; False if the file has none for
    these rows (missing, another split, other data or another reference)."""
    from safetensors import safe_open

    if not path.exists():
        return False
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get(f"{split}.fingerprint") != fingerprint:
            return False
        values = {kind: f.get_tensor(f"{split}.{kind}").tolist() for kind in step.reference_keys}
    if any(len(v) != len(features) for v in values.values()):
        return False
    for kind, column in values.items():
        for feature, value in zip(features, column):
            feature[f"reference_{kind}"] = value
    return True


def save_reference_cache(path: Path, splits: dict[str, tuple[Sequence[dict], str]], step) -> None:
    """Write the features' reference log-probabilities of every split (float32) with their fingerprints,
    to a temporary name first and then renamed."""
    from safetensors.torch import save_file

    tensors, metadata = {}, {}
    for split, (features, fingerprint) in splits.items():
        for kind in step.reference_keys:
            tensors[f"{split}.{kind}"] = torch.tensor([f[f"reference_{kind}"] for f in features], dtype=torch.float32)
        metadata[f"{split}.fingerprint"] = fingerprint
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def attach_references(step, model, splits: dict[str, Sequence[dict] | None], *, batch_size: int, autocast,
                      context: dict, cache: Path | None = None, save: bool = True,
                      reference: Callable[[], Any] | None = None,
                      log: Callable[[str], None] = print) -> dict[str, int]:
    """Give every feature of every split its reference log-probabilities: from `cache` when it holds them for
    these rows, else computed with the reference policy (`reference()`, a context manager yielding it) and,
    when `save`, written to `cache`. Returns the rows computed per split (0 when read from the cache)."""
    splits = {name: features for name, features in splits.items() if features}
    computed: dict[str, int] = {}
    fingerprints = {name: reference_fingerprint(step, features, context) for name, features in splits.items()}
    missing = [name for name, features in splits.items()
               if cache is None or not load_reference_cache(cache, name, step, features, fingerprints[name])]
    for name in splits:
        computed[name] = 0
    if missing:
        opener = reference or (lambda: reference_model(model))
        with opener() as policy:
            for name in missing:
                computed[name] = step.attach_reference(policy, splits[name], batch_size, autocast)
                log(f"reference log-probabilities: {computed[name]} {name} rows, computed once")
        if cache is not None and save:
            save_reference_cache(cache, {name: (features, fingerprints[name]) for name, features in splits.items()},
                                 step)
    elif splits:
        log(f"reference log-probabilities: read from {cache}")
    return computed
