"""The schema of a training job: `tunelab train CONFIG.yaml [key=value ...]`.

Every section forbids unknown keys (a typo is an error that suggests the nearest valid key), and the
resolved config is written to the run directory, so a run can be repeated or resumed exactly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TaskType = Literal["classification", "tagging", "qa", "causal_lm", "chat", "masked_lm", "recurrent_lm", "seq2seq",
                   "preference", "kto", "reward_model", "grpo"]
DataFormat = Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "txt", "conll", "squad", "alpaca", "sharegpt",
                     "messages", "parallel", "hh-rlhf", "preference", "openai"]
PREFERENCE_TASKS = ("preference", "kto", "reward_model")
# data.format of the preference tasks: a record format (data/preference.py) or a file format with the records'
# format told by their fields
PREFERENCE_DATA_FORMATS = ("auto", "jsonl", "json", "parquet", "hh-rlhf", "preference", "sharegpt", "openai")
GenerationMetric = Literal["bleu", "chrf", "rouge"]
# data.format of task grpo: files of records with a prompt (data/prompts.py); alpaca and messages records are
# told by their fields
GRPO_DATA_FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "alpaca", "messages")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TokenizerTrainingSection(Section):
    """A tokenizer trained on data.train when the run starts (see tunelab.tokenizer.training)."""

    type: Literal["bpe", "byte-bpe", "wordpiece", "char"] = Field(
        description="bpe (character BPE, '▁' marks spaces), byte-bpe (GPT-2), wordpiece (BERT), char (one id per character)")
    vocab_size: int | None = Field(None, ge=2, description="ids, special tokens included (char: an upper bound)")
    min_frequency: int | None = Field(None, ge=1, description="least count of a merge (2), or of a character (char: 1)")
    lowercase: bool | None = Field(None, description="lower-case the text (default: true for wordpiece only)")
    special_tokens: list[str] = Field(default_factory=list, description="more special tokens to reserve ids for")
    limit_alphabet: int | None = Field(None, ge=1, description="bpe, wordpiece: keep the N most frequent characters")


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
    train_tokenizer: TokenizerTrainingSection | None = Field(
        None, description="with architecture, instead of tokenizer: train one on data.train first, e.g. {type: char}; "
        "kept in output_dir/tokenizer/ and saved with the model",
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
    init: Literal["normal", "mimetic"] = Field(
        "normal", description="from scratch: normal (N(0, 0.02), as BERT and GPT-2) or mimetic (attention layers "
        "start as trained ones look, Trockman & Kolter 2023: W_q^T W_k near the identity; bert, gpt2, llama)",
    )

    @model_validator(mode="after")
    def _one_origin(self) -> "ModelSection":
        if (self.source is None) == (self.architecture is None):
            raise ValueError("give exactly one of model.source (a trained model) and model.architecture (from scratch)")
        if self.tokenizer is not None and self.train_tokenizer is not None:
            raise ValueError("give at most one of model.tokenizer (an existing one) and model.train_tokenizer")
        if self.train_tokenizer is not None and self.architecture is None:
            raise ValueError("model.train_tokenizer makes a new vocabulary, which only a model built from scratch "
                             "(model.architecture) can use")
        if self.architecture is not None:
            if self.tokenizer is None and self.train_tokenizer is None:
                raise ValueError("model.architecture needs model.tokenizer (a directory made by `tunelab tokenizer "
                                 "train`, or any model's) or model.train_tokenizer (e.g. {type: char})")
            if "family" not in self.architecture:
                raise ValueError("model.architecture needs a family (bert, gpt2, llama, ...)")
        if self.target_tokenizer is not None and (self.architecture or {}).get("family") != "seq2seq":
            raise ValueError("model.target_tokenizer (separate vocabularies) applies to an encoder-decoder built "
                             "from scratch: model.architecture with family seq2seq")
        if self.init != "normal" and self.architecture is None:
            raise ValueError(f"model.init: {self.init} initialises a model built from scratch (model.architecture); "
                             "model.source is already trained")
        if self.init == "mimetic" and self.architecture.get("family") not in ("bert", "gpt2", "llama"):
            raise ValueError(f"model.init: mimetic is for self-attention models (bert, gpt2, llama), not "
                             f"{self.architecture.get('family')}")
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


class RewardSection(Section):
    """One reward function of task grpo: a verifier or a reward model, with its weight in the sum."""

    verifier: str | None = Field(
        None, description="a verifier function 'module:function' or 'path/to/file.py:function', called as "
        "function(output, example) (see tunelab.evaluate.verifiers); its reward: the score, or 1 good / 0 bad")
    reward_model: str | None = Field(
        None, description="a reward model: the run directory of a task reward_model run (or any model source "
        "with a one-output classifier head); its reward: the score of (prompt, completion)")
    weight: float = Field(1.0, description="the reward is the weighted sum of every function's reward")

    @model_validator(mode="after")
    def _one_function(self) -> "RewardSection":
        if (self.verifier is None) == (self.reward_model is None):
            raise ValueError("a reward is either a verifier ('module:function') or a reward_model (a run "
                             "directory): give exactly one")
        return self


# task keys that only task grpo reads (an error for any other task when set)
GRPO_KEYS = ("rewards", "num_generations", "max_new_tokens", "temperature", "top_p", "top_k", "num_iterations",
             "epsilon", "epsilon_high", "scale_rewards", "loss_normalization", "success_threshold")


class TaskSection(Section):
    type: TaskType
    labels: list[str] | None = Field(None, description="class or tag names; default: found in the training data")
    label_all_subwords: bool = Field(False, description="tagging: label every sub-word, not only the first")
    max_answer_length: int = Field(30, ge=1, description="qa: longest answer span in tokens")
    train_on: Literal["assistant", "all"] = Field("assistant", description="chat: which tokens carry the loss")
    # masked_lm: BERT pretraining (Devlin et al. 2019, sec. 3.1 and appendix A.1)
    nsp: bool = Field(True, description="masked_lm: next-sentence prediction with the masked LM (segment pairs, "
                      "50% true continuation, 50% from another document); false: masked LM alone")
    nsp_weight: float = Field(1.0, gt=0.0, description="masked_lm: weight of the NSP loss in the training loss "
                              "(mean masked-token CE + nsp_weight x mean NSP CE); the logged losses are unweighted")
    mask_probability: float = Field(0.15, gt=0.0, lt=1.0, description="masked_lm: share of the tokens chosen as targets")
    final_mask_probability: float | None = Field(
        None, gt=0.0, lt=1.0, description="masked_lm: a masking-rate schedule: the share of targets moves linearly "
        "from mask_probability at the first step to this at the last (Ankner et al. 2023); validation rows are "
        "masked at this rate. null: mask_probability throughout")
    mask_token_fraction: float = Field(0.8, ge=0.0, le=1.0, description="masked_lm: chosen tokens replaced by [MASK]")
    random_token_fraction: float = Field(0.1, ge=0.0, le=1.0,
                                         description="masked_lm: chosen tokens replaced by a random token (the rest stay)")
    whole_word_masking: bool = Field(False, description="masked_lm: choose whole words (a word's pieces together)")
    short_seq_probability: float = Field(0.1, ge=0.0, le=1.0,
                                         description="masked_lm: share of examples built shorter than max_length")
    dupe_factor: int = Field(1, ge=1, description="masked_lm: times the documents are cut into examples, each time "
                             "with other boundaries and other random next segments")

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="seq2seq: label smoothing of the training loss "
                                   "(0.1 in Vaswani et al. 2017); preference with loss dpo / cdpo: the probability "
                                   "that a preference label is flipped (conservative DPO, < 0.5)")
    # learning from preferences (train/preference.py, losses/preference.py)
    loss: Literal["dpo", "cdpo", "ipo", "simpo", "orpo"] = Field(
        "dpo", description="preference: dpo (Rafailov et al. 2023), cdpo (dpo with label_smoothing), ipo (Azar et "
        "al. 2023), simpo (Meng et al. 2024, no reference), orpo (Hong et al. 2024, no reference)")
    beta: float | None = Field(None, ge=0.0, description="preference, kto: beta of DPO / KTO / SimPO, tau of IPO, "
                               "lambda of ORPO (default 0.1; simpo 2.0); grpo: the weight of the KL penalty "
                               "(default 0.04; 0: no reference model)")
    gamma: float = Field(1.0, ge=0.0, description="preference with loss simpo: the target reward margin")
    desirable_weight: float = Field(1.0, gt=0.0, description="kto: lambda_D, the weight of desirable answers")
    undesirable_weight: float = Field(1.0, gt=0.0, description="kto: lambda_U, the weight of undesirable answers")
    reference: str | None = Field(
        None, description="preference, kto, grpo: the reference model (a model source); default: the trained model "
        "with its adapters off (lora, dora, qlora) or the model before training (full, freeze)")
    metrics: list[GenerationMetric] = Field(
        default_factory=list, description="seq2seq and chat: decode the validation inputs and score them with "
        "sacreBLEU's BLEU / chrF (0-100) or ROUGE-1/2/L (0-1), besides the loss",
    )
    generation: GenerationSection = Field(default_factory=GenerationSection)
    # online GRPO (train/grpo.py, losses/grpo.py): sample completions, score them, learn from the group
    rewards: list[RewardSection] = Field(
        default_factory=list, description="grpo: the reward functions, e.g. [{verifier: "
        "tunelab.evaluate.verifiers:final_number}, {reward_model: runs/rm, weight: 0.5}]")
    num_generations: int = Field(8, ge=2, description="grpo: completions sampled per prompt (the group, G)")
    max_new_tokens: int = Field(128, ge=1, description="grpo: longest completion in tokens (sampling and "
                                "evaluation)")
    temperature: float = Field(1.0, gt=0.0, description="grpo: sampling temperature of the completions")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="grpo: nucleus sampling mass of the completions")
    top_k: int = Field(0, ge=0, description="grpo: sample among the k most likely tokens (0: all)")
    num_iterations: int = Field(1, ge=1, description="grpo: optimizer steps on each sampled batch (mu); above 1 "
                                "the ratio to the sampling policy is clipped to [1 - epsilon, 1 + epsilon_high]")
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="grpo: clipping range of the ratio (PPO's epsilon)")
    epsilon_high: float | None = Field(None, gt=0.0, description="grpo: upper clipping bound (default epsilon; "
                                       "larger is DAPO's clip-higher)")
    scale_rewards: bool = Field(True, description="grpo: divide the group-centred rewards by the group's standard "
                                "deviation (false: Dr. GRPO, only centred)")
    loss_normalization: Literal["token", "sequence", "constant"] = Field(
        "token", description="grpo: token (mean over every completion token of the batch), sequence (each "
        "completion's token mean, then the mean: DeepSeekMath eq. 3), constant (sum / (completions x "
        "max_new_tokens): Dr. GRPO)")
    success_threshold: float | None = Field(
        None, description="grpo: a completion succeeds when its reward is at least this; default: when every "
        "verifier says good (a score without a verdict: above 0)")

    @model_validator(mode="after")
    def _mask_split(self) -> "TaskSection":
        if self.mask_token_fraction + self.random_token_fraction > 1.0 + 1e-9:
            raise ValueError(f"task.mask_token_fraction + task.random_token_fraction must be at most 1 "
                             f"(got {self.mask_token_fraction} + {self.random_token_fraction})")
        return self

    @model_validator(mode="after")
    def _preference_options(self) -> "TaskSection":
        if self.type != "preference" and self.loss != "dpo":
            raise ValueError(f"task.loss ({self.loss}) chooses the loss of task preference, not {self.type}")
        if self.type not in ("preference", "kto", "grpo") and (self.beta is not None or self.reference is not None):
            raise ValueError(f"task.beta and task.reference apply to the preference, kto and grpo tasks, not "
                             f"{self.type}")
        if self.type in ("preference", "kto") and self.beta == 0:
            raise ValueError(f"task.beta of task {self.type} must be positive")
        if self.type == "preference":
            if self.loss == "cdpo" and not self.label_smoothing:
                raise ValueError("task.loss cdpo (conservative DPO) needs task.label_smoothing: the probability that "
                                 "a label is flipped, e.g. 0.1")
            if self.label_smoothing and self.loss not in ("dpo", "cdpo"):
                raise ValueError(f"task.label_smoothing applies to loss dpo / cdpo, not {self.loss}")
            if self.label_smoothing >= 0.5:
                raise ValueError(f"task.label_smoothing is a label-flip probability: below 0.5 "
                                 f"(got {self.label_smoothing})")
            if self.reference is not None and self.loss in ("simpo", "orpo"):
                raise ValueError(f"task.loss {self.loss} needs no reference model; drop task.reference")
        return self

    @model_validator(mode="after")
    def _grpo_options(self) -> "TaskSection":
        if self.type != "grpo":
            # compared with the defaults, not with the keys given: a saved config.yaml holds every key
            given = [key for key in GRPO_KEYS
                     if getattr(self, key) != type(self).model_fields[key].get_default(call_default_factory=True)]
            if given:
                raise ValueError(f"task.{given[0]} applies to task grpo, not {self.type}")
            return self
        if not self.rewards:
            raise ValueError("task grpo needs task.rewards: a list of reward functions, each {verifier: "
                             "'module:function'} or {reward_model: RUN_DIR}, with an optional weight")
        if self.success_threshold is None and not any(r.verifier for r in self.rewards):
            raise ValueError("task.success_threshold: with reward models only there is no verdict to count "
                             "successes by; give the reward a completion needs to count as a success")
        if self.generation != GenerationSection():
            raise ValueError("task.generation (beam search) is not used by task grpo: its sampling is "
                             "task.max_new_tokens, task.temperature, task.top_p, task.top_k")
        return self

    @model_validator(mode="after")
    def _metrics_for_generation(self) -> "TaskSection":
        if self.metrics and self.type not in ("seq2seq", "chat"):
            raise ValueError(f"task.metrics ({', '.join(self.metrics)}) score generated text: they apply to the "
                             f"seq2seq and chat tasks, not {self.type}")
        return self


# ---- training data built from the feedback store (tunelab.feedback.build) -----------------------------------

FeedbackBuild = Literal["corrections", "relabel", "pairs", "unpaired", "refine"]
# the training tasks that each way of building rows from the feedback store makes data for
FEEDBACK_BUILD_TASKS: dict[str, tuple[str, ...]] = {
    "corrections": ("chat", "seq2seq"),
    "relabel": ("classification", "tagging"),
    "pairs": ("preference", "reward_model", "kto"),
    "unpaired": ("kto",),
    "refine": ("chat",),
}
FeedbackSource = Literal["person", "rule", "reward_model", "gold", "judge"]


class RefineSection(Section):
    """data.feedback.refine: how a model rewrites bad outputs from their critiques (Scheurer et al. 2023)."""

    model: str | None = Field(None, description="the model that writes the refinements (a model source); default: "
                              "the trained model, model.source")
    prompt: str | None = Field(None, description="the prompt template, with {input}, {output}, {critique} and "
                               "optionally {reference}; default: tunelab.feedback.build.REFINE_PROMPT")
    max_new_tokens: int = Field(256, ge=1, description="longest refinement in tokens")
    batch_size: int = Field(8, ge=1, description="prompts decoded at once (greedy)")
    keep_truncated: bool = Field(False, description="keep a refinement cut off at max_new_tokens (default: drop it)")
    verifier: str | None = Field(None, description="module:function (or file.py:function) that judges each "
                                 "refinement; only those it passes are stored and trained on")
    min_score: float = Field(0.5, description="verifier: the least score that passes when it gives a score only")


class FeedbackDataSection(Section):
    """data.feedback: the training rows built from the records of the feedback store (feedback.store)."""

    build: FeedbackBuild = Field(description="corrections (chat / seq2seq SFT on the corrected outputs), relabel "
                                 "(classification / tagging with corrected labels), pairs (preference pairs), "
                                 "unpaired (KTO's good / bad answers), refine (a model rewrites bad outputs from "
                                 "their critiques, then as corrections)")
    # which records: the store's filters
    model: str | None = Field(None, description="records of this model")
    model_version: str | None = Field(None, description="records of this model version")
    source: str | list[str] | None = Field(None, description="records from this source (or these): person, rule, "
                                           "reward_model, gold, judge")
    verdict: Literal["good", "bad", "none"] | None = Field(None, description="records with this verdict (none: "
                                                           "scored only)")
    task: str | None = Field(None, description="records of this task")
    since: str | None = Field(None, description="records created at or after: 2025-01-31, 2025-01-31T09:00, or an "
                              "age: 30m, 24h, 7d")
    until: str | None = Field(None, description="records created before this time")
    # how records become rows
    include_good: bool | None = Field(None, description="train on good outputs as they are (default: true for "
                                      "relabel, false for corrections and refine)")
    use_reference: bool | None = Field(None, description="a bad record without a correction takes its reference "
                                       "as the correction (default: true for relabel, where the reference is the "
                                       "gold label; false otherwise)")
    min_margin: float = Field(0.0, ge=0.0, description="pairs from scores: the higher score must exceed the lower "
                              "by more than this")
    max_pairs_per_input: int | None = Field(None, ge=1, description="pairs: at most this many pairs of one input")
    threshold: float | None = Field(None, description="unpaired: a record with a score and no verdict is "
                                    "desirable when its score is at least this")
    include_corrections: bool = Field(True, description="unpaired: each correction is also a desirable answer")
    refine: RefineSection | None = Field(None, description="build refine: the refining model and its prompt")
    # the original data, so that training on feedback does not forget the rest
    mix_with: str | list[str] | None = Field(None, description="original training file(s) mixed into the rows")
    mix_ratio: float | None = Field(None, gt=0.0, description="original examples per feedback row, sampled "
                                    "(default: all of mix_with)")

    @field_validator("source")
    @classmethod
    def _known_sources(cls, value: str | list[str] | None) -> str | list[str] | None:
        known = FeedbackSource.__args__
        for name in [value] if isinstance(value, str) else value or []:
            if name not in known:
                raise ValueError(f"unknown source {name!r} (known: {', '.join(known)})")
        return value

    def mix_paths(self) -> list[str]:
        if self.mix_with is None:
            return []
        return [self.mix_with] if isinstance(self.mix_with, str) else list(self.mix_with)

    def filters(self) -> dict[str, Any]:
        """The store's query filters this section gives (FeedbackStore.query)."""
        names = ("model", "model_version", "source", "verdict", "task", "since", "until")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @model_validator(mode="after")
    def _options_of_kind(self) -> "FeedbackDataSection":
        kind = self.build
        if self.refine is not None and kind != "refine":
            raise ValueError(f"data.feedback.refine configures build refine, not {kind}")
        if kind != "pairs" and (self.min_margin or self.max_pairs_per_input is not None):
            raise ValueError(f"data.feedback.min_margin and max_pairs_per_input apply to build pairs, not {kind}")
        if self.threshold is not None and kind != "unpaired":
            raise ValueError(f"data.feedback.threshold labels scored records for build unpaired, not {kind}")
        if self.mix_ratio is not None and self.mix_with is None:
            raise ValueError("data.feedback.mix_ratio samples data.feedback.mix_with: give the original training "
                             "file there")
        return self


