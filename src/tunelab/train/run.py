"""A training run from a TrainConfig: data, model, method, trainer, final model, report.

Run directory:
    config.yaml        the resolved config (what `--resume` and `tunelab eval RUN` read back)
    env.json           versions and machine
    tokenizer/         the tokenizer trained for this run (model.train_tokenizer)
    metrics.jsonl      train and validation metrics, one JSON object per line
    samples.jsonl      text generated from train.sample_prompts at each evaluation (language models)
    tensorboard/       TensorBoard event files
    checkpoint-N/      resumable checkpoints (trained weights, optimizer, scheduler, RNG, data position)
    checkpoint-best/   weights of the best evaluation so far
    reference_logps.safetensors   preference, kto: the reference model's log-probabilities, computed once
    feedback_data.jsonl  data.feedback: the training rows built from the feedback store (tunelab.feedback.build)
    mix_data.jsonl     data.feedback.mix_with: the original examples mixed in
    samples.jsonl      grpo: greedy completions of the first validation prompts with their rewards, per evaluation
    model/             the final model as a Hugging Face directory (full and freeze)
    adapter/           the final adapter in PEFT's format, with the tokenizer (lora, dora, qlora)
    metrics.json       the final validation metrics; report.md and plots/ with the curves
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.config.loading import dump_config, load_config, read_yaml, validate
from tunelab.config.schema import TrainConfig
from tunelab.errors import ConfigError, DataError, TunelabError

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
FEEDBACK_DATA_FILE = "feedback_data.jsonl"
MIX_DATA_FILE = "mix_data.jsonl"


@dataclass
class PreparedData:
    """What a task needs, encoded: training rows, validation rows, label names, validation examples."""

    train: Any  # EncodedDataset
    validation: Any | None
    labels: list[str] = field(default_factory=list)
    validation_examples: list = field(default_factory=list)
    train_examples: int = 0


def reuse_large_allocations() -> None:
    """Have glibc's malloc keep freed large blocks for reuse instead of unmapping them at once.

    A training step allocates and frees hundreds of megabytes (activations, chunks of logits). By default every
    block above malloc's mmap threshold is a new mapping, and its pages fault in again on first touch: on this
    project's 2-core machine that made a fused cross-entropy over 2,048 x 49,152 logits take 0.96 s instead of
    0.59. Freed memory stays with the process for its next step; the peak is unchanged. A no-op without glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- data


def _limit(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


def _split(config: TrainConfig, train: list, validation: list | None, splitter=None):
    d = config.data
    if validation is not None:
        return train, validation
    if d.validation_split <= 0:
        return train, []
    from tunelab.data.readers import split_train_validation

    return (splitter or split_train_validation)(train, d.validation_split, config.train.seed)


def prepare_data(config: TrainConfig, tokenizer, *, labels: list[str] | None = None) -> PreparedData:
    """Read, split and encode the config's data for its task."""
    preparer = DATA_PREPARERS.get(config.task.type)
    if preparer is None:
        raise ConfigError(f"task.type {config.task.type!r} is not trainable yet")
    config = with_feedback_rows(config)
    return preparer(config, tokenizer, labels or config.task.labels)


def feedback_data_files(config: TrainConfig) -> list[Path]:
    """The files in the run directory that hold the training rows of data.feedback: the rows built from the store,
    and with data.feedback.mix_with the original examples mixed in."""
    run_dir = Path(config.output_dir)
    mixed = [run_dir / MIX_DATA_FILE] if config.data.feedback and config.data.feedback.mix_with else []
    return [run_dir / FEEDBACK_DATA_FILE, *mixed]


def with_feedback_rows(config: TrainConfig) -> TrainConfig:
    """The config to read data with: with data.feedback, data.train becomes the rows built into the run directory
    (by `tunelab train`, or tunelab.feedback.build_run_data; train must not import feedback, which sits above it)."""
    if config.data.feedback is None:
        return config
    files = feedback_data_files(config)
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: the training rows of data.feedback are not built yet; `tunelab train` builds "
                            f"them from the feedback store (from Python: tunelab.feedback.build_run_data(config))")
    data = config.data.model_copy(update={"train": [str(path) for path in files], "feedback": None})
    return config.model_copy(update={"data": data})


def _prepare_classification(config: TrainConfig, tokenizer, labels) -> PreparedData:
    from tunelab.data.classification import encode_classification, load_classification

    d = config.data
    kw = dict(format=d.format, text_field=d.text_field, pair_field=d.text_pair_field, label_field=d.label_field)
    train, labels = load_classification(d.train_paths(), labels=labels, **kw)
    validation = load_classification(d.validation_paths(), labels=labels, **kw)[0] if d.validation_paths() else None
    train, validation = _split(config, train, validation)
    train, validation = _limit(train, d.max_train_examples), _limit(validation, d.max_validation_examples)
    encode = lambda ex: encode_classification(ex, tokenizer, d.max_length)  # noqa: E731
    return PreparedData(encode(train), encode(validation) if validation else None, labels, validation, len(train))


def _prepare_tagging(config: TrainConfig, tokenizer, labels) -> PreparedData:
    from tunelab.data.tagging import encode_tagging, load_tagging

    d, task = config.data, config.task
    kw = dict(format="auto" if d.format == "conll" else d.format, tokens_field=d.tokens_field, tags_field=d.tags_field,
              token_column=d.token_column, tag_column=d.tag_column)
    train, labels = load_tagging(d.train_paths(), labels=labels, **kw)
    validation = load_tagging(d.validation_paths(), labels=labels, **kw)[0] if d.validation_paths() else None
    train, validation = _split(config, train, validation)
    train, validation = _limit(train, d.max_train_examples), _limit(validation, d.max_validation_examples)
    encode = lambda ex: encode_tagging(ex, tokenizer, labels, d.max_length,  # noqa: E731
                                       label_all_subwords=task.label_all_subwords, context_tokens=d.context_tokens)
    return PreparedData(encode(train), encode(validation) if validation else None, labels, validation, len(train))


