"""Each task's step: the head it trains, its loss on a batch, and its evaluation with the task's metrics.

The Trainer calls num_targets / loss / evaluate; `predict` serves `tunelab predict` and `tunelab eval`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from tunelab.data.collate import pad_collate
from tunelab.evaluate import metrics as M
from tunelab.losses import (chunked_lm_loss, chunked_token_lm_loss, classification_loss, masked_lm_loss,
                            next_sentence_loss, span_loss, token_loss)
from tunelab.models.base import Model
from tunelab.models.heads import LMHead

Autocast = Callable[[], Any]


def lm_projection(head):
    """The language-model head as what the chunked losses take: an LMHead's own linear layer (its forward is just
    that projection), so that the loss can fuse it with the cross-entropy; any other head as it is."""
    return head.proj if type(head) is LMHead else head


def _inputs(batch: dict) -> dict:
    keys = ("attention_mask", "token_type_ids", "position_ids", "document_ids")
    return {k: batch[k] for k in keys if k in batch}


def iterate_batches(features: Sequence[dict], batch_size: int, pad_token_id: int):
    """Evaluation batches in length order (little padding); yields (indices, collated batch)."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        yield indices, pad_collate([features[i] for i in indices], pad_token_id=pad_token_id)


class MetricWindow:
    """Means of training-batch metrics over a logging window (preference, reward-model and GRPO steps report
    rewards and margins with the loss): add(name, total, count) per batch; pop() gives total / count per name
    and starts a new window."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[float, int]] = {}

    def add(self, name: str, total: float, count: int) -> None:
        summed, counted = self._sums.get(name, (0.0, 0))
        self._sums[name] = (summed + total, counted + count)

    def pop(self) -> dict[str, float]:
        out = {name: summed / counted for name, (summed, counted) in self._sums.items() if counted}
        self._sums = {}
        return out


class TaskStep:
    """Shared machinery; subclasses set `head`, `main_metric`, `greater_is_better` and the three steps."""

    head = ""
    main_metric = "loss"
    greater_is_better = False

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def collate(self, features: Sequence[dict]) -> dict:
        """A training or evaluation batch of features, padded."""
        return pad_collate(features, pad_token_id=self.pad_token_id)

    def forward(self, model: Model, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in _inputs(batch).items() if k != "attention_mask"}
        out = model(batch["input_ids"], batch.get("attention_mask"), heads=(self.head,), **inputs)
        return out.logits[self.head]

    @torch.inference_mode()
    def outputs(self, model: Model, features: Sequence[dict], batch_size: int, autocast: Autocast):
        """(per-feature logits in feature order, summed loss, targets) over `features`."""
        model.eval()
        device = next(model.parameters()).device
        rows: list[Any] = [None] * len(features)
        loss_total, targets = 0.0, 0
        for indices, batch in iterate_batches(features, batch_size, self.pad_token_id):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast():
                logits = self.forward(model, batch)
                if self.has_targets(batch):
                    loss, count = self.loss_from_logits(logits, batch)
                    loss_total, targets = loss_total + float(loss), targets + count
            logits = logits.float().cpu()
            for row, i in enumerate(indices):
                rows[i] = self.feature_output(logits[row], features[i])
        return rows, loss_total, targets

    def has_targets(self, batch: dict) -> bool:
        return "labels" in batch

    def feature_output(self, logits_row: torch.Tensor, feature: dict) -> Any:
        return logits_row

    def num_targets(self, batch: dict) -> int:
        raise NotImplementedError

    def loss(self, model: Model, batch: dict) -> tuple[torch.Tensor, int]:
        return self.loss_from_logits(self.forward(model, batch), batch)

    def loss_from_logits(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        raise NotImplementedError


class ClassificationStep(TaskStep):
    head, main_metric, greater_is_better = "classifier", "accuracy", True

    def __init__(self, labels: list[str], pad_token_id: int = 0) -> None:
        super().__init__(pad_token_id)
        self.labels = labels

    def num_targets(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    def loss_from_logits(self, logits, batch):
        return classification_loss(logits, batch["labels"])

    def evaluate(self, model, features, batch_size, autocast) -> dict:
        rows, loss, count = self.outputs(model, features, batch_size, autocast)
        predictions = [int(r.argmax()) for r in rows]
        references = [f["labels"] for f in features]
        result = M.classification_metrics(predictions, references, self.labels)
        return {"loss": loss / max(1, count), **result}

    def predict(self, model, features, batch_size, autocast) -> list[dict]:
        rows, _, _ = self.outputs(model, features, batch_size, autocast)
        out = []
        for r in rows:
            probs = r.softmax(-1)
            best = int(probs.argmax())
            out.append({"label": self.labels[best], "score": float(probs[best]),
                        "scores": {name: float(p) for name, p in zip(self.labels, probs)}})
        return out


class TaggingStep(TaskStep):
    head, main_metric, greater_is_better = "tagger", "f1", True

    def __init__(self, labels: list[str], examples=None, pad_token_id: int = 0) -> None:
        super().__init__(pad_token_id)
        self.labels = labels
        self.examples = examples or []  # one feature per example, in order; gold tags come from here

    def num_targets(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    def loss_from_logits(self, logits, batch):
        return token_loss(logits, batch["labels"])

    def feature_output(self, logits_row, feature):
        return logits_row[: len(feature["input_ids"])].argmax(-1).tolist()

    def evaluate(self, model, features, batch_size, autocast) -> dict:
        from tunelab.data.tagging import align_predictions

        rows, loss, count = self.outputs(model, features, batch_size, autocast)
        predicted = align_predictions(rows, features, self.labels)
        gold = [list(e.tags) for e in self.examples]
        # seqeval's default mode: the conlleval definition that published CoNLL-2003 F1 scores use
        result = M.span_metrics(predicted, gold, scheme=None)
        return {"loss": loss / max(1, count), **result}

    def predict(self, model, features, batch_size, autocast) -> list[list[str]]:
        from tunelab.data.tagging import align_predictions

        rows, _, _ = self.outputs(model, features, batch_size, autocast)
        return align_predictions(rows, features, self.labels)


class QAStep(TaskStep):
    head, main_metric, greater_is_better = "qa", "f1", True

    def __init__(self, examples=None, max_answer_length: int = 30, pad_token_id: int = 0) -> None:
        super().__init__(pad_token_id)
        self.examples = examples or []
        self.max_answer_length = max_answer_length

    def has_targets(self, batch):
        return "start_positions" in batch

    def num_targets(self, batch: dict) -> int:
        return int(batch["start_positions"].numel())

    def loss_from_logits(self, logits, batch):
        return span_loss(logits, batch["start_positions"], batch["end_positions"])

    def feature_output(self, logits_row, feature):
        n = len(feature["input_ids"])
        return logits_row[:n, 0].tolist(), logits_row[:n, 1].tolist()

    def answers(self, model, features, batch_size, autocast) -> dict[str, str]:
        from tunelab.data.qa import postprocess_qa

        rows, _, _ = self.outputs(model, features, batch_size, autocast)
        return postprocess_qa(
            self.examples, features, [r[0] for r in rows], [r[1] for r in rows], max_answer_length=self.max_answer_length
        )

    def evaluate(self, model, features, batch_size, autocast) -> dict:
        predictions = self.answers(model, features, batch_size, autocast)
        references = {e.id: [a["text"] for a in e.answers] for e in self.examples}
        return M.qa_metrics(predictions, references)

    def predict(self, model, features, batch_size, autocast) -> dict[str, str]:
        return self.answers(model, features, batch_size, autocast)


class CausalLMStep(TaskStep):
    """Next-token prediction (plain text, or chat with the loss on assistant tokens only)."""

    head, main_metric, greater_is_better = "lm", "loss", False

    def num_targets(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss(self, model, batch):
        out = model(batch["input_ids"], batch.get("attention_mask"), heads=(),
                    **{k: v for k, v in _inputs(batch).items() if k != "attention_mask"})
        return chunked_lm_loss(out.hidden, batch["labels"], lm_projection(model.heads["lm"]))

    @torch.inference_mode()
    def evaluate(self, model, features, batch_size, autocast) -> dict:
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for _, batch in iterate_batches(features, batch_size, self.pad_token_id):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast():
                loss, n = self.loss(model, batch)
            total, count = total + float(loss), count + n
        mean = total / max(1, count)
        return {"loss": mean, "perplexity": M.perplexity(mean), "tokens": count}


class MaskedLMStep(TaskStep):
    """BERT pretraining: masked LM, with next-sentence prediction when `nsp` (Devlin et al. 2019, sec. 3.1).

    Two objectives, each normalised by its own targets (masked tokens, examples); see train/trainer.py.
    Evaluation scores the validation rows as they were masked once with a fixed seed.
    """

    head, main_metric, greater_is_better = "mlm", "mlm_loss", False

    def __init__(self, nsp: bool = True, pad_token_id: int = 0, nsp_weight: float = 1.0) -> None:
        super().__init__(pad_token_id)
        self.nsp = nsp
        self.loss_weights = {"nsp": nsp_weight} if nsp else {}

    def num_targets(self, batch: dict) -> dict[str, int]:
        counts = {"mlm": int((batch["labels"] != -100).sum())}
        if self.nsp:
            counts["nsp"] = int(batch["next_sentence_label"].numel())
        return counts

    def _backbone(self, model: Model, batch: dict):
        out = model(batch["input_ids"], batch.get("attention_mask"), token_type_ids=batch.get("token_type_ids"),
                    heads=())
        return out.hidden, out.pooled  # [B, T, D], [B, D]

    def loss(self, model, batch):
        hidden, pooled = self._backbone(model, batch)
        mlm, n_masked = masked_lm_loss(hidden, batch["labels"], model.heads["mlm"])
        if not self.nsp:
            return {"mlm": mlm}, {"mlm": n_masked}
        nsp, n_pairs = next_sentence_loss(model.heads["nsp"](hidden, pooled), batch["next_sentence_label"])
        return {"mlm": mlm, "nsp": nsp}, {"mlm": n_masked, "nsp": n_pairs}

    @torch.inference_mode()
    def evaluate(self, model, features, batch_size, autocast) -> dict:
        model.eval()
        device = next(model.parameters()).device
        mlm_loss = nsp_loss = 0.0
        masked = mlm_correct = pairs = nsp_correct = 0
        for _, batch in iterate_batches(features, batch_size, self.pad_token_id):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast():
                hidden, pooled = self._backbone(model, batch)
                keep = batch["labels"] != -100
                targets = batch["labels"][keep]  # [N]
                logits = model.heads["mlm"](hidden[keep]).float()  # [N, V]: masked positions only
                if self.nsp:
                    nsp_logits = model.heads["nsp"](hidden, pooled).float()  # [B, 2]
            mlm_loss += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            mlm_correct += int((logits.argmax(-1) == targets).sum())
            masked += int(targets.numel())
            if self.nsp:
                labels = batch["next_sentence_label"]
                nsp_loss += float(next_sentence_loss(nsp_logits, labels)[0])
                nsp_correct += int((nsp_logits.argmax(-1) == labels).sum())
                pairs += int(labels.numel())
        mean = mlm_loss / max(1, masked)
        metrics = {"mlm_loss": mean, "mlm_perplexity": M.perplexity(mean), "mlm_accuracy": mlm_correct / max(1, masked),
                   "masked_tokens": masked}
        if self.nsp:
            metrics.update(nsp_loss=nsp_loss / max(1, pairs), nsp_accuracy=nsp_correct / max(1, pairs))
        metrics["loss"] = metrics["mlm_loss"] + metrics.get("nsp_loss", 0.0)
        return metrics


class RecurrentLMStep(TaskStep):
    """Next-token prediction for recurrent models with truncated back-propagation through time.

    The step owns the recurrent state carried from one training batch (chunk t of every stream, see
    data/stream.py) to the next, detached so that gradients stop at the chunk boundary; it starts again
    from zeros at chunk 0 (every epoch). The carried state is part of a resumable checkpoint
    (state_dict / load_state_dict), so a resumed run continues exactly. Evaluation reads the whole stream,
    cut into `batch_size` rows, chunk by chunk with the state carried, and scores every token but the first.
    """

    head, main_metric, greater_is_better = "lm", "loss", False
    state_rows_dim = 1  # the carried state's tensors are [1, B, H]: one row per stream (batch row)

    def __init__(self, pad_token_id: int = 0, bptt: int = 35) -> None:
        super().__init__(pad_token_id)
        self.bptt = bptt
        self.state = None  # carried between training batches

    def num_targets(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    def loss(self, model, batch):
        from tunelab.models.rnn import detach_state, state_batch_size

        state = self.state
        if batch.get("chunk", 0) == 0 or (state is not None and state_batch_size(state) != batch["input_ids"].shape[0]):
            state = None  # the streams start again (a new epoch)
        elif state is not None and state[0][0].device != batch["input_ids"].device:  # resumed: read on the CPU
            state = [tuple(t.to(batch["input_ids"].device) for t in layer) for layer in state]
        out = model(batch["input_ids"], batch.get("attention_mask"), state=state, heads=(self.head,))
        self.state = detach_state(out.state)
        return token_loss(out.logits[self.head], batch["labels"])

    def state_dict(self) -> dict:
        from tunelab.models.rnn import state_to_tensors

        return {"state": state_to_tensors(self.state)}

    def load_state_dict(self, data: dict) -> None:
        from tunelab.models.rnn import state_from_tensors

        self.state = state_from_tensors(data.get("state", {}))

    @torch.inference_mode()
    def evaluate(self, model, features, batch_size, autocast) -> dict:
        from tunelab.data.stream import evaluation_rows

        model.eval()
        device = next(model.parameters()).device
        tokens = [token for feature in features for token in feature["input_ids"]]
        inputs, labels = evaluation_rows(tokens, batch_size, self.pad_token_id)  # [R, L]
        total, count, state = 0.0, 0, None
        for start in range(0, inputs.shape[1], self.bptt):
            ids = inputs[:, start : start + self.bptt].to(device)
            targets = labels[:, start : start + self.bptt].to(device)
            with autocast():
                out = model(ids, state=state, heads=(self.head,))
                loss, n = token_loss(out.logits[self.head], targets)
            state = out.state
            total, count = total + float(loss), count + n
        mean = total / max(1, count)
        return {"loss": mean, "perplexity": M.perplexity(mean), "tokens": count}


# ---------------------------------------------------------------------------------------------- generation

METRIC_KEYS = {"bleu": "bleu", "chrf": "chrf", "rouge": "rougeL"}  # configured metric -> the reported key to select on


def generation_metrics(predictions: list[str], references: list[str], metrics: Sequence[str]) -> dict[str, float]:
    """sacreBLEU's BLEU and chrF (0-100) and rouge-score's ROUGE-1/2/L F-measures (0-1) of decoded texts."""
    out: dict[str, float] = {}
    if "bleu" in metrics:
        out["bleu"] = M.bleu(predictions, references)
    if "chrf" in metrics:
        out["chrf"] = M.chrf(predictions, references)
    if "rouge" in metrics:
        out.update(M.rouge(predictions, references))
    return out


class _GenerationTask:
    """What seq2seq and chat-from-pairs share: decode inputs with beam search and score the texts."""

    def _setup(self, metrics: Sequence[str], settings, main_if_none: str = "loss") -> None:
        from tunelab.generate.beam import BeamSettings

        self.metrics = list(metrics)
        self.settings = settings or BeamSettings()
        if self.metrics:
            self.main_metric, self.greater_is_better = METRIC_KEYS[self.metrics[0]], True
        else:
            self.main_metric, self.greater_is_better = main_if_none, False

    def decode(self, model: Model, inputs: list[list[int]], batch_size: int, autocast, tokenizer,
               eos_token_ids=None) -> list[str]:
        from tunelab.generate.beam import beam_search_texts

        texts = beam_search_texts(model, tokenizer, inputs, self.settings, batch_size=batch_size, autocast=autocast,
                                  eos_token_ids=eos_token_ids)
        return [t.strip() for t in texts]


class Seq2SeqStep(_GenerationTask, TaskStep):
    """Encoder-decoder: teacher-forced cross-entropy of the target tokens (label smoothing while training);
    evaluation adds perplexity and, with metrics, BLEU / chrF / ROUGE of beam-searched outputs."""

    head = "lm"

    def __init__(self, tokenizer, examples=None, *, metrics: Sequence[str] = (), settings=None,
                 label_smoothing: float = 0.0) -> None:
        from tunelab.data.seq2seq import target_special_ids
        from tunelab.tokenizer.pair import source_tokenizer, target_tokenizer

        source = source_tokenizer(tokenizer)
        pad = source.pad_token_id if source.pad_token_id is not None else (source.eos_token_id or 0)
        super().__init__(pad)
        self.target_tokenizer = target_tokenizer(tokenizer)
        self.target_pad_token_id = target_special_ids(tokenizer)[2]
        self.examples = examples or []  # TextPairs, one per feature; references are their targets
        self.label_smoothing = label_smoothing
        self._setup(metrics, settings)

    def collate(self, features):
        from tunelab.data.seq2seq import collate_seq2seq

        return collate_seq2seq(features, pad_token_id=self.pad_token_id, target_pad_token_id=self.target_pad_token_id)

    def num_targets(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())

    def loss(self, model, batch, *, label_smoothing: float | None = None):
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        out = model(batch["input_ids"], batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"], heads=())
        return chunked_token_lm_loss(out.hidden, batch["labels"], model.heads["lm"], label_smoothing=smoothing)

    @torch.inference_mode()
    def evaluate(self, model, features, batch_size, autocast) -> dict:
        model.eval()
        device = next(model.parameters()).device
        order = sorted(range(len(features)), key=lambda i: features[i]["length"])
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = self.collate([features[i] for i in order[start : start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss, n = self.loss(model, batch, label_smoothing=0.0)
            total, count = total + float(loss), count + n
        mean = total / max(1, count)
        result: dict[str, Any] = {"loss": mean, "perplexity": M.perplexity(mean), "tokens": count}
        if self.metrics:
            if len(self.examples) != len(features):
                raise ValueError(f"{len(features)} features but {len(self.examples)} reference examples")
            predictions = self.predict(model, features, batch_size, autocast)
            result.update(generation_metrics(predictions, [e.target for e in self.examples], self.metrics))
        return result

    def predict(self, model, features, batch_size, autocast) -> list[str]:
        """The decoded target text of every feature's source, in order."""
        return self.decode(model, [f["input_ids"] for f in features], batch_size, autocast, self.target_tokenizer)


