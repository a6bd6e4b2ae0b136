"""`tunelab eval` and `tunelab predict`: a run or a model, on its validation split or on a data file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunelab.config.loading import apply_overrides, validate
from tunelab.config.schema import TrainConfig
from tunelab.errors import ConfigError, TunelabError

TASK_OF_HEAD = {"classifier": "classification", "tagger": "tagging", "qa": "qa", "lm": "causal_lm", "mlm": "masked_lm"}

DataFiles = str | list[str] | None  # one file, or several (two line-aligned files of parallel text)


def _source_config(source: str, data: DataFiles, task: str | None, overrides: list[str]):
    """(model, tokenizer, config) for a run directory or a bare model plus --data/--task."""
    from tunelab.train.run import is_run_dir, load_any, load_run

    if isinstance(data, (list, tuple)) and len(data) == 1:
        data = data[0]
    if is_run_dir(source):
        model, tokenizer, config = load_run(source)
        raw = config.model_dump(mode="json")
    else:
        model, tokenizer = load_any(source)
        heads = [h for h in model.heads if h in TASK_OF_HEAD]
        if task is None and model.is_encoder_decoder:
            task = "seq2seq"
        if task is None:
            if not heads:
                raise TunelabError(f"{source}: the model has no task head; say which task with --task")
            task = TASK_OF_HEAD[heads[0]]
            if task == "causal_lm" and model.is_recurrent:
                task = "recurrent_lm"
        if data is None:
            raise TunelabError(f"{source} is a model, not a run: give the data to evaluate with --data FILE")
        raw = {"output_dir": ".", "model": {"source": source}, "task": {"type": task, "labels": model.config.labels or None},
               "data": {"train": data}}
        if task == "masked_lm":
            raw["task"]["nsp"] = "nsp" in model.heads
    if data is not None:
        raw["data"]["train"] = list(data) if isinstance(data, (list, tuple)) else data
        raw["data"]["feedback"] = None  # the file given, not the rows a run built from the feedback store
        raw["data"]["validation"] = None
        raw["data"]["validation_split"] = 0.0
        raw["data"]["max_train_examples"] = None
    if task is not None:
        raw["task"]["type"] = task
    raw = apply_overrides(raw, overrides)
    return model, tokenizer, validate(TrainConfig, raw, "eval options"), data is not None


def _rows(config: TrainConfig, tokenizer, labels: list[str], use_data_file: bool):
    """(features, examples) to evaluate: the whole --data file, or the run's own validation split."""
    from tunelab.train.run import prepare_data

    d = config.data
    if use_data_file and config.task.type == "recurrent_lm":
        from tunelab.data.stream import encode_stream, stream_feature
        from tunelab.data.text import load_text

        documents = load_text(d.train_paths(), format=d.format, text_field=d.text_field)
        return [stream_feature(encode_stream(documents, tokenizer))], []
    if use_data_file and config.task.type == "seq2seq":
        from tunelab.data.seq2seq import encode_seq2seq
        from tunelab.train.run import read_pairs

        pairs = read_pairs(config, d.train_paths())
        return encode_seq2seq(pairs, tokenizer, d.max_length, d.max_target_length or d.max_length).features, pairs
    if use_data_file and config.task.type == "chat":
        from tunelab.data.chat import encode_chat
        from tunelab.train.run import read_conversations

        conversations = read_conversations(config, d.train_paths())
        return encode_chat(conversations, tokenizer, d.max_length, train_on=config.task.train_on).features, conversations
    if use_data_file and config.task.type == "qa":
        from tunelab.data.qa import encode_qa_eval, read_squad

        examples = [e for p in d.train_paths() for e in read_squad(p)]
        return encode_qa_eval(examples, tokenizer, d.max_length, d.stride).features, examples
    if use_data_file and config.task.type == "tagging":
        from tunelab.data.tagging import encode_tagging, load_tagging

        examples = load_tagging(d.train_paths(), labels=labels or None, tokens_field=d.tokens_field,
                                tags_field=d.tags_field, token_column=d.token_column, tag_column=d.tag_column)[0]
        encoded = encode_tagging(examples, tokenizer, labels, d.max_length,
                                 label_all_subwords=config.task.label_all_subwords, context_tokens=d.context_tokens)
        return encoded.features, examples
    if use_data_file and config.task.type == "masked_lm":
        from tunelab.data.pretraining import mask_features
        from tunelab.train.run import masking_collator

        config = config.model_copy(update={"task": config.task.model_copy(update={"dupe_factor": 1})})
        prepared = prepare_data(config, tokenizer)  # the file's pairs, once, masked once like validation rows
        return mask_features(prepared.train.features, masking_collator(config, tokenizer, stream=1)), []
    prepared = prepare_data(config, tokenizer, labels=labels or None)
    if use_data_file:
        return prepared.train.features, []
    if prepared.validation is None:
        raise TunelabError("the run has no validation data; give a file with --data")
    return prepared.validation.features, prepared.validation_examples