class DataSection(Section):
    train: str | list[str] | None = Field(
        None, description="training file(s); with data.feedback nothing (or the word feedback): the rows are built "
        "from the feedback store")
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
    max_prompt_length: int | None = Field(None, ge=1, description="preference, kto, reward_model: tokens of the "
                                          "prompt kept before the answers are cut (default: max_length / 2); "
                                          "grpo: longer prompts are skipped (default: max_length - "
                                          "task.max_new_tokens)")
    stride: int = Field(128, ge=0, description="qa: overlap between windows of a long context")
    context_tokens: int = Field(0, ge=0, description="tagging: sub-words of the neighbouring sentences on each side "
                                "that the model sees as document context (FLERT); 0: the sentence alone")
    packing: bool = Field(True, description="causal_lm/chat: pack documents into full rows, attention kept within each")
    random_offsets: bool = Field(False, description="causal_lm with packing: cut the training text into rows at a new "
                                 "random offset every epoch, so that each epoch shows other windows")
    documents: Literal["auto", "file", "paragraph", "line", "wikitext"] = Field(
        "auto", description="what a document of a .txt file is: the whole file, blocks between blank lines, one "
        "line, or a WikiText article (from one ' = Title = ' line to the next); auto: file for causal_lm, "
        "paragraph for masked_lm")
    bptt: int = Field(35, ge=1, description="recurrent_lm: tokens per chunk of truncated back-propagation through time")
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
    feedback: FeedbackDataSection | None = Field(
        None, description="train on rows built from the feedback store (feedback.store): corrections, relabel, "
        "pairs, unpaired or refine; see tunelab.feedback.build")

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
    batch_size: int = Field(32, ge=1, description="examples per forward pass; under torchrun the global batch, "
                            "each process trains on batch_size / WORLD_SIZE of its rows")
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
    fused_optimizer: bool = Field(True, description="AdamW's fused kernel where the parameters allow it (plain "
                                  "tensors on a CPU or GPU); false: the multi-tensor path")
    gradient_checkpointing: bool = Field(False, description="keep only each Transformer block's input for "
                                         "backward and recompute the block: less activation memory, about a "
                                         "third more compute")
    eval_batch_size: int | None = Field(None, ge=1)
    num_threads: int | None = Field(None, ge=1, description="CPU threads (default: all cores)")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="under torchrun with more than one process: ddp (DistributedDataParallel, a full copy "
        "per process) or fsdp (FSDP2 fully_shard, parameters, gradients and optimizer state sharded per Transformer "
        "block); auto: ddp. Ignored in one process. batch_size stays the global batch, split over the processes")
    sample_prompts: list[str] = Field(
        default_factory=list, description="causal_lm, chat: at each evaluation, continue each prompt and log the text "
        "(printed, samples.jsonl, TensorBoard)")
    sample_max_new_tokens: int = Field(200, ge=1, description="length of each sample in tokens")
    sample_temperature: float = Field(0.8, ge=0, description="sampling temperature of the samples (0: greedy)")

    @model_validator(mode="after")
    def _length(self) -> "TrainSection":
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self

    @field_validator("sample_prompts")
    @classmethod
    def _prompts(cls, prompts: list[str]) -> list[str]:
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty; a sample continues a prompt of at least one character")
        return prompts


