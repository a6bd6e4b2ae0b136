"""Hugging Face <-> tunelab weight names, one literal map per family.

Keys are HF module paths (without the base-model prefix such as "bert." and without the parameter
suffix), values are ours; "{}" stands for the layer index. A map may also hold a full parameter name
(ending in .weight/.bias) where one parameter moves on its own. Each map has its inverse.
"""

from __future__ import annotations

import re

BERT_BACKBONE = {
    "embeddings.word_embeddings": "backbone.embeddings.tok",
    "embeddings.position_embeddings": "backbone.embeddings.pos",
    "embeddings.token_type_embeddings": "backbone.embeddings.segment",
    "embeddings.LayerNorm": "backbone.embeddings.norm",
    "encoder.layer.{}.attention.self.query": "backbone.layers.{}.attn.q_proj",
    "encoder.layer.{}.attention.self.key": "backbone.layers.{}.attn.k_proj",
    "encoder.layer.{}.attention.self.value": "backbone.layers.{}.attn.v_proj",
    "encoder.layer.{}.attention.output.dense": "backbone.layers.{}.attn.o_proj",
    "encoder.layer.{}.attention.output.LayerNorm": "backbone.layers.{}.attn_norm",
    "encoder.layer.{}.intermediate.dense": "backbone.layers.{}.mlp.fc_in",
    "encoder.layer.{}.output.dense": "backbone.layers.{}.mlp.fc_out",
    "encoder.layer.{}.output.LayerNorm": "backbone.layers.{}.mlp_norm",
    "pooler.dense": "backbone.pooler.dense",
}

DISTILBERT_BACKBONE = {
    "embeddings.word_embeddings": "backbone.embeddings.tok",
    "embeddings.position_embeddings": "backbone.embeddings.pos",
    "embeddings.LayerNorm": "backbone.embeddings.norm",
    "transformer.layer.{}.attention.q_lin": "backbone.layers.{}.attn.q_proj",
    "transformer.layer.{}.attention.k_lin": "backbone.layers.{}.attn.k_proj",
    "transformer.layer.{}.attention.v_lin": "backbone.layers.{}.attn.v_proj",
    "transformer.layer.{}.attention.out_lin": "backbone.layers.{}.attn.o_proj",
    "transformer.layer.{}.sa_layer_norm": "backbone.layers.{}.attn_norm",
    "transformer.layer.{}.ffn.lin1": "backbone.layers.{}.mlp.fc_in",
    "transformer.layer.{}.ffn.lin2": "backbone.layers.{}.mlp.fc_out",
    "transformer.layer.{}.output_layer_norm": "backbone.layers.{}.mlp_norm",
}

GPT2_BACKBONE = {
    "wte": "backbone.tok_embeddings",
    "wpe": "backbone.pos_embeddings",
    "h.{}.ln_1": "backbone.layers.{}.attn_norm",
    "h.{}.attn.c_attn": "backbone.layers.{}.attn.qkv_proj",  # fused q|k|v, split on load
    "h.{}.attn.c_proj": "backbone.layers.{}.attn.o_proj",
    "h.{}.ln_2": "backbone.layers.{}.mlp_norm",
    "h.{}.mlp.c_fc": "backbone.layers.{}.mlp.fc_in",
    "h.{}.mlp.c_proj": "backbone.layers.{}.mlp.fc_out",
    "ln_f": "backbone.norm",
}

LLAMA_BACKBONE = {
    "embed_tokens": "backbone.tok_embeddings",
    "layers.{}.input_layernorm": "backbone.layers.{}.attn_norm",
    "layers.{}.self_attn.q_proj": "backbone.layers.{}.attn.q_proj",
    "layers.{}.self_attn.k_proj": "backbone.layers.{}.attn.k_proj",
    "layers.{}.self_attn.v_proj": "backbone.layers.{}.attn.v_proj",
    "layers.{}.self_attn.o_proj": "backbone.layers.{}.attn.o_proj",
    "layers.{}.post_attention_layernorm": "backbone.layers.{}.mlp_norm",
    "layers.{}.mlp.gate_proj": "backbone.layers.{}.mlp.gate_proj",
    "layers.{}.mlp.up_proj": "backbone.layers.{}.mlp.up_proj",
    "layers.{}.mlp.down_proj": "backbone.layers.{}.mlp.down_proj",
    "norm": "backbone.norm",
}