def _prepare_qa(config: TrainConfig, tokenizer, labels) -> PreparedData:
    from tunelab.data.qa import encode_qa_eval, encode_qa_train, read_squad, split_by_article

    d = config.data
    train = [e for p in d.train_paths() for e in read_squad(p)]
    validation = [e for p in d.validation_paths() for e in read_squad(p)] if d.validation_paths() else None
    train, validation = _split(config, train, validation, splitter=split_by_article)
    train, validation = _limit(train, d.max_train_examples), _limit(validation, d.max_validation_examples)
    train_rows = encode_qa_train(train, tokenizer, d.max_length, d.stride)
    val_rows = encode_qa_eval(validation, tokenizer, d.max_length, d.stride) if validation else None
    return PreparedData(train_rows, val_rows, [], validation, len(train))


def read_conversations(config: TrainConfig, paths: list[str], *, final_assistant: bool = True) -> list:
    """The chat task's conversations of `paths`: chat records, or source/target pairs made into a user turn
    (data.instruction + source) and the answer (the target)."""
    d, fmt = config.data, config.data.format
    if d.instruction is not None:
        from tunelab.data.seq2seq import load_pairs, pairs_to_conversations

        pairs = load_pairs(paths, format=fmt, source_field=d.source_field, target_field=d.target_field,
                           require_target=final_assistant)
        return pairs_to_conversations(pairs, d.instruction)
    from tunelab.data.chat import load_chat

    chat_format = fmt if fmt in ("alpaca", "sharegpt", "messages") else "auto"
    file_format = fmt if chat_format == "auto" else "auto"
    return load_chat(paths, format=chat_format, file_format=file_format, final_assistant=final_assistant)


def read_pairs(config: TrainConfig, paths: list[str], *, require_target: bool = True) -> list:
    """The seq2seq task's TextPairs of `paths` (two parallel files, or records with the source / target fields)."""
    from tunelab.data.seq2seq import load_pairs

    d = config.data
    return load_pairs(paths, format=d.format, source_field=d.source_field, target_field=d.target_field,
                      require_target=require_target)


def _prepare_chat(config: TrainConfig, tokenizer, labels) -> PreparedData:
    from tunelab.data.chat import encode_chat

    d = config.data
    train = read_conversations(config, d.train_paths())
    validation = read_conversations(config, d.validation_paths()) if d.validation_paths() else None
    train, validation = _split(config, train, validation)
    train, validation = _limit(train, d.max_train_examples), _limit(validation, d.max_validation_examples)
    encode = lambda ex: encode_chat(ex, tokenizer, d.max_length, train_on=config.task.train_on)  # noqa: E731
    return PreparedData(encode(train), encode(validation) if validation else None, [], validation, len(train))


def _prepare_causal_lm(config: TrainConfig, tokenizer, labels) -> PreparedData:
    from tunelab.data.text import ShiftingWindows, encode_causal_lm, load_text

    d = config.data
    shifting = d.random_offsets and d.packing
    read = dict(format=d.format, text_field=d.text_field, documents="file" if d.documents == "auto" else d.documents)
    train = load_text(d.train_paths(), **read)
    validation = load_text(d.validation_paths(), **read) if d.validation_paths() else None
    encode = lambda docs, **kw: encode_causal_lm(docs, tokenizer, d.max_length, packing=d.packing, **kw)  # noqa: E731
    if validation is None and len(train) == 1 and d.validation_split > 0:
        # one corpus file (tinyshakespeare): hold out the last fraction of its rows, as nanoGPT does
        rows = encode(train)
        cut = len(rows.features) - max(1, round(len(rows.features) * d.validation_split)) if len(rows) > 1 else 1
        train_features = rows.features[:cut]
        if shifting:
            train_features = ShiftingWindows.from_rows(train_features, d.max_length, seed=config.train.seed)
        train_rows = type(rows)(train_features, num_examples=1, num_truncated=rows.num_truncated)
        val_rows = type(rows)(rows.features[cut:], num_examples=1) if rows.features[cut:] else None
    else:
        train, validation = _split(config, train, validation)
        train_rows = encode(train, random_offsets=shifting, seed=config.train.seed)
        val_rows = encode(validation) if validation else None
    # rows are the examples of a language model: max_*_examples limit them
    if isinstance(train_rows.features, ShiftingWindows):
        train_rows.features.truncate(d.max_train_examples)
    else:
        train_rows.features = _limit(train_rows.features, d.max_train_examples)
    if val_rows is not None:
        val_rows.features = _limit(val_rows.features, d.max_validation_examples)
    return PreparedData(train_rows, val_rows, [], validation or [], len(train))


def _prepare_masked_lm(config: TrainConfig, tokenizer, labels) -> PreparedData:
    """Documents split into sentences, cut into BERT examples once (seeded); validation rows masked once."""
    from tunelab.data.pretraining import encode_pretraining, load_documents, mask_features

    d = config.data
    kw = dict(format=d.format, text_field=d.text_field, documents="paragraph" if d.documents == "auto" else d.documents,
              unk_token=tokenizer.unk_token)
    train = load_documents(d.train_paths(), **kw)
    validation = load_documents(d.validation_paths(), **kw) if d.validation_paths() else None
    train, validation = _split(config, train, validation)  # held out by document
    settings = pair_settings(config)
    seed = config.train.seed
    train_rows = encode_pretraining(train, tokenizer, settings, seed=seed)
    train_rows.features = _limit(train_rows.features, d.max_train_examples)
    val_rows = None
    if validation:
        val_rows = encode_pretraining(validation, tokenizer, replace(settings, dupe_factor=1), seed=seed + 1)
        val_rows.features = mask_features(_limit(val_rows.features, d.max_validation_examples),
                                          masking_collator(config, tokenizer, stream=1))
    return PreparedData(train_rows, val_rows, [], [], len(train))