def evaluate_source(source: str, *, data: DataFiles = None, task: str | None = None,
                    overrides: list[str] | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """The task's metrics (with `loss`) of a run or model on its validation data or on `data`."""
    import torch

    from tunelab.train.tasks import make_step
    from tunelab.train.trainer import autocast_context, resolve_precision

    from tunelab.train.run import check_task_fits_model

    model, tokenizer, config, use_file = _source_config(source, data, task, overrides or [])
    check_task_fits_model(config, model)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    labels = list(model.config.labels or [])
    features, examples = _rows(config, tokenizer, labels, use_file)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    step = make_step(config.task.type, labels=labels, examples=examples,
                     max_answer_length=config.task.max_answer_length, pad_token_id=pad, nsp=config.task.nsp,
                     bptt=config.data.bptt, tokenizer=tokenizer, task=config.task)
    device = next(model.parameters()).device
    autocast = autocast_context(resolve_precision(config.train.precision, device), device)
    batch_size = batch_size or config.train.eval_batch_size or config.train.batch_size
    if getattr(step, "needs_reference", False):
        _attach_reference(step, model, config, features, source, use_file, batch_size, autocast)
    with torch.inference_mode():
        metrics = step.evaluate(model, features, batch_size, autocast)
    if config.task.type == "qa" and "loss" not in metrics:
        metrics = {"loss": _qa_loss(step, model, config, tokenizer, examples, autocast), **metrics}
    return metrics


def _attach_reference(step, model, config: TrainConfig, features: list, source: str, use_file: bool,
                      batch_size: int, autocast) -> None:
    """Reference log-probabilities for DPO-style implicit rewards: a run's own cache for its validation split
    when it matches; else computed with task.reference, the adapters switched off (a LoRA run), or a full
    fine-tuning run's model.source."""
    from tunelab.peft import lora_modules
    from tunelab.train.preference import REFERENCE_FILE, attach_references, reference_context, reference_model
    from tunelab.train.run import is_run_dir

    run = is_run_dir(source)
    reference = config.task.reference
    if reference is None and run and not lora_modules(model):
        reference = config.model.source  # a fully fine-tuned run: the model it started from
    attach_references(step, model, {"data" if use_file else "validation": features}, batch_size=batch_size,
                      autocast=autocast, context=reference_context(config),
                      cache=Path(source) / REFERENCE_FILE if run and not use_file else None, save=False,
                      reference=lambda: reference_model(model, source=reference, dtype=config.model.dtype,
                                                        trained=True),
                      log=lambda message: None)


def _qa_loss(step, model, config, tokenizer, examples, autocast) -> float:
    from tunelab.data.qa import encode_qa_train

    rows = encode_qa_train(examples, tokenizer, config.data.max_length, config.data.stride).features
    _, loss, count = step.outputs(model, rows, config.train.eval_batch_size or config.train.batch_size, autocast)
    return loss / max(1, count)


def predict_source(source: str, data: DataFiles, out: str, *, task: str | None = None,
                   overrides: list[str] | None = None, batch_size: int | None = None) -> int:
    """Write one JSON line of predictions per input example to `out`; returns the count."""
    from tunelab.train.tasks import make_step
    from tunelab.train.trainer import autocast_context, resolve_precision

    model, tokenizer, config, _ = _source_config(source, data, task, overrides or [])
    labels = list(model.config.labels or [])
    kind = config.task.type
    if kind in ("causal_lm", "recurrent_lm", "grpo") or (kind == "chat" and config.data.instruction is None):
        raise ConfigError(f"predict writes task predictions; for a {kind} model use `tunelab generate`")
    if kind == "masked_lm":
        raise ConfigError("predict writes task predictions; for a masked_lm model use `tunelab fill-mask`")
    if kind in ("preference", "kto", "reward_model"):
        raise ConfigError(f"predict writes task predictions; a {kind} model is scored on preference data with "
                          f"`tunelab eval` (or generates with `tunelab generate`)")
    if kind in ("seq2seq", "chat"):
        records = _generated_records(model, tokenizer, config, batch_size)
        _write_jsonl(records, Path(out))
        return len(records)
    # _predict_rows reads the file without labels / tags (label_field, tags_field are not optional in the schema)
    features, examples = _predict_rows(config, tokenizer, labels)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    step = make_step(kind, labels=labels, examples=examples, max_answer_length=config.task.max_answer_length,
                     pad_token_id=pad)
    device = next(model.parameters()).device
    autocast = autocast_context(resolve_precision(config.train.precision, device), device)
    predictions = step.predict(model, features, batch_size or config.train.batch_size, autocast)
    if kind == "qa":
        records = [{"id": e.id, "question": e.question, "answer": predictions.get(e.id, "")} for e in examples]
    elif kind == "tagging":
        records = [{"tokens": e.tokens, "tags": tags} for e, tags in zip(examples, predictions)]
    else:
        records = [{"text": e.text, **({"text_pair": e.pair} if e.pair is not None else {}), **p}
                   for e, p in zip(examples, predictions)]
    _write_jsonl(records, Path(out))
    return len(records)


def _write_jsonl(records: list[dict], out_path: Path) -> None:
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)


