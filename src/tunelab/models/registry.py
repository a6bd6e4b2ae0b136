"""Model families by name, and the construction of a model with its task heads."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from tunelab.models import heads as H
from tunelab.models.base import Model, ModelConfig
from tunelab.models.bert import BertConfig, BertModel, BertPooler
from tunelab.models.gpt2 import GPT2Config, GPT2Model
from tunelab.models.llama import LlamaConfig, LlamaModel
from tunelab.models.rnn import RNNConfig, RNNModel
from tunelab.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from tunelab.nn.attention import Attention

FAMILIES: dict[str, tuple[type[ModelConfig], type[nn.Module]]] = {
    "bert": (BertConfig, BertModel),
    "gpt2": (GPT2Config, GPT2Model),
    "llama": (LlamaConfig, LlamaModel),
    "rnn": (RNNConfig, RNNModel),
    "seq2seq": (Seq2SeqConfig, Seq2SeqTransformer),
}

HEAD_NAMES = ("lm", "mlm", "nsp", "classifier", "tagger", "qa")


def config_from_dict(data: dict) -> ModelConfig:
    """Our own serialised config (ModelConfig.to_dict) back into its family's dataclass."""
    family = data.get("family")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family][0].from_dict(data)


def config_from_architecture(architecture: dict, **defaults) -> ModelConfig:
    """A family config from a user's `model.architecture` mapping, strictly: an unknown field is an error.

    `defaults` (vocabulary size, special-token ids taken from the tokenizer) fill fields the mapping leaves out.
    """
    import difflib
    from dataclasses import fields

    arch = dict(architecture)
    family = arch.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(f"model.architecture.family: unknown family {family!r}; known: {', '.join(FAMILIES)}")
    cls = FAMILIES[family][0]
    known = {f.name for f in fields(cls)} - {"model_type", "labels"}
    for key in arch:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
            raise ValueError(f"model.architecture.{key}: not a field of a {family} config{hint}")
    values = {**{k: v for k, v in defaults.items() if k in known}, **arch}
    config = cls(**values)
    if not isinstance(config, RNNConfig):
        if config.hidden_size <= 0 or config.num_layers <= 0 or config.num_heads <= 0:
            raise ValueError(f"model.architecture: hidden_size, num_layers and num_heads must be positive "
                             f"(got {config.hidden_size}, {config.num_layers}, {config.num_heads})")
        if config.hidden_size % config.num_heads:
            raise ValueError(f"model.architecture: hidden_size {config.hidden_size} is not divisible by "
                             f"num_heads {config.num_heads}")
    check = getattr(config, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise ValueError(f"model.architecture: {err}") from None
    return config


def make_head(config: ModelConfig, name: str, num_labels: int | None = None) -> nn.Module:
    """A fresh head called `name` shaped for `config` (num_labels defaults to len(config.labels))."""
    dim, mt = config.output_size, config.model_type
    labels = num_labels if num_labels is not None else len(config.labels)
    dropout = getattr(config, "hidden_dropout", getattr(config, "dropout", 0.0))
    if isinstance(config, RNNConfig):
        dropout = 0.0  # the recurrent backbone applies its output_dropout before any head
    if name == "lm":  # a recurrent LM's output layer has a bias (the unigram frequencies), as in Merity et al.;
        # an encoder-decoder predicts its target vocabulary
        return H.LMHead(dim, getattr(config, "output_vocab_size", config.vocab_size), bias=isinstance(config, RNNConfig))
    if name == "mlm":
        eps = getattr(config, "layer_norm_eps", 1e-12)
        return H.MaskedLMHead(dim, config.vocab_size, getattr(config, "hidden_act", "gelu"), eps)
    if name == "nsp":
        return H.NextSentenceHead(dim)
    if name in ("classifier", "tagger") and labels < 1:
        raise ValueError(f"the {name} head needs num_labels (or labels in the config)")
    if name == "classifier":
        if isinstance(config, RNNConfig):  # the backbone's output dropout already sits before the head
            return H.SequenceClassificationHead(dim, labels, pooling=config.classifier_pooling, dropout=0.0)
        if mt == "bert":
            return H.SequenceClassificationHead(dim, labels, pooling="pooled", dropout=dropout)
        if mt == "roberta":
            return H.SequenceClassificationHead(dim, labels, pooling="first", dropout=dropout, hidden_activation="tanh")
        if mt == "distilbert":
            return H.SequenceClassificationHead(dim, labels, pooling="first", dropout=dropout, hidden_activation="relu")
        return H.SequenceClassificationHead(dim, labels, pooling="last", dropout=0.0, bias=False)
    if name == "tagger":
        return H.TokenClassificationHead(dim, labels, dropout)
    if name == "qa":
        return H.SpanQAHead(dim)
    raise ValueError(f"unknown head {name!r}; known: {', '.join(HEAD_NAMES)}")


def ensure_pooler(model: Model, heads: Iterable[str]) -> nn.Module | None:
    """Give a BERT backbone without a pooler (a BertForMaskedLM checkpoint has none) a fresh one when one of
    `heads` reads the pooled [CLS] vector: "nsp", or BERT's "classifier". Returns the new pooler, or None."""
    heads = set(heads)
    needed = "nsp" in heads or ("classifier" in heads and model.config.model_type == "bert")
    if model.family != "bert" or not needed or getattr(model.backbone, "pooler", None) is not None:
        return None
    param = next(model.parameters())
    pooler = BertPooler(model.config.hidden_size).to(device=param.device, dtype=param.dtype)
    model.backbone.pooler = pooler
    model.config.add_pooler = True
    return pooler


def build_model(config: ModelConfig, heads: Iterable[str] = (), num_labels: int | None = None) -> Model:
    """A randomly initialised model of config's family with the named heads."""
    if config.family not in FAMILIES:
        raise ValueError(f"unknown model family {config.family!r}")
    backbone = FAMILIES[config.family][1](config)
    model = Model(config, backbone, {name: make_head(config, name, num_labels) for name in heads})
    model.apply(init_weights)
    if hasattr(backbone, "init_weights"):
        backbone.init_weights()  # a family whose paper initialises otherwise (rnn, seq2seq)
    model.tie_weights()
    return model


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, 0.02) weights and zero biases, as BERT and GPT-2 initialise (norms keep ones/zeros)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        if module.weight.requires_grad:
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None and module.weight.requires_grad:
            module.weight.data[module.padding_idx].zero_()