def pair_settings(config: TrainConfig):
    """How a masked_lm run cuts its documents into examples (data/pretraining.py)."""
    from tunelab.data.pretraining import PairSettings

    t = config.task
    return PairSettings(max_length=config.data.max_length, nsp=t.nsp, short_seq_probability=t.short_seq_probability,
                        dupe_factor=t.dupe_factor, whole_word=t.whole_word_masking)


def masking_collator(config: TrainConfig, tokenizer, *, stream: int = 0):
    """The masked_lm collator: pads and masks a batch as task.mask_* say; stream 0 trains, 1 validates (at
    task.final_mask_probability when it is set)."""
    from tunelab.data.pretraining import MaskedLMCollator, MaskingSettings

    t = config.task
    settings = MaskingSettings(probability=t.mask_probability, mask_token_fraction=t.mask_token_fraction,
                               random_token_fraction=t.random_token_fraction, whole_word=t.whole_word_masking,
                               final_probability=t.final_mask_probability)
    return MaskedLMCollator.for_tokenizer(tokenizer, settings, seed=config.train.seed, stream=stream)


def _prepare_recurrent_lm(config: TrainConfig, tokenizer, labels) -> PreparedData:
    """One token stream: training chunks of data.bptt tokens in train.batch_size parallel streams; the
    validation stream as one feature (the last validation_split of the tokens when there is no file)."""
    from tunelab.data.encoded import EncodedDataset
    from tunelab.data.stream import encode_stream, stream_chunks, stream_feature
    from tunelab.data.text import load_text

    d = config.data
    read = lambda paths: load_text(paths, format=d.format, text_field=d.text_field)  # noqa: E731
    documents = read(d.train_paths())
    train = encode_stream(documents, tokenizer)
    validation = encode_stream(read(d.validation_paths()), tokenizer) if d.validation_paths() else None
    if validation is None and d.validation_split > 0:
        cut = len(train) - max(2, round(len(train) * d.validation_split))
        train, validation = train[:cut], train[cut:]
    # rows (chunks) are the examples of a language model: max_*_examples limit the stream to that many chunks
    if d.max_train_examples is not None:
        train = train[: d.max_train_examples * d.bptt + 1]
    if validation is not None and d.max_validation_examples is not None:
        validation = validation[: d.max_validation_examples * d.bptt + 1]
    train_rows = stream_chunks(train, config.train.batch_size, d.bptt)
    train_rows.num_examples = len(documents)
    val_rows = EncodedDataset([stream_feature(validation)], num_examples=1) if validation else None
    return PreparedData(train_rows, val_rows, [], [], len(documents))


def _prepare_seq2seq(config: TrainConfig, tokenizer, labels) -> PreparedData:
    from tunelab.data.seq2seq import encode_seq2seq

    d = config.data
    train = read_pairs(config, d.train_paths())
    validation = read_pairs(config, d.validation_paths()) if d.validation_paths() else None
    train, validation = _split(config, train, validation)
    train, validation = _limit(train, d.max_train_examples), _limit(validation, d.max_validation_examples)
    encode = lambda pairs: encode_seq2seq(pairs, tokenizer, d.max_length, d.max_target_length or d.max_length)  # noqa: E731
    return PreparedData(encode(train), encode(validation) if validation else None, [], validation or [], len(train))


def preference_formats(data_format: str) -> tuple[str, str]:
    """(record format, file format) of a preference task's data.format (data/preference.py)."""
    if data_format in ("jsonl", "json", "parquet"):
        return "auto", data_format
    return {"preference": "prompt"}.get(data_format, data_format), "auto"


def read_preferences(config: TrainConfig, paths: list[str]) -> tuple[list, list[str]]:
    """(PreferencePairs, skipped records with the reason) of `paths`, in the format data.format names."""
    from tunelab.data.preference import load_preferences

    record_format, file_format = preference_formats(config.data.format)
    return load_preferences(paths, format=record_format, file_format=file_format)


def read_labeled(config: TrainConfig, paths: list[str]) -> tuple[list, list[str]]:
    """(LabeledCompletions, skipped) for KTO: labelled answers, and each preference pair as a good and a bad one."""
    from tunelab.data.preference import load_labeled

    record_format, file_format = preference_formats(config.data.format)
    return load_labeled(paths, format=record_format, file_format=file_format)