# ---- collecting feedback automatically (tunelab feedback collect; feedback/collect.py) --------------------------

JUDGE_TYPES = ("gold", "verifier", "reward_model", "judge")
# option -> the judge types it applies to
_JUDGE_OPTIONS = {"metric": ("gold",), "threshold": ("gold", "verifier", "reward_model"), "function": ("verifier",),
                  "model": ("reward_model", "judge"), "rubric": ("judge",), "max_new_tokens": ("judge",),
                  "batch_size": ("reward_model", "judge")}


class CollectJudgeSection(Section):
    """One way of judging a model's outputs automatically; each output gets one feedback record per judge."""

    type: Literal["gold", "verifier", "reward_model", "judge"] = Field(
        description="gold: against the data's gold labels / references; verifier: a Python function; reward_model: "
        "a run trained with task reward_model; judge: a chat model prompted with a rubric")
    metric: Literal["bleu", "chrf", "rouge"] | None = Field(
        None, description="gold, generated text: sentence BLEU or chrF (0-100), or ROUGE-L (0-1); default bleu for "
        "seq2seq, rouge for chat")
    threshold: float | None = Field(
        None, description="gold: the metric's value below which an output is bad (default: bleu 20, chrf 40, rouge "
        "0.3); verifier and reward_model: a score below it is bad, at or above good (default: none, the score alone "
        "for a reward model; a verifier's own verdict)")
    function: str | None = Field(None, description="verifier: 'module:function' or 'path/to/file.py:function'")
    model: str | None = Field(None, description="reward_model: its run directory; judge: a registered name, model "
                              "path or run directory")
    rubric: str | None = Field(None, description="judge: what to judge by, a text or a file; with {input}, {output} "
                               "and {reference} in it, the whole prompt (default: correct, helpful and to the point)")
    max_new_tokens: int | None = Field(None, ge=1, description="judge: tokens of the judge's reply (default 64)")
    batch_size: int | None = Field(None, ge=1, description="reward_model, judge: outputs per forward pass "
                                   "(default: the collection's batch size)")

    @model_validator(mode="after")
    def _options_of_type(self) -> "CollectJudgeSection":
        for option, types in _JUDGE_OPTIONS.items():
            if getattr(self, option) is not None and self.type not in types:
                raise ValueError(f"option '{option}' applies to judges of type {' or '.join(types)}, not {self.type}")
        needed = {"verifier": "function", "reward_model": "model", "judge": "model"}.get(self.type)
        if needed is not None and getattr(self, needed) is None:
            example = {"function": "tunelab.evaluate.verifiers:final_number", "model": "RUN_OR_MODEL"}[needed]
            raise ValueError(f"a {self.type} judge needs '{needed}' (e.g. {needed}: {example})")
        return self


