"""`tunelab plan`: what a config will do, before it trains.

Tokenizes the data (examples, rows, tokens, truncations), counts steps and trainable parameters, and
times a real forward and backward pass on the longest batch and on typical ones to estimate peak
memory and the run's duration on this machine. For chat tasks it checks that the chat template used to
build the training data is the one saved with the model.
"""

from __future__ import annotations

import hashlib
import math
import resource
import time
from dataclasses import asdict, dataclass, field

import torch

from tunelab.config.schema import TrainConfig


@dataclass
class Plan:
    task: str
    method: str
    train_examples: int
    train_rows: int
    train_tokens: int
    truncated: int
    skipped: int
    validation_rows: int
    labels: list[str]
    steps_per_epoch: int
    total_steps: int
    batch_size: int
    grad_accum: int
    parameters: int
    trainable_parameters: int
    precision: str
    seconds_per_step: float
    estimated_seconds: float
    peak_memory_bytes: int
    chat_template: dict = field(default_factory=dict)
    reference_seconds: float = 0.0  # preference, kto: the reference pass over train + validation, once
    evaluation_seconds: float = 0.0  # preference, kto: one evaluation of the validation set (forward only); grpo:
    # greedy decoding of the validation prompts

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make_plan(config: TrainConfig, *, timing_steps: int = 4) -> Plan:
    from tunelab.data.samplers import LengthGroupedSampler
    from tunelab.train.run import masking_collator, prepare_data, prepare_model, run_tokenizer, seed_everything
    from tunelab.train.tasks import make_step
    from tunelab.train.trainer import autocast_context, objectives, resolve_precision

    s = config.train
    if s.num_threads:  # as `train` does: the timing must use the threads the run will use
        torch.set_num_threads(s.num_threads)
    tokenizer = run_tokenizer(config, retrain=True, save=False)  # a plan writes nothing to output_dir
    data = prepare_data(config, tokenizer)
    seed_everything(s.seed)
    model, tokenizer = prepare_model(config, data.labels, tokenizer)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    step = make_step(config.task.type, labels=data.labels, examples=data.validation_examples, pad_token_id=pad_id,
                     nsp=config.task.nsp, bptt=config.data.bptt, tokenizer=tokenizer, task=config.task)
    if config.task.type == "masked_lm":
        collate = masking_collator(config, tokenizer)
    else:
        collate = lambda rows, *_: step.collate(rows)  # noqa: E731
    lengths = data.train.lengths
    batches_per_epoch = math.ceil(len(lengths) / s.batch_size)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / s.grad_accum))
    total = s.max_steps if s.max_steps is not None else max(1, math.ceil(s.epochs * steps_per_epoch))
    device = next(model.parameters()).device
    amp = resolve_precision(s.precision, device)
    autocast = autocast_context(amp, device)

    # Time real steps: the longest batch first (peak memory), then typical batches of the epoch order.
    sampler = LengthGroupedSampler(lengths, s.batch_size, seed=s.seed)
    order = sampler.batches()
    longest = max(order, key=lambda b: max(lengths[i] for i in b) * len(b))
    spread = [order[round(k * (len(order) - 1) / max(1, timing_steps))] for k in range(timing_steps + 1)]
    chosen = [longest] + spread  # the longest for memory and warm-up, then batches across the epoch
    reference_seconds = evaluation_seconds = 0.0
    online = getattr(step, "online", False)  # GRPO: collate samples the completions, so it is timed with the step
    if online:
        from tunelab.train.grpo import bind_policy

        bind_policy(step, model, config)
        chosen = chosen[:3]  # each batch samples batch_size x num_generations completions: time fewer
    if getattr(step, "needs_reference", False):  # the timed batches train with their reference log-probabilities
        _time_reference(config, step, model, data, chosen, autocast)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0)  # lr 0: state is allocated, weights do not move
    before = _rss_peak()
    samples: list[tuple[int, float]] = []  # (padded tokens of the batch, seconds)
    for n, indices in enumerate(chosen):
        start = time.perf_counter()
        batch = collate([data.train.features[i] for i in indices], 0)
        if not online:
            start = time.perf_counter()
        with autocast():
            losses, counts = (objectives(x) for x in step.loss(model, batch))
        sum(losses[k] / max(1, counts[k]) for k in losses).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if n > 0:
            padded = batch["input_ids"].numel() + (batch["decoder_input_ids"].numel() if "decoder_input_ids" in batch else 0)
            samples.append((padded, time.perf_counter() - start))
    if online:  # completions are sampled: their length is not known from the data, so the mean timed batch
        seconds_per_step = sum(seconds for _, seconds in samples) / len(samples) * s.grad_accum
        run_seconds = seconds_per_step * total
        evaluation_seconds = _time_online_evaluation(step, model, data, s, autocast)
    else:
        # time ~ a + b * padded tokens, fitted on the timed batches, summed over every batch of the run
        fixed, per_token = _fit_line(samples)
        rows = getattr(step, "rows_per_example", 1)  # preference: a pair is two rows of its length at most
        epoch_seconds = sum(fixed + per_token * max(lengths[i] for i in b) * len(b) * rows for b in order)
        run_seconds = epoch_seconds * total / steps_per_epoch
        seconds_per_step = run_seconds / total
    peak = _rss_peak()
    if getattr(step, "needs_reference", False):  # timed again, warm: the first pass above paid the start-up
        reference_seconds, evaluation_seconds = _time_reference(config, step, model, data, chosen, autocast)
    template = {}
    if config.task.type == "chat":
        template = chat_template_check(config, tokenizer)
    return Plan(
        task=config.task.type, method=config.method.type, train_examples=data.train_examples,
        train_rows=len(data.train.features), train_tokens=sum(lengths), truncated=data.train.num_truncated,
        skipped=data.train.num_skipped, validation_rows=len(data.validation.features) if data.validation else 0,
        labels=list(data.labels), steps_per_epoch=steps_per_epoch, total_steps=total, batch_size=s.batch_size,
        grad_accum=s.grad_accum, parameters=model.num_parameters(),
        trainable_parameters=sum(p.numel() for p in params), precision=str(amp).replace("torch.", "") if amp else "fp32",
        seconds_per_step=seconds_per_step, estimated_seconds=run_seconds,
        peak_memory_bytes=max(peak, before), chat_template=template, reference_seconds=reference_seconds,
        evaluation_seconds=evaluation_seconds,
    )