def _split_by_source(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of the records (by item.source), so that the examples of one record (KTO: a pair's
    good and bad answer) stay on one side."""
    from tunelab.data.readers import split_train_validation

    sources = list(dict.fromkeys(item.source for item in items))
    held_out = set(split_train_validation(sources, fraction, seed)[1])
    return ([item for item in items if item.source not in held_out],
            [item for item in items if item.source in held_out])


def _with_skipped(rows, skipped: list[str]):
    """Count the records the reader left out as skipped examples of the encoded rows."""
    rows.num_examples += len(skipped)
    rows.num_skipped += len(skipped)
    rows.skipped_reasons = list(skipped) + rows.skipped_reasons
    return rows


def _prepare_preference(config: TrainConfig, tokenizer, labels) -> PreparedData:
    """Preference pairs (task preference, and reward_model with the label "reward": a one-output scalar head)."""
    from tunelab.data.preference import encode_preferences

    d = config.data
    train, skipped = read_preferences(config, d.train_paths())
    validation, val_skipped = read_preferences(config, d.validation_paths()) if d.validation_paths() else (None, [])
    train, validation = _split(config, train, validation)
    train, validation = _limit(train, d.max_train_examples), _limit(validation, d.max_validation_examples)
    reward_model = config.task.type == "reward_model"
    encode = lambda pairs: encode_preferences(pairs, tokenizer, d.max_length,  # noqa: E731
                                              max_prompt_length=d.max_prompt_length, special_tokens=reward_model)
    train_rows = _with_skipped(encode(train), skipped)
    val_rows = _with_skipped(encode(validation), val_skipped) if validation else None
    return PreparedData(train_rows, val_rows, ["reward"] if reward_model else [], validation or [], len(train))


def _prepare_kto(config: TrainConfig, tokenizer, labels) -> PreparedData:
    """Labelled single answers for KTO; a pair's two answers stay in the same split."""
    from tunelab.data.preference import encode_labeled

    d = config.data
    train, skipped = read_labeled(config, d.train_paths())
    validation, val_skipped = read_labeled(config, d.validation_paths()) if d.validation_paths() else (None, [])
    train, validation = _split(config, train, validation, splitter=_split_by_source)
    train, validation = _limit(train, d.max_train_examples), _limit(validation, d.max_validation_examples)
    encode = lambda examples, seed: encode_labeled(examples, tokenizer, d.max_length,  # noqa: E731
                                                   max_prompt_length=d.max_prompt_length, seed=seed)
    train_rows = _with_skipped(encode(train, config.train.seed), skipped)
    val_rows = _with_skipped(encode(validation, config.train.seed + 1), val_skipped) if validation else None
    return PreparedData(train_rows, val_rows, [], validation or [], len(train))


def _prepare_grpo(config: TrainConfig, tokenizer, labels) -> PreparedData:
    """Prompt records for online GRPO (train/grpo.py)."""
    from tunelab.train.grpo import prepare_grpo

    return prepare_grpo(config, tokenizer, labels)


# task type -> (config, tokenizer, labels) -> PreparedData; each task's data module does the reading and encoding
DATA_PREPARERS = {
    "classification": _prepare_classification,
    "tagging": _prepare_tagging,
    "qa": _prepare_qa,
    "chat": _prepare_chat,
    "causal_lm": _prepare_causal_lm,
    "masked_lm": _prepare_masked_lm,
    "recurrent_lm": _prepare_recurrent_lm,
    "seq2seq": _prepare_seq2seq,
    "preference": _prepare_preference,
    "kto": _prepare_kto,
    "reward_model": _prepare_preference,
    "grpo": _prepare_grpo,
}


# ---------------------------------------------------------------------------------------------- model

# task type -> the heads it trains (the first one carries the labels of labelled tasks)
HEADS_OF_TASK: dict[str, tuple[str, ...]] = {
    "classification": ("classifier",), "tagging": ("tagger",), "qa": ("qa",), "causal_lm": ("lm",), "chat": ("lm",),
    "masked_lm": ("mlm", "nsp"), "recurrent_lm": ("lm",), "seq2seq": ("lm",),
    "preference": ("lm",), "kto": ("lm",), "reward_model": ("classifier",),  # a reward model: one output
    "grpo": ("lm",),
}


def task_heads(config: TrainConfig) -> tuple[str, ...]:
    """The heads a run trains: HEADS_OF_TASK, without "nsp" for masked_lm with task.nsp false."""
    heads = HEADS_OF_TASK[config.task.type]
    if config.task.type == "masked_lm" and not config.task.nsp:
        heads = tuple(h for h in heads if h != "nsp")
    return heads


def prepare_model(config: TrainConfig, labels: list[str], tokenizer=None):
    """The model (with exactly the task's heads, new ones made fresh) and tokenizer; the method applied.

    `tokenizer`: the one the data was encoded with, when the caller has it already (else run_tokenizer's).
    """
    from tunelab.models.registry import ensure_pooler, init_weights, make_head

    model, tokenizer = build_or_load(config, tokenizer)
    heads = task_heads(config)
    check_task_fits_model(config, model)
    if labels:
        if heads[0] in model.heads and list(model.config.labels) != list(labels):
            del model.heads[heads[0]]  # a head trained for other labels: start a fresh one
        model.config.labels = list(labels)
    if "lm" in heads and "lm" not in model.heads and not (model.is_decoder or model.is_encoder_decoder):
        raise ConfigError(f"model {config.model.name}: this model has no language-model head; "
                          f"task {config.task.type} needs a decoder with one")
    if "mlm" in heads and (model.is_decoder or model.family != "bert"):
        raise ConfigError(f"model {config.model.name}: task masked_lm needs a BERT-family encoder, "
                          f"not a {model.config.model_type} decoder")
    if "nsp" in heads and model.config.model_type != "bert":
        raise ConfigError(f"model {config.model.name}: next-sentence prediction is BERT's (BertForPreTraining); "
                          f"a {model.config.model_type} model pretrains with task.nsp=false")
    # from scratch, the whole model starts from the same N(0, 0.02); a recurrent model's new head too, so that
    # a pretrained and a from-scratch recurrent classifier start their heads alike
    fresh_heads_init = config.model.architecture is not None or model.is_recurrent
    pooler = ensure_pooler(model, heads)  # BertForMaskedLM checkpoints have none; NSP and BERT's classifier need it
    if pooler is not None and config.model.architecture is not None:
        pooler.apply(init_weights)
    for head in heads:
        if head not in model.heads:
            new_head = make_head(model.config, head, len(labels) if labels and head == heads[0] else None)
            if fresh_heads_init:
                new_head.apply(init_weights)
            model.add_head(head, new_head.to(next(model.parameters()).dtype))
    for name in [n for n in model.heads if n not in heads]:
        del model.heads[name]
    apply_method(model, config)
    return model, tokenizer


def check_task_fits_model(config: TrainConfig, model) -> None:
    """Recurrent models train on token streams (recurrent_lm), Transformers on rows (causal_lm, chat); seq2seq
    needs an encoder-decoder."""
    task = config.task.type
    if task == "recurrent_lm" and not model.is_recurrent:
        raise ConfigError(f"model {config.model.name}: task recurrent_lm needs a recurrent model (family rnn); "
                          f"for a {model.family} model use task causal_lm")
    if task in ("causal_lm", "chat") and model.is_recurrent:
        raise ConfigError(f"model {config.model.name}: a recurrent model learns language modelling with task "
                          f"recurrent_lm (a token stream with its state carried), not {task}")
    if task in ("preference", "kto", "grpo") and (not model.is_decoder or model.is_recurrent
                                                  or model.is_encoder_decoder):
        raise ConfigError(f"model {config.model.name} ({model.config.model_type}): task {task} scores the answers "
                          f"with a Transformer decoder's language-model head (GPT-2, Llama family)")
    if task == "reward_model" and (model.is_recurrent or model.is_encoder_decoder):
        raise ConfigError(f"model {config.model.name} ({model.config.model_type}): a reward model is a Transformer "
                          f"encoder or decoder with a scalar head")
    if task == "seq2seq" and not model.is_encoder_decoder:
        raise ConfigError(f"model {config.model.name} ({model.config.model_type}) is not an encoder-decoder; task "
                          f"seq2seq needs one: model.architecture with family seq2seq, a trained seq2seq model, or "
                          f"a BERT model with model.warm_start: bert2bert")


def build_or_load(config: TrainConfig, tokenizer=None):
    """(model, tokenizer): the trained model of model.source, or a fresh one of model.architecture.

    `tokenizer`: the run's tokenizer when the caller has it already (else run_tokenizer(config) is used).
    """
    if config.model.source is not None:
        model, own_tokenizer = load_any(config.model.source, dtype=config.model.dtype)
        if config.model.tokenizer is not None:
            tokenizer = tokenizer if tokenizer is not None else run_tokenizer(config)
        else:
            tokenizer = own_tokenizer
        if config.model.warm_start == "bert2bert" and not model.is_encoder_decoder:
            model = bert2bert(model, tokenizer, config)
        return model, tokenizer
    from tunelab.checkpoint.load import parse_dtype
    from tunelab.models.registry import build_model, config_from_architecture, mimetic_init

    tokenizer = tokenizer if tokenizer is not None else run_tokenizer(config)
    ids = _special_ids(tokenizer)
    try:
        model_config = config_from_architecture(config.model.architecture, **ids)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.architecture.vocab_size {model_config.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.vocab_size} ids ({config.model.tokenizer or 'model.train_tokenizer'})")
    model = build_model(model_config)
    if config.model.init == "mimetic":
        mimetic_init(model)
    return model.to(parse_dtype(config.model.dtype)), tokenizer


def _special_ids(tokenizer) -> dict:
    """Vocabulary size and special-token ids a model built from scratch takes from its tokenizer; with separate
    source and target tokenizers (a TokenizerPair), the ids are the target's and target_vocab_size is set."""
    from tunelab.tokenizer.pair import TokenizerPair

    target = tokenizer.target if isinstance(tokenizer, TokenizerPair) else tokenizer
    first = lambda *ids: next((i for i in ids if i is not None), None)  # noqa: E731
    ids = {"vocab_size": tokenizer.vocab_size, "pad_token_id": target.pad_token_id,
           "bos_token_id": first(target.bos_token_id, target.cls_token_id),
           "eos_token_id": first(target.eos_token_id, target.sep_token_id)}
    if isinstance(tokenizer, TokenizerPair):
        ids["target_vocab_size"] = target.vocab_size
    return ids


def bert2bert(bert, tokenizer, config: TrainConfig):
    """An encoder-decoder warm-started from a BERT-family model (Rothe et al. 2020): its layers copied into both
    stacks, fresh cross-attention, the output projection tied to the decoder's word embeddings."""
    from tunelab.models.registry import build_model
    from tunelab.models.seq2seq import Seq2SeqConfig, warm_start_from_bert

    c = bert.config
    if c.model_type != "bert" or getattr(c, "position_style", "") != "absolute":
        raise ConfigError(f"model.warm_start: bert2bert needs a BERT-architecture model (BERT, MiniLM) as "
                          f"model.source; {config.model.source} is {c.model_type}")
    ids = _special_ids(tokenizer)
    s2s = Seq2SeqConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_layers, num_heads=c.num_heads,
        intermediate_size=c.intermediate_size, activation=c.hidden_act, dropout=c.hidden_dropout,
        attention_dropout=c.attention_dropout, max_position_embeddings=c.max_position_embeddings,
        layer_norm_eps=c.layer_norm_eps, type_vocab_size=c.type_vocab_size, embeddings="bert",
        pad_token_id=ids["pad_token_id"], bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
    )
    model = build_model(s2s)
    warm_start_from_bert(model, bert)
    return model.to(next(bert.parameters()).dtype)