def _generated_records(model, tokenizer, config: TrainConfig, batch_size: int | None) -> list[dict]:
    """seq2seq, and chat from source/target pairs: {"source", "prediction"} per input (and "target" when the
    file has one), decoded with task.generation."""
    from tunelab.train.run import read_pairs
    from tunelab.train.tasks import ChatGenerationStep, Seq2SeqStep, beam_settings
    from tunelab.train.trainer import autocast_context, resolve_precision

    d = config.data
    device = next(model.parameters()).device
    autocast = autocast_context(resolve_precision(config.train.precision, device), device)
    batch_size = batch_size or config.train.eval_batch_size or config.train.batch_size
    pairs = read_pairs(config, d.train_paths(), require_target=False)
    if config.task.type == "seq2seq":
        from tunelab.data.seq2seq import encode_seq2seq

        features = encode_seq2seq(pairs, tokenizer, d.max_length, d.max_target_length or d.max_length).features
        step = Seq2SeqStep(tokenizer, settings=beam_settings(config.task))
        texts = step.predict(model, [{"input_ids": f["input_ids"]} for f in features], batch_size, autocast)
    else:
        from tunelab.data.seq2seq import pairs_to_conversations

        step = ChatGenerationStep(tokenizer, settings=beam_settings(config.task))
        conversations = pairs_to_conversations(pairs, d.instruction)
        texts = step.answers(model, conversations, batch_size, autocast)
    return [{"source": p.source, "prediction": t, **({"target": p.target} if p.target is not None else {})}
            for p, t in zip(pairs, texts)]


def _predict_rows(config: TrainConfig, tokenizer, labels):
    d, kind = config.data, config.task.type
    if kind == "classification":
        from tunelab.data.classification import encode_classification, load_classification

        examples, _ = load_classification(d.train_paths(), format=d.format, text_field=d.text_field,
                                          pair_field=d.text_pair_field, label_field=None)
        return encode_classification(examples, tokenizer, d.max_length).features, examples
    if kind == "tagging":
        from tunelab.data.tagging import encode_tagging, load_tagging

        examples, _ = load_tagging(d.train_paths(), tokens_field=d.tokens_field, tags_field=None, tag_column=None,
                                   token_column=d.token_column, labels=labels)
        return encode_tagging(examples, tokenizer, labels, d.max_length,
                              context_tokens=d.context_tokens).features, examples
    from tunelab.data.qa import encode_qa_eval, read_squad

    examples = [e for p in d.train_paths() for e in read_squad(p)]
    return encode_qa_eval(examples, tokenizer, d.max_length, d.stride).features, examples