def _time_reference(config: TrainConfig, step, model, data, batches: list[list[int]], autocast) -> tuple[float, float]:
    """(seconds of the reference pass over the training and validation rows, seconds of one evaluation), from the
    forward-only rate of the reference pass over the timed batches' examples (which then train with them)."""
    from tunelab.train.preference import reference_model

    s = config.train
    timed = [data.train.features[i] for i in sorted({i for b in batches for i in b})]
    row_tokens = lambda features: sum(len(f["prompt_ids"]) * len(step.reference_keys) + sum(  # noqa: E731
        len(f[f"{kind}_ids"]) for kind in step.reference_keys) for f in features)
    start = time.perf_counter()
    with reference_model(model, source=config.task.reference, dtype=config.model.dtype) as reference:
        step.attach_reference(reference, timed, s.eval_batch_size or s.batch_size, autocast)
    per_token = (time.perf_counter() - start) / max(1, row_tokens(timed))
    validation = data.validation.features if data.validation is not None else []
    evaluation = per_token * row_tokens(validation)
    return per_token * row_tokens(data.train.features) + evaluation, evaluation


def _time_online_evaluation(step, model, data, settings, autocast) -> float:
    """Seconds of one GRPO evaluation (greedy decoding of every validation prompt), from one timed batch."""
    if data.validation is None or not data.validation.features:
        return 0.0
    features = data.validation.features
    batch_size = settings.eval_batch_size or settings.batch_size
    timed = features[:batch_size]
    start = time.perf_counter()
    step.evaluate(model, timed, batch_size, autocast)
    return (time.perf_counter() - start) * math.ceil(len(features) / batch_size)


def _fit_line(samples: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of seconds over tokens; a pure per-token rate with < 2 distinct sizes."""
    xs, ys = [x for x, _ in samples], [y for _, y in samples]
    n = len(samples)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0, mean_y / max(1, mean_x)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in samples) / var
    if slope <= 0:
        return 0.0, mean_y / max(1, mean_x)
    return max(0.0, mean_y - slope * mean_x), slope


def template_digest(template: str | None) -> str | None:
    return hashlib.sha256(template.encode()).hexdigest()[:12] if template else None


def chat_template_check(config: TrainConfig, tokenizer) -> dict:
    """The chat template the data is built with, and whether the saved model will carry the same one."""
    from tunelab.errors import ConfigError
    from tunelab.train.run import run_tokenizer

    if not tokenizer.chat_template:
        raise ConfigError(f"model {config.model.name}: the tokenizer has no chat template; a chat task "
                          "needs one (tokenizer_config.json chat_template or chat_template.jinja)")
    source_template = run_tokenizer(config).chat_template
    return {
        "training": template_digest(tokenizer.chat_template),
        "model": template_digest(source_template),
        "same": tokenizer.chat_template == source_template,
        "saved_with_model": True,  # the run saves this tokenizer (and its template) with the model
    }


def format_plan(plan: Plan) -> str:
    gib = plan.peak_memory_bytes / 2**30
    lines = [
        f"task           {plan.task} ({plan.method})",
        f"train data     {plan.train_examples} {'documents' if plan.task == 'masked_lm' else 'examples'} -> "
        f"{plan.train_rows} rows, {plan.train_tokens:,} tokens"
        + (f", {plan.truncated} truncated" if plan.truncated else "")
        + (f", {plan.skipped} skipped" if plan.skipped else ""),
        f"validation     {plan.validation_rows} rows",
    ]
    if plan.labels:
        shown = ", ".join(plan.labels[:12]) + (" ..." if len(plan.labels) > 12 else "")
        lines.append(f"labels         {len(plan.labels)}: {shown}")
    lines += [
        f"steps          {plan.total_steps} ({plan.steps_per_epoch} per epoch; batch {plan.batch_size} x accumulation {plan.grad_accum})",
        f"parameters     {plan.parameters / 1e6:.2f}M, trainable {plan.trainable_parameters / 1e6:.2f}M "
        f"({100 * plan.trainable_parameters / max(1, plan.parameters):.2f}%)",
        f"precision      {plan.precision}",
        f"time           {plan.seconds_per_step:.2f} s per step -> about {_duration(plan.estimated_seconds)} "
        "(training only, measured on this machine)",
        f"peak memory    about {gib:.2f} GiB (process peak during a step on the longest batch)",
    ]
    if plan.reference_seconds:
        lines.insert(-2, f"reference      about {_duration(plan.reference_seconds)} once before training (reference "
                         f"log-probabilities of the train and validation rows); each evaluation about "
                         f"{_duration(plan.evaluation_seconds)}")
    if plan.task == "grpo":
        lines.insert(-2, "sampling       included in the time per step (sampled by the untrained model: completions "
                         "that get shorter while training make later steps faster)"
                     + (f"; each evaluation about {_duration(plan.evaluation_seconds)}"
                        if plan.evaluation_seconds else ""))
    if plan.chat_template:
        t = plan.chat_template
        verdict = "same as the model's" if t["same"] else "DIFFERENT from the model's"
        lines.append(f"chat template  {t['training']} ({verdict}; saved with the trained model)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