def run_tokenizer(config: TrainConfig, *, retrain: bool = False, save: bool = True):
    """The tokenizer a run encodes its data with: model.tokenizer if given (a tokenizer directory or file, or any
    model source), the one model.train_tokenizer trains, else the source's own; with model.target_tokenizer, a
    TokenizerPair of both.

    A trained tokenizer is kept in output_dir/tokenizer/ (when `save`) and read back from there by later calls
    and by a resumed run; `retrain` trains it again (a new run).
    """
    if config.model.train_tokenizer is not None:
        tokenizer = _trained_tokenizer(config, retrain=retrain, save=save)
    else:
        tokenizer = load_any_tokenizer(config.model.tokenizer or config.model.source)
    if config.model.target_tokenizer is not None:
        from tunelab.tokenizer.pair import TokenizerPair, source_tokenizer

        return TokenizerPair(source_tokenizer(tokenizer), load_any_tokenizer(config.model.target_tokenizer))
    return tokenizer


def _trained_tokenizer(config: TrainConfig, *, retrain: bool, save: bool):
    from tunelab.data.readers import FORMATS
    from tunelab.tokenizer import Tokenizer, train_tokenizer

    directory = Path(config.output_dir) / TOKENIZER_DIR
    if not retrain and (directory / "tokenizer.json").exists():
        return Tokenizer.from_dir(directory)
    d, spec = config.data, config.model.train_tokenizer
    if d.format not in ("auto", *FORMATS):
        raise ConfigError(f"model.train_tokenizer reads data.train as text files ({', '.join(FORMATS)}); "
                          f"data.format {d.format!r} is not one of them: train a tokenizer with `tunelab tokenizer "
                          f"train` and give it as model.tokenizer")
    tokenizer = train_tokenizer(d.train_paths(), type=spec.type, vocab_size=spec.vocab_size,
                                min_frequency=spec.min_frequency, lowercase=spec.lowercase,
                                special_tokens=spec.special_tokens, limit_alphabet=spec.limit_alphabet,
                                format=d.format, text_field=d.text_field)
    if save:
        tokenizer.save(directory)
    return tokenizer


