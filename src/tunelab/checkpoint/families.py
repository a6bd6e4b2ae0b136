"""Each Hugging Face architecture tunelab reads and writes: its family, base-model prefix, heads and
weight names, and the translation of its config.json to and from our model configs."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.checkpoint import names as N
from tunelab.checkpoint.native import NATIVE_MODEL_TYPES
from tunelab.errors import CheckpointError
from tunelab.models.base import ModelConfig
from tunelab.models.bert import BertConfig
from tunelab.models.gpt2 import GPT2Config
from tunelab.models.llama import LlamaConfig


@dataclass(frozen=True)
class Architecture:
    name: str  # HF class name, e.g. "BertForMaskedLM"
    model_type: str  # config.json model_type
    backbone_map: dict[str, str]
    head_map: dict[str, str]
    prefix: str  # base-model prefix of backbone weights in this architecture, e.g. "bert."
    pooler: bool = False  # whether this HF class has BERT's pooler

    @property
    def heads(self) -> tuple[str, ...]:
        found = {v.split(".")[1] for v in self.head_map.values()}
        return tuple(sorted(found))


def _encoders(model_type: str, stem: str, backbone: dict, mlm: dict, classifier: dict) -> list[Architecture]:
    prefix = f"{model_type}."
    archs = [
        Architecture(f"{stem}Model", model_type, backbone, {}, "", pooler=model_type != "distilbert"),
        Architecture(f"{stem}ForMaskedLM", model_type, backbone, mlm, prefix),
        Architecture(
            f"{stem}ForSequenceClassification", model_type, backbone, classifier, prefix, pooler=model_type == "bert"
        ),
        Architecture(f"{stem}ForTokenClassification", model_type, backbone, N.TAGGER, prefix),
        Architecture(f"{stem}ForQuestionAnswering", model_type, backbone, N.QA, prefix),
    ]
    if model_type == "bert":
        archs += [
            Architecture("BertForPreTraining", "bert", backbone, {**mlm, **N.BERT_NSP}, prefix, pooler=True),
            Architecture("BertForNextSentencePrediction", "bert", backbone, N.BERT_NSP, prefix, pooler=True),
        ]
    return archs


def _decoders(model_type: str, stem: str, backbone: dict, prefix: str) -> list[Architecture]:
    lm_name = "GPT2LMHeadModel" if model_type == "gpt2" else f"{stem}ForCausalLM"
    tagger = N.TAGGER if model_type == "gpt2" else N.DECODER_TAGGER
    return [
        Architecture(f"{stem}Model", model_type, backbone, {}, ""),
        Architecture(lm_name, model_type, backbone, N.LM, prefix),
        Architecture(f"{stem}ForSequenceClassification", model_type, backbone, N.DECODER_CLASSIFIER, prefix),
        Architecture(f"{stem}ForTokenClassification", model_type, backbone, tagger, prefix),
    ]


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        *_encoders("bert", "Bert", N.BERT_BACKBONE, N.BERT_MLM, N.CLASSIFIER),
        *_encoders("roberta", "Roberta", N.BERT_BACKBONE, N.ROBERTA_MLM, N.ROBERTA_CLASSIFIER),
        *_encoders("distilbert", "DistilBert", N.DISTILBERT_BACKBONE, N.DISTILBERT_MLM, N.DISTILBERT_CLASSIFIER),
        *_decoders("gpt2", "GPT2", N.GPT2_BACKBONE, "transformer."),
        *_decoders("llama", "Llama", N.LLAMA_BACKBONE, "model."),
        *_decoders("mistral", "Mistral", N.LLAMA_BACKBONE, "model."),
        *_decoders("qwen2", "Qwen2", N.LLAMA_BACKBONE, "model."),
    ]
}

MODEL_TYPES = ("bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2")


def architecture_for(hf_config: dict, source: str) -> Architecture:
    """The Architecture named by config.json's `architectures` (or the bare model of its model_type)."""
    model_type = hf_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{source}: unknown architecture: model_type {model_type!r}; supported: "
            f"{', '.join(MODEL_TYPES + tuple(NATIVE_MODEL_TYPES))}"
        )
    for name in hf_config.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    names = hf_config.get("architectures")
    if names:
        raise CheckpointError(
            f"{source}: unknown architecture {names[0]!r} for model_type {model_type!r}; supported: "
            + ", ".join(a.name for a in ARCHITECTURES.values() if a.model_type == model_type)
        )
    return next(a for a in ARCHITECTURES.values() if a.model_type == model_type and not a.head_map)