class ChatGenerationStep(_GenerationTask, CausalLMStep):
    """Chat SFT (a decoder-only model on source/target pairs) that also decodes the validation prompts and
    scores the answers against the references with BLEU / chrF / ROUGE."""

    def __init__(self, tokenizer, examples=None, *, metrics: Sequence[str] = (), settings=None,
                 pad_token_id: int = 0) -> None:
        super().__init__(pad_token_id)
        self.tokenizer = tokenizer
        self.examples = examples or []  # Conversations ending with the reference answer
        self._setup(metrics, settings)

    def prompts(self, conversations) -> list[list[int]]:
        """Each conversation up to its last assistant turn, with the assistant's turn opened."""
        prompts = []
        for conversation in conversations:
            messages = conversation.messages
            if messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            prompts.append(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        return prompts

    def evaluate(self, model, features, batch_size, autocast) -> dict:
        result = super().evaluate(model, features, batch_size, autocast)
        if self.metrics and self.examples:
            predictions = self.answers(model, self.examples, batch_size, autocast)
            references = [c.messages[-1]["content"] for c in self.examples]
            result.update(generation_metrics(predictions, references, self.metrics))
        return result

    def answers(self, model, conversations, batch_size, autocast) -> list[str]:
        from tunelab.generate.decode import eos_ids

        return self.decode(model, self.prompts(conversations), batch_size, autocast, self.tokenizer,
                           eos_token_ids=eos_ids(model, self.tokenizer))


def beam_settings(task) -> Any:
    """BeamSettings from a config's task.generation."""
    from tunelab.generate.beam import BeamSettings

    g = task.generation
    return BeamSettings(beam_size=g.beam_size, length_penalty=g.length_penalty, max_new_tokens=g.max_new_tokens)


def make_step(task_type: str, *, labels=None, examples=None, max_answer_length=30, pad_token_id=0,
              nsp: bool = True, bptt: int = 35, tokenizer=None, task=None) -> TaskStep:
    """The step of `task_type`; seq2seq (and chat with task.metrics) also need the tokenizer and the task section,
    as do the preference tasks (their loss and its settings) and grpo (its reward functions and sampling)."""
    if task_type == "seq2seq":
        return Seq2SeqStep(tokenizer, examples, metrics=task.metrics if task else (),
                           settings=beam_settings(task) if task else None,
                           label_smoothing=task.label_smoothing if task else 0.0)
    if task_type == "chat" and task is not None and task.metrics:
        return ChatGenerationStep(tokenizer, examples, metrics=task.metrics, settings=beam_settings(task),
                                  pad_token_id=pad_token_id)
    if task_type == "classification":
        return ClassificationStep(labels, pad_token_id)
    if task_type == "tagging":
        return TaggingStep(labels, examples, pad_token_id)
    if task_type == "qa":
        return QAStep(examples, max_answer_length, pad_token_id)
    if task_type in ("causal_lm", "chat"):
        return CausalLMStep(pad_token_id)
    if task_type == "masked_lm":
        return MaskedLMStep(nsp, pad_token_id, nsp_weight=task.nsp_weight if task else 1.0)
    if task_type == "recurrent_lm":
        return RecurrentLMStep(pad_token_id, bptt)
    if task_type in ("preference", "kto", "reward_model"):
        from tunelab.train.preference import KTOStep, PreferenceStep, RewardModelStep

        if task_type == "reward_model":
            return RewardModelStep(pad_token_id)
        if task_type == "kto":
            return KTOStep(beta=task.beta if task else None, desirable_weight=task.desirable_weight if task else 1.0,
                           undesirable_weight=task.undesirable_weight if task else 1.0, pad_token_id=pad_token_id)
        if task is None:
            return PreferenceStep(pad_token_id=pad_token_id)
        return PreferenceStep(task.loss, beta=task.beta, label_smoothing=task.label_smoothing, gamma=task.gamma,
                              pad_token_id=pad_token_id)
    if task_type == "grpo":
        from tunelab.train.grpo import GRPOStep

        if task is None or tokenizer is None:
            raise ValueError("task grpo needs the task section (its reward functions) and the tokenizer")
        return GRPOStep.from_task(task, tokenizer, pad_token_id)
    raise ValueError(f"unknown task type {task_type!r}")


