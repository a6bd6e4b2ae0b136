"""The schema of a training job: `tunelab train CONFIG.yaml [key=value ...]`.

Every section forbids unknown keys (a typo is an error that suggests the nearest valid key), and the
resolved config is written to the run directory, so a run can be repeated or resumed exactly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TaskType = Literal["classification", "tagging", "qa", "causal_lm", "chat", "recurrent_lm"]
DataFormat = Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "txt", "conll", "squad", "alpaca", "sharegpt", "messages"]


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
        return self

    @property
    def name(self) -> str:
        """How reports name the model: its source, or its family and size when built from scratch."""
        if self.source is not None:
            return self.source
        arch = self.architecture or {}
        return f"{arch.get('family')} from scratch ({arch.get('num_layers', '?')} layers, {arch.get('hidden_size', '?')} wide)"


class TaskSection(Section):
    type: TaskType
    labels: list[str] | None = Field(None, description="class or tag names; default: found in the training data")
    label_all_subwords: bool = Field(False, description="tagging: label every sub-word, not only the first")
    max_answer_length: int = Field(30, ge=1, description="qa: longest answer span in tokens")
    train_on: Literal["assistant", "all"] = Field("assistant", description="chat: which tokens carry the loss")


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
    bptt: int = Field(35, ge=1, description="recurrent_lm: tokens per chunk of truncated back-propagation through time")
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
        return self