class LoopSection(Section):
    """feedback.loop: `tunelab feedback loop CONFIG` (feedback/loop.py). Round 0 trains the config as it is; each
    round after it runs the last round's model over the next examples of the pool, judges the outputs with
    feedback.collect, builds training rows from the judgements and trains the next model, which is scored on
    data.validation."""

    rounds: int = Field(3, ge=1, description="rounds of feedback after round 0 (raise it and run again to add rounds)")
    pool: str | list[str] | None = Field(
        None, description="the examples the rounds' models are judged on, with their gold answers where a judge "
        "needs them (default: data.train, after the data.max_train_examples rows round 0 trains on)")
    pool_skip: int | None = Field(None, ge=0, description="leading pool examples that are not used (default: "
                                  "data.max_train_examples when the pool is data.train, else 0)")
    per_round: int = Field(1000, ge=1, description="pool examples judged in each round (round r takes the r-th slice)")
    build: FeedbackDataSection | None = Field(
        None, description="how each round's judgements become training rows (data.feedback's options; the loop "
        "sets model, model_version and mix_with); default: relabel (classification, tagging) or corrections with "
        "the gold reference (chat, seq2seq), from the bad outputs only")
    start_from: Literal["previous", "base"] = Field(
        "previous", description="previous: each round continues the last round's weights (methods full and "
        "freeze); base: each round trains model.source afresh (any method, e.g. a new LoRA adapter)")
    replay: bool = Field(True, description="mix round 0's examples and the earlier rounds' rows into each round's "
                         "rows (as data.feedback.mix_with), so that a round does not forget what came before")
    replay_ratio: float | None = Field(None, gt=0.0, description="replayed rows per feedback row, sampled "
                                       "(default: all of them)")
    train: dict[str, Any] = Field(default_factory=dict, description="train options of the feedback rounds over the "
                                  "config's train section, e.g. {epochs: 1, lr: 2.0e-5}")
    batch_size: int = Field(32, ge=1, description="examples per forward pass when the pool is judged")

    @model_validator(mode="after")
    def _build_is_the_loops(self) -> "LoopSection":
        build = self.build
        if build is not None:
            for name in ("model", "model_version", "mix_with", "mix_ratio"):
                if getattr(build, name) is not None:
                    raise ValueError(f"feedback.loop.build.{name} is set by the loop for each round (the last "
                                     f"round's model and its judgements; round 0's data and earlier rows, "
                                     f"feedback.loop.replay and replay_ratio)")
        if self.replay_ratio is not None and not self.replay:
            raise ValueError("feedback.loop.replay_ratio samples the replayed rows: it needs replay true")
        return self