def apply_method(model, config: TrainConfig) -> None:
    method = config.method
    heads = task_heads(config)
    if method.type == "full":
        return
    if method.type == "freeze":
        from tunelab.peft.freeze import freeze

        freeze(model, embeddings=method.freeze_embeddings, first_n_layers=method.freeze_layers)
        return
    from tunelab.peft import LoraSettings, apply_lora

    if config.task.type == "masked_lm":
        raise ConfigError(f"task masked_lm trains with method full or freeze, not {method.type} (the masked-LM "
                          "decoder shares its weight with the token embeddings)")
    lora = method.lora
    new_head = [f"heads.{head}" for head in heads if head != "lm"]
    apply_lora(model, LoraSettings(
        r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=list(lora.target_modules),
        rslora=lora.rslora, dora=method.type == "dora", quantize_base=method.type == "qlora",
        modules_to_save=new_head,
    ))


def is_run_dir(path: str | Path) -> bool:
    """A tunelab run directory (config.yaml of a run), as opposed to an HF model directory."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / CONFIG_FILE).exists() and not (path / "config.json").exists()


def load_any(source: str, *, dtype=None):
    """A model and tokenizer from a registered name, HF directory, GGUF file or tunelab run directory."""
    if is_run_dir(source):
        return load_run(source, dtype=dtype)[:2]
    from tunelab.checkpoint.load import load

    return load(source, dtype=dtype)


def load_any_tokenizer(source: str):
    """The tokenizer of any model source, without reading weights (except for run directories)."""
    if is_run_dir(source):
        from tunelab.tokenizer.pair import TokenizerPair

        path = Path(source).expanduser()
        for sub in ("model", "adapter"):
            if (path / sub / "tokenizer.json").exists():
                return TokenizerPair.from_dir(path / sub)
        return run_tokenizer(resume_config(path))
    from tunelab.checkpoint.load import load_tokenizer

    return load_tokenizer(source)


def load_run(run_dir: str | Path, *, dtype=None):
    """(model, tokenizer, config) of a finished run: its model/ directory, or its base + adapter/."""
    run_dir = Path(run_dir)
    config = validate(TrainConfig, read_yaml(run_dir / CONFIG_FILE), str(run_dir / CONFIG_FILE))
    from tunelab.checkpoint.load import load

    if (run_dir / "model").is_dir():
        model, tokenizer = load(run_dir / "model", dtype=dtype or config.model.dtype)
        return model, tokenizer, config
    if (run_dir / "adapter").is_dir():
        from tunelab.peft import load_peft_adapter
        from tunelab.tokenizer import Tokenizer

        model, tokenizer = load_any(config.model.source, dtype=dtype or config.model.dtype)
        labels = json.loads((run_dir / "labels.json").read_text()) if (run_dir / "labels.json").exists() else []
        heads = task_heads(config)
        if labels:
            from tunelab.models.registry import make_head

            model.config.labels = labels
            if heads[0] in model.heads:
                del model.heads[heads[0]]
            model.add_head(heads[0], make_head(model.config, heads[0], len(labels)))
        for name in [n for n in model.heads if n not in heads]:
            del model.heads[name]
        load_peft_adapter(model, run_dir / "adapter")
        if (run_dir / "adapter" / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_dir(run_dir / "adapter")
        return model.eval(), tokenizer, config
    raise TunelabError(f"{run_dir}: the run has no final model yet (no model/ or adapter/); "
                       f"resume it with `tunelab train --resume {run_dir}`")


# ---------------------------------------------------------------------------------------------- run


def environment() -> dict:
    import tunelab

    return {
        "tunelab": tunelab.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "argv": sys.argv,
    }


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


def resume_config(run_dir: str | Path) -> TrainConfig:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).exists():
        raise TunelabError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    return validate(TrainConfig, read_yaml(run_dir / CONFIG_FILE), str(run_dir / CONFIG_FILE))


def train(config: TrainConfig, *, resume: bool = False, show_progress: bool = True, log=print) -> dict:
    """Train as the config says; returns the final validation metrics. Writes everything to output_dir.

    Under torchrun (WORLD_SIZE > 1) every process runs this: each joins the process group, trains on its share
    of each global batch, and rank 0 alone writes the run directory, logs and evaluates (train/distributed.py).
    """
    from tunelab.train.distributed import setup_distributed, shutdown

    if not resume:
        check_new_run_dir(config.output_dir)
    context = setup_distributed(config.train)
    try:
        return _train(config, context, resume=resume, show_progress=show_progress and context.is_main,
                      log=log if context.is_main else (lambda *args, **kwargs: None))
    finally:
        shutdown(context)


def _train(config: TrainConfig, context, *, resume: bool, show_progress: bool, log) -> dict:
    from tunelab.data.samplers import LengthGroupedSampler, RandomBatchSampler
    from tunelab.train.distributed import full_parameters, wrap_model
    from tunelab.train.tasks import make_step
    from tunelab.train.trainer import Batches, Trainer, resolve_precision

    run_dir = Path(config.output_dir)
    main = context.is_main
    context.barrier()  # every process has checked output_dir before rank 0 writes to it
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    reuse_large_allocations()
    seed_everything(config.train.seed)

    if main:  # a tokenizer trained for the run: rank 0 trains and saves it, the others read it back
        tokenizer = run_tokenizer(config, retrain=not resume)
    context.barrier()
    if not main:
        tokenizer = run_tokenizer(config, save=False)
    data = prepare_data(config, tokenizer)
    seed_everything(config.train.seed)
    model, tokenizer = prepare_model(config, data.labels, tokenizer)
    if context.device is not None:
        model.to(context.device)
    if config.train.gradient_checkpointing:
        log(f"gradient checkpointing: {model.set_gradient_checkpointing(True)} blocks recomputed in backward")
    low = resolve_precision(config.train.precision, next(model.parameters()).device)
    if config.method.type == "lora" and low is not None and context.mode != "fsdp":
        from tunelab.peft.lora import cast_frozen_base  # FSDP2 wants one dtype for the parameters it shards

        freed = cast_frozen_base(model, low)
        if freed:
            log(f"frozen base weights in {str(low).removeprefix('torch.')} (autocast computes in it anyway): "
                f"{freed / 2**20:.0f} MiB freed")
    if not data.train.features:
        where = config.data.train if config.data.feedback is None else feedback_data_files(config)[0]
        raise DataError(f"{where}: no training rows after encoding ({data.train.summary()})")
    log(f"train: {data.train.summary()}" + (f"; validation: {data.validation.summary()}" if data.validation else ""))
    if config.task.type in ("preference", "kto", "reward_model", "grpo"):
        reasons = data.train.skipped_reasons + (data.validation.skipped_reasons if data.validation else [])
        for reason in reasons[:5]:
            log(f"  skipped {reason}")
        if len(reasons) > 5:
            log(f"  ... and {len(reasons) - 5} more skipped")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {config.model.name} ({model.config.model_type}), {model.num_parameters() / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.2f}M trainable ({config.method.type})")

    if context.enabled:
        log(f"distributed: {context.mode} over {context.world_size} processes, "
            f"{config.train.batch_size // context.world_size} rows of each batch of {config.train.batch_size} each")
    if main:
        dump_config(config, run_dir / CONFIG_FILE)
        (run_dir / "env.json").write_text(json.dumps({**environment(), "world_size": context.world_size,
                                                      "distributed": context.mode}, indent=2) + "\n")
        if data.labels:
            (run_dir / "labels.json").write_text(json.dumps(data.labels) + "\n")

    s = config.train
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    step = make_step(config.task.type, labels=data.labels, examples=data.validation_examples,
                     max_answer_length=config.task.max_answer_length, pad_token_id=pad_id, nsp=config.task.nsp,
                     bptt=config.data.bptt, tokenizer=tokenizer, task=config.task)
    lengths = data.train.lengths
    collate, seeded = step.collate, False
    if config.task.type == "masked_lm":  # masks drawn per batch from (seed, epoch, row index) and progress
        collate, seeded = masking_collator(config, tokenizer), True
    if config.task.type == "recurrent_lm":
        from tunelab.data.stream import StreamBatchSampler, collate_stream_chunks

        sampler = StreamBatchSampler.for_features(data.train.features, s.batch_size)  # in order: the state carries
        collate = collate_stream_chunks
    elif s.group_by_length:
        sampler = LengthGroupedSampler(lengths, s.batch_size, seed=s.seed)
    else:
        sampler = RandomBatchSampler(len(lengths), s.batch_size, seed=s.seed)

    def make_sampler(epoch: int, start_batch: int):
        sampler.set_epoch(epoch, min(start_batch, sampler.num_batches))
        if hasattr(data.train.features, "set_epoch"):
            data.train.features.set_epoch(epoch)  # ShiftingWindows: this epoch's cut of the text
        return sampler

    samples = None
    if getattr(step, "online", False):  # GRPO: collate samples from the model; each sampled batch trains mu steps
        from tqdm.auto import tqdm

        from tunelab.train.grpo import GRPOSamples, RepeatedGroups, bind_policy

        bind_policy(step, model, config)
        if config.task.num_iterations > 1:
            sampler = RepeatedGroups(sampler, s.grad_accum, config.task.num_iterations)
        if main:
            samples = GRPOSamples(step, run_dir, echo=tqdm.write if show_progress and log is print else log)
    batches = Batches(data.train.features, make_sampler, collate, seeded=seeded)
    eval_rows = data.validation.features if data.validation is not None else None
    if getattr(step, "needs_reference", False):  # rank 0 computes and saves them, the others read them back
        if main:
            prepare_reference(step, model, config, data.train.features, eval_rows, run_dir, log=log)
        context.barrier()
        if not main:
            prepare_reference(step, model, config, data.train.features, eval_rows, run_dir, log=log, save=False)
    if s.sample_prompts and main:
        from tqdm.auto import tqdm

        from tunelab.train.samples import TextSamples

        samples = TextSamples(model, tokenizer, s.sample_prompts, run_dir, max_new_tokens=s.sample_max_new_tokens,
                              temperature=s.sample_temperature, seed=s.seed,
                              echo=tqdm.write if show_progress and log is print else log)
    trainer = Trainer(wrap_model(model, context), step, batches, eval_rows, s, run_dir, show_progress=show_progress,
                      on_evaluate=samples, distributed=context)
    if resume:
        if trainer.resume():
            log(f"resumed from step {trainer.state.global_step} (epoch {trainer.state.epoch})")
        if main:
            _trim_metrics(run_dir / "metrics.jsonl", trainer.state.global_step)
            _trim_metrics(run_dir / "samples.jsonl", trainer.state.global_step)
    try:
        final = trainer.fit()
        if eval_rows is None:  # no evaluations to sample at: once at the end (FSDP2: every process gathers)
            with full_parameters(model, enabled=bool(s.sample_prompts)):
                if samples is not None:
                    samples(trainer.state.global_step)
    finally:
        if samples is not None:
            samples.close()
    if context.mode == "fsdp":  # the shards gathered, on rank 0, into a plain copy of the model that is saved
        model = gathered_model(model, config, data.labels, tokenizer)
    if main:
        save_final(model, tokenizer, config, run_dir)
        (run_dir / "metrics.json").write_text(json.dumps(final, indent=2) + "\n")
        if getattr(step, "online", False):  # GRPO: the sampled completions' curves, which evaluation has no match of
            from tunelab.train.grpo import plot_rollouts

            plot_rollouts(run_dir)
        write_run_report(run_dir, config, final, trainer)
    context.barrier()  # the others wait until the final model is written
    return final


def gathered_model(sharded, config: TrainConfig, labels: list[str], tokenizer):
    """Of an FSDP2-sharded model, a plain one-process copy with the full trained weights on rank 0 (None on the
    other ranks, which take part in gathering the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return None
    plain, _ = prepare_model(config, labels, tokenizer)
    plain.load_state_dict(full)
    return plain


def check_new_run_dir(run_dir: str | Path) -> None:
    """TunelabError if run_dir already holds a run (a new run would mix its files with the old one's)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and (any(run_dir.glob("checkpoint-*")) or (run_dir / "metrics.jsonl").exists()):
        raise TunelabError(f"{run_dir}: output_dir already holds a run; resume it with "
                           f"`tunelab train --resume {run_dir}` or choose another output_dir")


def prepare_reference(step, model, config: TrainConfig, train_features: list, eval_features: list | None,
                      run_dir: Path, *, log=print, save: bool = True) -> dict[str, int]:
    """The reference log-probabilities of every training and validation example, computed once before training
    (the model is still untrained: LoRA adapters are switched off, a fully fine-tuned model is its own
    reference) or read back from run_dir/reference_logps.safetensors (a resumed run)."""
    from tunelab.train.preference import REFERENCE_FILE, attach_references, reference_context, reference_model
    from tunelab.train.trainer import autocast_context, resolve_precision

    s = config.train
    device = next(model.parameters()).device
    autocast = autocast_context(resolve_precision(s.precision, device), device)
    return attach_references(
        step, model, {"train": train_features, "validation": eval_features}, batch_size=s.eval_batch_size or s.batch_size,
        autocast=autocast, context=reference_context(config), cache=run_dir / REFERENCE_FILE,
        reference=lambda: reference_model(model, source=config.task.reference, dtype=config.model.dtype), log=log,
        save=save)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step (they are logged again) and any half-written last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)


def save_final(model, tokenizer, config: TrainConfig, run_dir: Path) -> Path:
    if config.method.type in ("lora", "dora", "qlora"):
        from tunelab.peft import save_peft_adapter

        out = save_peft_adapter(model, run_dir / "adapter", base_model=config.model.source)
        tokenizer.save(out)
        return out
    from tunelab.checkpoint.load import save_pretrained

    out = save_pretrained(model, tokenizer, run_dir / "model")
    if config.task.type == "seq2seq":
        write_generation_defaults(out, config)
    return out


def write_generation_defaults(directory: Path, config: TrainConfig) -> None:
    """Record task.generation in generation_config.json (HF's names), the defaults of `tunelab generate`."""
    path = directory / "generation_config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    g = config.task.generation
    data.update(num_beams=g.beam_size, length_penalty=g.length_penalty, max_new_tokens=g.max_new_tokens)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_run_report(run_dir: Path, config: TrainConfig, final: dict, trainer) -> Path:
    from tunelab.evaluate.report import write_report

    best = None
    if trainer.state.best_step is not None:
        best = {"step": trainer.state.best_step, "metric": trainer.metric, "value": trainer.state.best_metric}
    if "confusion_matrix" in final and getattr(trainer.task, "labels", None):
        from tunelab.evaluate.plots import plot_confusion_matrix

        (run_dir / "plots").mkdir(exist_ok=True)
        plot_confusion_matrix(final["confusion_matrix"], trainer.task.labels, run_dir / "plots" / "confusion_matrix.png")
    extra = []
    if (run_dir / "samples.jsonl").exists():
        from tunelab.train.samples import last_samples_markdown

        extra = last_samples_markdown(run_dir / "samples.jsonl")
    built = config.data.feedback
    train_data = config.data.train if built is None else f"feedback ({built.build}) from {config.feedback.store}"
    summary = {"model": config.model.name, "task": config.task.type, "method": config.method.type,
               "train": train_data, "batch_size": config.train.batch_size, "grad_accum": config.train.grad_accum,
               "lr": config.train.lr, "steps": trainer.state.global_step, "precision": str(trainer.amp_dtype or "fp32")}
    return write_report(run_dir, title=f"tunelab run: {run_dir.name}", task=config.task.type, final_metrics=final,
                        best=best, config_summary=summary, history_path=run_dir / "metrics.jsonl",
                        extra_sections=extra)