def architecture_for_heads(model_type: str, heads: set[str]) -> Architecture:
    """The HF class that holds exactly these heads (for saving)."""
    if not any(arch.model_type == model_type for arch in ARCHITECTURES.values()):
        raise CheckpointError(f"{model_type} models have no Hugging Face architecture (saved in tunelab's own layout)")
    for arch in ARCHITECTURES.values():
        if arch.model_type == model_type and set(arch.heads) == heads:
            return arch
    raise CheckpointError(
        f"no Hugging Face architecture of model_type {model_type!r} has the heads {sorted(heads)}; "
        "save a model with one task head"
    )


# ---------------------------------------------------------------------------------------------
# config.json <-> our configs


def _labels(hf: dict) -> list[str]:
    id2label = hf.get("id2label") or {}
    if not id2label:
        return [f"LABEL_{i}" for i in range(hf.get("num_labels", 0))]
    return [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]


def _need(hf: dict, key: str, source: str):
    if key not in hf:
        raise CheckpointError(f"{source}: config.json has no {key!r}")
    return hf[key]


def config_from_hf(hf: dict, source: str) -> ModelConfig:
    """Our model config from an HF config.json dict; CheckpointError naming the missing or bad field."""
    arch = architecture_for(hf, source)
    mt = arch.model_type
    common = dict(
        model_type=mt,
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        labels=_labels(hf) if arch.heads and set(arch.heads) & {"classifier", "tagger"} else [],
    )
    try:
        if mt in ("bert", "roberta"):
            if hf.get("position_embedding_type", "absolute") != "absolute":
                raise CheckpointError(
                    f"{source}: position_embedding_type {hf['position_embedding_type']!r} is not supported (absolute only)"
                )
            return BertConfig(
                **common,
                vocab_size=_need(hf, "vocab_size", source),
                hidden_size=_need(hf, "hidden_size", source),
                num_layers=_need(hf, "num_hidden_layers", source),
                num_heads=_need(hf, "num_attention_heads", source),
                intermediate_size=_need(hf, "intermediate_size", source),
                hidden_act=hf.get("hidden_act", "gelu"),
                hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
                attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                max_position_embeddings=hf.get("max_position_embeddings", 512),
                type_vocab_size=hf.get("type_vocab_size", 2),
                layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                position_style="roberta" if mt == "roberta" else "absolute",
                add_pooler=arch.pooler,
                tie_embeddings=hf.get("tie_word_embeddings", True),
            )
        if mt == "distilbert":
            return BertConfig(
                **common,
                vocab_size=_need(hf, "vocab_size", source),
                hidden_size=_need(hf, "dim", source),
                num_layers=_need(hf, "n_layers", source),
                num_heads=_need(hf, "n_heads", source),
                intermediate_size=_need(hf, "hidden_dim", source),
                hidden_act=hf.get("activation", "gelu"),
                hidden_dropout=hf.get("dropout", 0.1),
                attention_dropout=hf.get("attention_dropout", 0.1),
                max_position_embeddings=hf.get("max_position_embeddings", 512),
                type_vocab_size=0,
                sinusoidal_positions=hf.get("sinusoidal_pos_embds", False),
                add_pooler=False,
                tie_embeddings=hf.get("tie_word_embeddings", True),
            )
        if mt == "gpt2":
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
                raise CheckpointError(f"{source}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx) are not supported")
            return GPT2Config(
                **common,
                vocab_size=_need(hf, "vocab_size", source),
                hidden_size=_need(hf, "n_embd", source),
                num_layers=_need(hf, "n_layer", source),
                num_heads=_need(hf, "n_head", source),
                intermediate_size=hf.get("n_inner") or 0,
                activation=hf.get("activation_function", "gelu_new"),
                max_position_embeddings=hf.get("n_positions", 1024),
                layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                dropout=hf.get("resid_pdrop", 0.1),
                attention_dropout=hf.get("attn_pdrop", 0.1),
                tie_embeddings=hf.get("tie_word_embeddings", True),
            )
        # Llama, Mistral, Qwen2
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        qkv_bias = hf.get("attention_bias", False) or mt == "qwen2"
        window = hf.get("sliding_window") if (mt == "mistral" or hf.get("use_sliding_window")) else None
        return LlamaConfig(
            **common,
            vocab_size=_need(hf, "vocab_size", source),
            hidden_size=_need(hf, "hidden_size", source),
            num_layers=_need(hf, "num_hidden_layers", source),
            num_heads=_need(hf, "num_attention_heads", source),
            num_kv_heads=hf.get("num_key_value_heads") or 0,
            head_dim=hf.get("head_dim") or 0,
            intermediate_size=_need(hf, "intermediate_size", source),
            hidden_act=hf.get("hidden_act", "silu"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=bool(qkv_bias),
            out_bias=bool(hf.get("attention_bias", False)) and mt != "qwen2",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
            attention_dropout=hf.get("attention_dropout", 0.0),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: config.json has a field of the wrong type: {e}") from None


def config_to_hf(config: ModelConfig, arch: Architecture) -> dict:
    """config.json for `config` saved as HF class `arch`."""
    mt = config.model_type
    hf: dict = {"architectures": [arch.name], "model_type": mt}
    if config.labels:
        hf["id2label"] = {str(i): name for i, name in enumerate(config.labels)}
        hf["label2id"] = {name: i for i, name in enumerate(config.labels)}
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(config, key) is not None:
            hf[key] = getattr(config, key)
    if isinstance(config, BertConfig) and mt != "distilbert":
        hf.update(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            hidden_dropout_prob=config.hidden_dropout,
            attention_probs_dropout_prob=config.attention_dropout,
            max_position_embeddings=config.max_position_embeddings,
            type_vocab_size=config.type_vocab_size,
            layer_norm_eps=config.layer_norm_eps,
            position_embedding_type="absolute",
            tie_word_embeddings=config.tie_embeddings,
        )
    elif isinstance(config, BertConfig):
        hf.update(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_layers,
            n_heads=config.num_heads,
            hidden_dim=config.intermediate_size,
            activation=config.hidden_act,
            dropout=config.hidden_dropout,
            attention_dropout=config.attention_dropout,
            max_position_embeddings=config.max_position_embeddings,
            sinusoidal_pos_embds=config.sinusoidal_positions,
            tie_word_embeddings=config.tie_embeddings,
        )
    elif isinstance(config, GPT2Config):
        hf.update(
            vocab_size=config.vocab_size,
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size or None,
            activation_function=config.activation,
            n_positions=config.max_position_embeddings,
            layer_norm_epsilon=config.layer_norm_eps,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.attention_dropout,
            tie_word_embeddings=config.tie_embeddings,
        )
    elif isinstance(config, LlamaConfig):
        hf.update(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta,
            rope_scaling=config.rope_scaling,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=config.tie_embeddings,
            attention_bias=config.out_bias or (config.qkv_bias and mt != "qwen2"),
            mlp_bias=config.mlp_bias,
            attention_dropout=config.attention_dropout,
        )
        if mt == "mistral" or config.sliding_window:
            hf["sliding_window"] = config.sliding_window
        if mt == "qwen2":
            hf["use_sliding_window"] = config.sliding_window is not None
    else:
        raise CheckpointError(f"cannot write config.json for model family {config.family!r}")
    return hf
