"""The schema of a training job: `tunelab train CONFIG.yaml [key=value ...]`.

Every section forbids unknown keys (a typo is an error that suggests the nearest valid key), and the
resolved config is written to the run directory, so a run can be repeated or resumed exactly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TaskType = Literal["classification", "tagging", "qa", "causal_lm", "chat", "seq2seq"]
DataFormat = Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "txt", "conll", "squad", "alpaca", "sharegpt",
                     "messages", "parallel"]
GenerationMetric = Literal["bleu", "chrf", "rouge"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    source: str | None = Field(
        None, description="registered name (tunelab models), HF directory, GGUF file, or a tunelab run directory"
    )
    architecture: dict[str, Any] | None = Field(
        None, description="from scratch instead of source: family and sizes, e.g. "
        "{family: gpt2, hidden_size: 384, num_layers: 6, num_heads: 6, max_position_embeddings: 256}",
    )
    tokenizer: str | None = Field(
        None, description="tokenizer directory or tokenizer.json (needed with architecture; default: the source's own)"
    )
    target_tokenizer: str | None = Field(
        None, description="seq2seq from scratch: the target language's tokenizer (separate vocabularies; "
        "default: model.tokenizer for both sides)",
    )
    warm_start: Literal["bert2bert"] | None = Field(
        None, description="seq2seq: build an encoder-decoder whose encoder and decoder start from the BERT "
        "model of model.source (Rothe et al. 2020)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the weights are held in (master weights; autocast is train.precision)"
    )

    @model_validator(mode="after")
    def _one_origin(self) -> "ModelSection":
        if (self.source is None) == (self.architecture is None):
            raise ValueError("give exactly one of model.source (a trained model) and model.architecture (from scratch)")
        if self.architecture is not None:
            if self.tokenizer is None:
                raise ValueError("model.architecture needs model.tokenizer (train one with `tunelab tokenizer train`)")
            if "family" not in self.architecture:
                raise ValueError("model.architecture needs a family (bert, gpt2, llama, ...)")
        if self.target_tokenizer is not None and (self.architecture or {}).get("family") != "seq2seq":
            raise ValueError("model.target_tokenizer (separate vocabularies) applies to an encoder-decoder built "
                             "from scratch: model.architecture with family seq2seq")
        if self.warm_start is not None and self.source is None:
            raise ValueError("model.warm_start: bert2bert starts from a BERT model: give it as model.source")
        return self

    @property
    def name(self) -> str:
        """How reports name the model: its source, or its family and size when built from scratch."""
        if self.source is not None:
            return self.source
        arch = self.architecture or {}
        if arch.get("family") == "seq2seq":
            layers = f"{arch.get('num_layers', '?')}+{arch.get('num_decoder_layers') or arch.get('num_layers', '?')}"
            return f"seq2seq from scratch ({layers} layers, {arch.get('hidden_size', '?')} wide)"
        return f"{arch.get('family')} from scratch ({arch.get('num_layers', '?')} layers, {arch.get('hidden_size', '?')} wide)"


class GenerationSection(Section):
    """Decoding for evaluation and prediction of seq2seq and chat models (beam search)."""

    beam_size: int = Field(4, ge=1, description="beams per input (1: greedy)")
    length_penalty: float = Field(0.6, ge=0.0, description="GNMT's alpha: score = log P / ((5 + |Y|) / 6)^alpha")
    max_new_tokens: int = Field(128, ge=1)


class TaskSection(Section):
    type: TaskType
    labels: list[str] | None = Field(None, description="class or tag names; default: found in the training data")
    label_all_subwords: bool = Field(False, description="tagging: label every sub-word, not only the first")
    max_answer_length: int = Field(30, ge=1, description="qa: longest answer span in tokens")
    train_on: Literal["assistant", "all"] = Field("assistant", description="chat: which tokens carry the loss")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="seq2seq: label smoothing of the training loss "
                                   "(0.1 in Vaswani et al. 2017)")
    metrics: list[GenerationMetric] = Field(
        default_factory=list, description="seq2seq and chat: decode the validation inputs and score them with "
        "sacreBLEU's BLEU / chrF (0-100) or ROUGE-1/2/L (0-1), besides the loss",
    )
    generation: GenerationSection = Field(default_factory=GenerationSection)

    @model_validator(mode="after")
    def _metrics_for_generation(self) -> "TaskSection":
        if self.metrics and self.type not in ("seq2seq", "chat"):
            raise ValueError(f"task.metrics ({', '.join(self.metrics)}) score generated text: they apply to the "
                             f"seq2seq and chat tasks, not {self.type}")
        return self


class DataSection(Section):
    train: str | list[str] = Field(description="training file(s)")
    validation: str | list[str] | None = Field(None, description="validation file(s); default: validation_split of train")
    validation_split: float = Field(0.1, ge=0.0, lt=1.0, description="held-out fraction of train when no validation file")
    format: DataFormat = "auto"
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    token_column: int = Field(0, description="CoNLL: column of the words")
    tag_column: int = Field(-1, description="CoNLL: column of the tags (-1 = last)")
    max_length: int = Field(512, ge=8)
    stride: int = Field(128, ge=0, description="qa: overlap between windows of a long context")
    context_tokens: int = Field(0, ge=0, description="tagging: sub-words of the neighbouring sentences on each side "
                                "that the model sees as document context (FLERT); 0: the sentence alone")
    packing: bool = Field(True, description="causal_lm/chat: pack documents into full rows, attention kept within each")
    source_field: str = Field("source", description="seq2seq, chat from pairs: the field of the input text")
    target_field: str = Field("target", description="seq2seq, chat from pairs: the field of the output text")
    max_target_length: int | None = Field(None, ge=2, description="seq2seq: longest target in tokens "
                                          "(default: max_length)")
    instruction: str | None = Field(
        None, description="chat from pairs: the data are source/target pairs (parallel files or source_field / "
        "target_field records); each becomes a user turn 'instruction, blank line, source' and the target as the "
        "answer, e.g. 'Translate English to German:'",
    )
    max_train_examples: int | None = Field(None, ge=1)
    max_validation_examples: int | None = Field(None, ge=1)

    def train_paths(self) -> list[str]:
        return [self.train] if isinstance(self.train, str) else list(self.train)

    def validation_paths(self) -> list[str]:
        if self.validation is None:
            return []
        return [self.validation] if isinstance(self.validation, str) else list(self.validation)


class LoraSection(Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    rslora: bool = False


class MethodSection(Section):
    type: Literal["full", "freeze", "lora", "dora", "qlora"] = "full"
    freeze_embeddings: bool = Field(True, description="freeze: keep the embeddings fixed")
    freeze_layers: int = Field(0, ge=0, description="freeze: keep the first N layers fixed")
    lora: LoraSection = Field(default_factory=LoraSection)


class TrainSection(Section):
    epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1, description="examples per forward pass, summed over processes")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimizer step")
    lr: float = Field(5e-5, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup: float = Field(0.06, ge=0, description="warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)")
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field("auto", description="auto: bf16 where the hardware has it")
    seed: int = 42
    eval_steps: int = Field(0, ge=0, description="evaluate every N steps (0: never during training; always at the end)")
    eval_at_start: bool = Field(False, description="evaluate the untrained model first (step 0): the 'before' score")
    save_steps: int = Field(500, ge=0, description="resumable checkpoint every N steps (0: never)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept (the best is always kept)")
    logging_steps: int = Field(10, ge=1)
    metric: str | None = Field(None, description="picks the best checkpoint; default: the task's main metric")
    greater_is_better: bool | None = None
    early_stopping_patience: int = Field(0, ge=0, description="stop after N evaluations without improvement (0: never)")
    group_by_length: bool = True
    eval_batch_size: int | None = Field(None, ge=1)
    num_threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")

    @model_validator(mode="after")
    def _length(self) -> "TrainSection":
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self


class TrainConfig(Section):
    output_dir: str
    model: ModelSection
    task: TaskSection
    data: DataSection
    method: MethodSection = Field(default_factory=MethodSection)
    train: TrainSection = Field(default_factory=TrainSection)

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("output_dir must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.method.type == "qlora" and self.model.dtype == "float16":
            raise ValueError("qlora keeps non-quantised weights in float32 or bfloat16")
        task, data = self.task.type, self.data
        family = (self.model.architecture or {}).get("family")
        if task == "seq2seq" and family is not None and family != "seq2seq":
            raise ValueError(f"task seq2seq needs an encoder-decoder: model.architecture.family seq2seq, not {family}")
        if self.model.warm_start is not None and task != "seq2seq":
            raise ValueError("model.warm_start: bert2bert builds an encoder-decoder for task.type seq2seq")
        if data.instruction is not None and task != "chat":
            raise ValueError("data.instruction turns source/target pairs into chat turns: it applies to task chat "
                             "(a seq2seq model reads the source as it is)")
        if data.format == "parallel" and task not in ("seq2seq", "chat"):
            raise ValueError(f"data.format parallel (line-aligned source and target files) is for the seq2seq "
                             f"task, or chat with data.instruction; not {task}")
        if data.format == "parallel" and task == "chat" and data.instruction is None:
            raise ValueError("chat from parallel files needs data.instruction (the user turn's instruction)")
        if data.format == "parallel":
            for key in ("train", "validation"):
                value = getattr(data, key)
                files = [value] if isinstance(value, str) else value
                if value is not None and len(files) not in (1, 2):
                    raise ValueError(f"data.{key}: format parallel reads two line-aligned files, given as "
                                     f"[source file, target file] (to predict: the source file alone)")
        return self