def mimetic_init(model: nn.Module, qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4)) -> int:
    """Mimetic initialisation (Trockman & Kolter 2023) of every Attention module of `model`, in place; returns
    how many it set. Meant for self-attention models (bert, gpt2, llama: what model.init accepts); an
    encoder-decoder's cross-attention would be set the same way.

    Trained attention layers show W_q^T W_k close to a multiple of the identity (a token attends to tokens
    like itself) and W_o W_v close to minus one. This starts them there: per key/value head,
    W_q^T W_k = a1 Z1 + b1 I and, for the layer, (W_o W_v)^T = a2 Z2 - b2 I, Z with N(0, 1/dim) entries,
    each product split into its two factors by the rank-head_dim truncation of its SVD (sqrt of the
    singular values on each side). (a1, b1) = qk, (a2, b2) = vo; the paper's values are the defaults.
    Biases stay zero. Draws from torch's global generator, so a seeded run starts the same.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        dim, hd = module.q_proj.in_features, module.head_dim
        group = module.num_heads // module.num_kv_heads
        with torch.no_grad():
            for g in range(module.num_kv_heads):
                u, s, v = _factor(qk, dim, hd)  # M ~ u diag(s) v^T, rank hd
                q_part, k_part = (u * s.sqrt()).T, (v * s.sqrt()).T  # [hd, dim]: q^T k = M
                module.k_proj.weight[g * hd:(g + 1) * hd] = k_part
                for h in range(g * group, (g + 1) * group):  # query heads sharing this key head share its M
                    module.q_proj.weight[h * hd:(h + 1) * hd] = q_part
            if module.v_proj.out_features == dim == module.o_proj.in_features:  # (o v)^T = M needs square projections
                u, s, v = _factor((vo[0], -vo[1]), dim, dim)
                module.v_proj.weight.copy_((u * s.sqrt()).T)  # v^T = u sqrt(s)
                module.o_proj.weight.copy_(v * s.sqrt())  # o^T = sqrt(s) v^T
        count += 1
    return count


def _factor(ab: tuple[float, float], dim: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-`rank` SVD (u [dim, rank], s [rank], v [dim, rank]) of a Z + b I, Z ~ N(0, 1/dim)."""
    a, b = ab
    m = a * torch.randn(dim, dim) / dim**0.5 + b * torch.eye(dim)
    u, s, vh = torch.linalg.svd(m)
    return u[:, :rank], s[:rank], vh[:rank].T