# Heads, by the role they play; HF names differ between families.
BERT_MLM = {
    "cls.predictions.transform.dense": "heads.mlm.dense",
    "cls.predictions.transform.LayerNorm": "heads.mlm.norm",
    "cls.predictions.decoder": "heads.mlm.decoder",
    "cls.predictions": "heads.mlm",  # cls.predictions.bias
}
BERT_NSP = {"cls.seq_relationship": "heads.nsp.out"}
ROBERTA_MLM = {
    "lm_head.dense": "heads.mlm.dense",
    "lm_head.layer_norm": "heads.mlm.norm",
    "lm_head.decoder": "heads.mlm.decoder",
    "lm_head": "heads.mlm",  # lm_head.bias
}
DISTILBERT_MLM = {
    "vocab_transform": "heads.mlm.dense",
    "vocab_layer_norm": "heads.mlm.norm",
    "vocab_projector.weight": "heads.mlm.decoder.weight",
    "vocab_projector.bias": "heads.mlm.bias",
}
CLASSIFIER = {"classifier": "heads.classifier.out"}
ROBERTA_CLASSIFIER = {"classifier.dense": "heads.classifier.dense", "classifier.out_proj": "heads.classifier.out"}
DISTILBERT_CLASSIFIER = {"pre_classifier": "heads.classifier.dense", "classifier": "heads.classifier.out"}
DECODER_CLASSIFIER = {"score": "heads.classifier.out"}
TAGGER = {"classifier": "heads.tagger.out"}
DECODER_TAGGER = {"score": "heads.tagger.out"}
QA = {"qa_outputs": "heads.qa.out"}
LM = {"lm_head": "heads.lm.proj"}

# HF keys that carry no weights of ours (buffers that older checkpoints saved).
IGNORED = [
    re.compile(r"(^|\.)position_ids$"),
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
    re.compile(r"(^|\.)attn\.(masked_)?bias$"),
    re.compile(r"^cls\.predictions\.decoder\.bias$"),  # the same tensor as cls.predictions.bias
    re.compile(r"^lm_head\.decoder\.bias$"),
]

_LAYER = re.compile(r"\.(\d+)\.")
_SUFFIX = re.compile(r"\.(weight|bias|gamma|beta)$")
_OLD_SUFFIX = {"gamma": "weight", "beta": "bias"}


def invert(name_map: dict[str, str]) -> dict[str, str]:
    """The inverse of a name map (ours -> HF)."""
    inverse = {v: k for k, v in name_map.items()}
    if len(inverse) != len(name_map):
        raise ValueError("name map is not one-to-one")
    return inverse


def _template(name: str) -> tuple[str, str | None]:
    """'a.3.b' -> ('a.{}.b', '3'); names without a layer index come back unchanged."""
    match = _LAYER.search(name)
    if match is None:
        return name, None
    return name[: match.start()] + ".{}." + name[match.end():], match.group(1)


def map_name(name: str, name_map: dict[str, str]) -> str | None:
    """Translate one parameter name through a map; None when the map does not cover it."""
    templ, layer = _template(name)
    if templ in name_map:  # a full parameter name
        return name_map[templ].format(layer)
    match = _SUFFIX.search(templ)
    if match is None:
        return None
    module, suffix = templ[: match.start()], _OLD_SUFFIX.get(match.group(1), match.group(1))
    if module not in name_map:
        return None
    return f"{name_map[module].format(layer)}.{suffix}"


def is_ignored(name: str) -> bool:
    return any(p.search(name) for p in IGNORED)