class FeedbackSection(Section):
    """Where the job's language feedback is kept (see tunelab.feedback), how it is collected, and the loop."""

    store: str = Field(description="the feedback store: an SQLite file or an sqlite:///path URL (`tunelab feedback "
                       "... --config CONFIG` uses it)")
    collect: list[CollectJudgeSection] = Field(
        default_factory=list, description="`tunelab feedback collect --config CONFIG`: the judges of the model's "
        "outputs, e.g. [{type: gold}, {type: verifier, function: tunelab.evaluate.verifiers:final_number}]")
    loop: LoopSection | None = Field(
        None, description="`tunelab feedback loop CONFIG`: rounds of predict, collect, build, train, evaluate")

    @field_validator("store")
    @classmethod
    def _store_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("feedback.store must not be empty")
        return value


class TrainConfig(Section):
    output_dir: str
    model: ModelSection
    task: TaskSection
    data: DataSection
    method: MethodSection = Field(default_factory=MethodSection)
    train: TrainSection = Field(default_factory=TrainSection)
    feedback: FeedbackSection | None = None

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
        if self.train.sample_prompts and task not in ("causal_lm", "chat"):
            raise ValueError(f"train.sample_prompts: samples are generated text, for causal_lm and chat tasks, "
                             f"not {task}")
        family = (self.model.architecture or {}).get("family")
        if task == "seq2seq" and family is not None and family != "seq2seq":
            raise ValueError(f"task seq2seq needs an encoder-decoder: model.architecture.family seq2seq, not {family}")
        if self.model.warm_start is not None and task != "seq2seq":
            raise ValueError("model.warm_start: bert2bert builds an encoder-decoder for task.type seq2seq")
        if data.instruction is not None and task != "chat":
            raise ValueError("data.instruction turns source/target pairs into chat turns: it applies to task chat "
                             "(a seq2seq model reads the source as it is)")
        if task in PREFERENCE_TASKS and data.format not in PREFERENCE_DATA_FORMATS:
            raise ValueError(f"data.format {data.format!r} holds no preference pairs; task {task} reads "
                             f"{', '.join(PREFERENCE_DATA_FORMATS)}")
        if task not in PREFERENCE_TASKS and data.format in ("hh-rlhf", "preference", "openai"):
            raise ValueError(f"data.format {data.format} holds preference data: for task preference, kto or "
                             f"reward_model, not {task}")
        if task == "grpo":
            self._grpo_consistent()
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

    @model_validator(mode="after")
    def _loop(self) -> "TrainConfig":
        """feedback.loop: a round continues the last round's weights only where they are the whole model."""
        loop = self.feedback.loop if self.feedback is not None else None
        if loop is None:
            return self
        if loop.start_from == "previous" and self.method.type not in ("full", "freeze"):
            raise ValueError(f"feedback.loop.start_from previous continues the weights of method full or freeze; "
                             f"with method {self.method.type} each round trains a new adapter on model.source: "
                             f"start_from base")
        if self.data.feedback is not None:
            raise ValueError("feedback.loop builds each round's rows itself; round 0 trains on data.train: remove "
                             "data.feedback (its options go to feedback.loop.build)")
        if not self.data.validation_paths():
            raise ValueError("feedback.loop scores every round on data.validation: give a validation file (a split "
                             "of data.train would overlap the pool)")
        if not self.feedback.collect:
            raise ValueError("feedback.loop needs judges in feedback.collect, e.g. [{type: gold}]")
        return self

    @model_validator(mode="after")
    def _feedback_data(self) -> "TrainConfig":
        """data.train, or data.feedback (rows built from feedback.store) that fit the task."""
        data, built = self.data, self.data.feedback
        if built is None:
            if data.train is None:
                raise ValueError("data.train: give the training file(s), or data.feedback to build the training rows "
                                 "from the feedback store")
            if data.train == "feedback":
                raise ValueError("data.train: feedback builds the training rows from the feedback store: it needs a "
                                 "data.feedback section, e.g. {build: corrections}")
            return self
        task, kind = self.task.type, built.build
        if self.feedback is None:
            raise ValueError("data.feedback builds the training rows from the feedback store: say which store with "
                             "feedback.store")
        if data.train not in (None, "feedback"):
            raise ValueError(f"data.train and data.feedback both give the training data; to train on the feedback "
                             f"rows and {data.train}, give the file as data.feedback.mix_with")
        if task not in FEEDBACK_BUILD_TASKS[kind]:
            fits = [k for k, tasks in FEEDBACK_BUILD_TASKS.items() if task in tasks]
            hint = f"; for task {task} build {' or '.join(fits)}" if fits else f"; task {task} cannot train on feedback"
            raise ValueError(f"data.feedback.build {kind} makes rows for task {' or '.join(FEEDBACK_BUILD_TASKS[kind])}, "
                             f"not {task}{hint}")
        if data.format != "auto":
            raise ValueError(f"data.format {data.format!r}: with data.feedback the rows are jsonl and the validation "
                             f"and mix_with files are read by their extension and fields (data.format auto)")
        for name, value in (("data.instruction", data.instruction), ("data.text_pair_field", data.text_pair_field),
                            ("model.train_tokenizer", self.model.train_tokenizer)):
            if value is not None:
                raise ValueError(f"{name} does not apply to rows built from feedback (data.feedback)")
        if data.context_tokens:
            raise ValueError("data.context_tokens reads the neighbouring sentences of a document; rows built from "
                             "feedback are single sentences")
        if kind == "refine" and self.model.source is None and (built.refine is None or built.refine.model is None):
            raise ValueError("data.feedback.refine.model: a model built from scratch cannot write refinements; name "
                             "a chat model")
        return self

    def _grpo_consistent(self) -> None:
        """Task grpo: prompt records, and room for the completions."""
        data, task = self.data, self.task
        if data.format not in GRPO_DATA_FORMATS:
            raise ValueError(f"data.format {data.format!r} holds no prompts; task grpo reads records with a prompt "
                             f"({', '.join(GRPO_DATA_FORMATS)})")
        if data.max_length <= task.max_new_tokens:
            raise ValueError(f"data.max_length ({data.max_length}) must leave room for a prompt before "
                             f"task.max_new_tokens ({task.max_new_tokens}) completion tokens")
