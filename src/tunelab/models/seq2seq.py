"""The encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need"), and BERT2BERT.

Encoder layer (post-LN, as in the paper, sec. 3.1):
    h = LN(x + Dropout(SelfAttention(x)))                  padding keys masked
    y = LN(h + Dropout(FFN(h)))                            FFN(x) = W_2 max(0, x W_1 + b_1) + b_2  (eq. 2)
Decoder layer:
    h = LN(y + Dropout(CausalSelfAttention(y)))            KV cache when decoding
    c = LN(h + Dropout(CrossAttention(h, memory)))         keys / values of the encoder output, projected once
    z = LN(c + Dropout(FFN(c)))
With norm_first the norm moves inside each residual branch, x + Sublayer(LN(x)), and each stack ends with
a final LN (pre-LN; Xiong et al. 2020), which trains with larger learning rates and shorter warm-up.

Embeddings (sec. 3.4, 3.5): token embeddings multiplied by sqrt(d_model), plus the sinusoidal encodings
PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)), then dropout. The decoder's
input embedding is the output projection's weight (logits = z E^T); with one vocabulary for both languages
the encoder uses the same matrix, so all three are one tensor.

BERT2BERT (Rothe et al. 2020, "Leveraging Pre-trained Checkpoints for Sequence Generation Tasks"):
`embeddings="bert"` makes both sides BERT-shaped so that a BERT checkpoint initialises them. The encoder is
BERT's embeddings (learned positions, segments, LayerNorm) and BERT's layers; the decoder is a second copy
of them run causally, with a freshly initialised cross-attention block after each self-attention, and the
output projection tied to the decoder's word embeddings. `warm_start_from_bert` copies the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.models.base import ModelConfig
from tunelab.models.bert import BertConfig, BertEmbeddings, BertLayer
from tunelab.nn.attention import Attention, build_attention_mask
from tunelab.nn.kv_cache import KVCache
from tunelab.nn.mlp import MLP
from tunelab.nn.positions import sinusoidal_positions

EMBEDDING_STYLES = ("sinusoidal", "bert")


@dataclass
class Seq2SeqConfig(ModelConfig):
    """Sizes of the encoder-decoder. Special-token ids (pad, bos, eos) are the target vocabulary's."""

    model_type: str = "tunelab-seq2seq"
    num_decoder_layers: int = 0  # 0: as many as num_layers (the encoder's)
    intermediate_size: int = 0  # d_ff; 0: 4 * hidden_size (2048 for d_model 512 in the paper)
    activation: str = "relu"
    dropout: float = 0.1  # P_drop on every sub-layer output and on the embedding sums (sec. 5.4)
    attention_dropout: float = 0.0
    max_position_embeddings: int = 1024  # rows of the sinusoid table (or BERT's learned positions)
    layer_norm_eps: float = 1e-5
    norm_first: bool = False  # False: post-LN as in the paper; True: pre-LN with a final LN per stack
    target_vocab_size: int = 0  # 0: one vocabulary shared by source and target
    tie_embeddings: bool = True  # decoder input embedding = output projection (and = encoder's when shared)
    decoder_start_token_id: int | None = None  # first decoder input; None: bos, else eos
    embeddings: str = "sinusoidal"  # "bert": BERT2BERT (learned positions, segments, LayerNorm, post-LN BERT layers)
    type_vocab_size: int = 2  # BERT segment embeddings (embeddings="bert" only)

    family = "seq2seq"

    def __post_init__(self) -> None:
        if self.embeddings not in EMBEDDING_STYLES:
            raise ValueError(f"embeddings must be one of {', '.join(EMBEDDING_STYLES)}, got {self.embeddings!r}")
        if self.embeddings == "bert" and (self.target_vocab_size or self.norm_first):
            raise ValueError("BERT2BERT (embeddings: bert) shares BERT's vocabulary and post-LN layers: "
                             "target_vocab_size and norm_first do not apply")

    @property
    def shared_vocabulary(self) -> bool:
        return not self.target_vocab_size

    @property
    def output_vocab_size(self) -> int:
        """Rows of the output projection: the target vocabulary."""
        return self.target_vocab_size or self.vocab_size

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def start_token_id(self) -> int:
        """The token the decoder starts from: decoder_start_token_id, else bos, else eos."""
        for candidate in (self.decoder_start_token_id, self.bos_token_id, self.eos_token_id):
            if isinstance(candidate, list):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        raise ValueError("the seq2seq config names no decoder_start_token_id, bos_token_id or eos_token_id")

    def bert_config(self) -> BertConfig:
        """BERT's view of these sizes (embeddings="bert"): what BertEmbeddings and BertLayer are built from."""
        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, pad_token_id=self.pad_token_id, intermediate_size=self.ffn_size,
            hidden_act=self.activation, hidden_dropout=self.dropout, attention_dropout=self.attention_dropout,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps, add_pooler=False,
        )


class EncoderLayer(nn.Module):
    """Self-attention over the source (padding masked) and the FFN, each in a residual with LayerNorm."""

    def __init__(self, config: Seq2SeqConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm_first = config.norm_first
        self.attn = Attention(d, config.num_heads, qkv_bias=True, out_bias=True, dropout=config.attention_dropout,
                              layer_idx=layer_idx)
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = MLP(d, config.ffn_size, config.activation, bias=True)
        self.mlp_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, D], mask [B, 1, S, S] or None -> [B, S, D]."""
        if self.norm_first:
            x = x + self.dropout(self.attn(self.attn_norm(x), mask=mask))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + self.dropout(self.attn(x, mask=mask)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, FFN; each residual with LayerNorm.

    The self-attention and FFN weights have BertLayer's names (attn, attn_norm, mlp, mlp_norm), so a BERT
    layer's weights load into a decoder layer as they are (BERT2BERT); cross_attn and cross_norm are new.
    """

    def __init__(self, config: Seq2SeqConfig, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm_first = config.norm_first
        self.attn = Attention(d, config.num_heads, qkv_bias=True, out_bias=True, dropout=config.attention_dropout,
                              layer_idx=layer_idx)
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.cross_attn = Attention(d, config.num_heads, qkv_bias=True, out_bias=True,
                                    dropout=config.attention_dropout, layer_idx=layer_idx)
        self.cross_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = MLP(d, config.ffn_size, config.activation, bias=True)
        self.mlp_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        y: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor | None,
        *,
        self_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """y [B, T, D]; memory_kv: encoder keys / values [B, H, S, hd]; memory_mask [B, 1, 1, S] -> [B, T, D]."""
        drop = self.dropout
        if self.norm_first:
            y = y + drop(self.attn(self.attn_norm(y), mask=self_mask, is_causal=is_causal, cache=cache))
            y = y + drop(self.cross_attn(self.cross_norm(y), mask=memory_mask, memory_kv=memory_kv))
            return y + drop(self.mlp(self.mlp_norm(y)))
        y = self.attn_norm(y + drop(self.attn(y, mask=self_mask, is_causal=is_causal, cache=cache)))
        y = self.cross_norm(y + drop(self.cross_attn(y, mask=memory_mask, memory_kv=memory_kv)))
        return self.mlp_norm(y + drop(self.mlp(y)))


@dataclass
class EncoderOutput:
    """What the decoder needs of the source: hidden [B, S, D], the padding mask [B, 1, 1, S] (None: no padding),
    and every decoder layer's cross-attention keys and values [B, H, S, hd] (computed once per source)."""

    hidden: torch.Tensor
    mask: torch.Tensor | None
    memory_kv: list[tuple[torch.Tensor, torch.Tensor]]

    def select(self, indices: torch.Tensor) -> "EncoderOutput":
        """Rows `indices` of the batch (beam search: each source repeated once per beam)."""
        pick = lambda t: t.index_select(0, indices)  # noqa: E731
        return EncoderOutput(pick(self.hidden), None if self.mask is None else pick(self.mask),
                             [(pick(k), pick(v)) for k, v in self.memory_kv])


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder backbone: (source ids [B, S], target-side decoder inputs [B, T]) -> decoder hidden [B, T, D]."""

    causal = False
    encoder_decoder = True

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        if config.embeddings == "bert":
            bert = config.bert_config()
            self.encoder_embeddings = BertEmbeddings(bert)
            self.decoder_embeddings = BertEmbeddings(bert)
            self.encoder_layers = nn.ModuleList(BertLayer(bert, i) for i in range(config.num_layers))
        else:
            # the target (decoder input and output) table; the source has its own only when the vocabularies
            # are separate
            self.token_embeddings = nn.Embedding(config.output_vocab_size, d)
            self.source_embeddings = None if config.shared_vocabulary else nn.Embedding(config.vocab_size, d)
            self.register_buffer("positions", sinusoidal_positions(config.max_position_embeddings, d), persistent=False)
            self.embed_dropout = nn.Dropout(config.dropout)
            self.encoder_layers = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.decoder_layers))
        # pre-LN stacks end with a norm (their residual stream is never normalised otherwise)
        self.encoder_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm_first else None
        self.decoder_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm_first else None

    # ------------------------------------------------------------------ embeddings

    @property
    def tok_embeddings(self) -> nn.Embedding:
        """The target-side token table: the decoder's input embedding, which the output projection is tied to."""
        if self.config.embeddings == "bert":
            return self.decoder_embeddings.tok
        return self.token_embeddings

    def _sinusoidal(self, table: nn.Embedding, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Embedding * sqrt(d_model) + PE[position] (sec. 3.4, 3.5), then dropout; [B, T, D]."""
        if int(position_ids.max()) >= self.positions.shape[0]:
            raise ValueError(f"a sequence reaches position {int(position_ids.max())}; this model has "
                             f"max_position_embeddings {self.positions.shape[0]}")
        x = table(ids) * math.sqrt(self.config.hidden_size) + self.positions[position_ids].to(table.weight.dtype)
        return self.embed_dropout(x)

    def embed_source(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.embeddings == "bert":
            return self.encoder_embeddings(input_ids, token_type_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        table = self.source_embeddings if self.source_embeddings is not None else self.token_embeddings
        return self._sinusoidal(table, input_ids, positions)

    def embed_target(self, decoder_input_ids: torch.Tensor, past: int = 0) -> torch.Tensor:
        T = decoder_input_ids.shape[1]
        positions = torch.arange(past, past + T, device=decoder_input_ids.device).expand_as(decoder_input_ids)
        if self.config.embeddings == "bert":
            return self.decoder_embeddings(decoder_input_ids, None, positions)
        return self._sinusoidal(self.token_embeddings, decoder_input_ids, positions)

    # ------------------------------------------------------------------ the two stacks

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               token_type_ids: torch.Tensor | None = None) -> EncoderOutput:
        """Source ids [B, S] (attention_mask [B, S]: 1 = token, 0 = padding) -> EncoderOutput."""
        S = input_ids.shape[1]
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        self_mask = build_attention_mask(attention_mask, S, S, causal=False)  # [B, 1, S, S] or None
        x = self.embed_source(input_ids, token_type_ids)  # [B, S, D]
        for layer in self.encoder_layers:
            x = layer(x, self_mask)
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        memory_mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()  # [B, 1, 1, S]
        memory_kv = [layer.cross_attn.project_memory(x) for layer in self.decoder_layers]
        return EncoderOutput(x, memory_mask, memory_kv)

    def decode(self, decoder_input_ids: torch.Tensor, encoded: EncoderOutput, *,
               decoder_attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Decoder inputs [B, T] (after the cached positions) -> hidden [B, T, D].

        Targets are right-padded, so the causal mask alone keeps every real position away from padding; a
        decoder_attention_mask is only needed for left-padded decoder inputs.
        """
        past = cache.length if cache is not None else 0
        T = decoder_input_ids.shape[1]
        self_mask, is_causal = None, past == 0 and T > 1  # one new position sees every cached one: no mask
        if decoder_attention_mask is not None and bool(decoder_attention_mask.all()):
            decoder_attention_mask = None
        if decoder_attention_mask is not None or (past > 0 and T > 1):
            self_mask = build_attention_mask(decoder_attention_mask, T, past + T, causal=True)
            is_causal = False
        y = self.embed_target(decoder_input_ids, past)  # [B, T, D]
        for layer, memory_kv in zip(self.decoder_layers, encoded.memory_kv):
            y = layer(y, memory_kv, encoded.mask, self_mask=self_mask, is_causal=is_causal, cache=cache)
        if cache is not None:
            cache.advance(T)
        if self.decoder_norm is not None:
            y = self.decoder_norm(y)
        return y

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Teacher forcing: source [B, S] and decoder inputs [B, T] -> decoder hidden [B, T, D]."""
        if decoder_input_ids is None:
            raise TypeError("an encoder-decoder needs decoder_input_ids (the target shifted right)")
        if position_ids is not None or document_ids is not None:
            raise TypeError("the encoder-decoder computes its own positions; packed rows are not supported")
        encoded = self.encode(input_ids, attention_mask, token_type_ids=token_type_ids)
        return self.decode(decoder_input_ids, encoded, decoder_attention_mask=decoder_attention_mask, cache=cache), None

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype, device) -> KVCache:
        """An empty self-attention cache of the decoder layers."""
        attn = self.decoder_layers[0].attn
        return KVCache(len(self.decoder_layers), batch_size, attn.num_kv_heads, attn.head_dim, max_len,
                       dtype=dtype, device=device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The sinusoidal model's initialisation: token embeddings N(0, d^-1/2), so that after the sqrt(d)
        scale they have unit variance like the positions, and Xavier-uniform projections (as the reference
        tensor2tensor and fairseq implementations do). BERT2BERT keeps BERT's N(0, 0.02)."""
        if self.config.embeddings == "bert":
            return
        d = self.config.hidden_size
        for table in (self.token_embeddings, self.source_embeddings):
            if table is not None:
                nn.init.normal_(table.weight, std=d ** -0.5)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def warm_start_from_bert(model, bert) -> None:
    """BERT2BERT (Rothe et al. 2020): copy a BERT model's embeddings and layers into both the encoder and the
    decoder of `model` (a seq2seq Model with embeddings="bert"); cross-attention stays as initialised.

    Decoder layer i gets BERT layer i's self-attention and FFN (BERT has no causal mask; the decoder applies
    one). The output projection is tied to the decoder's word embeddings.
    """
    backbone, source = model.backbone, bert.backbone
    if model.config.embeddings != "bert":
        raise ValueError("warm start from BERT needs a seq2seq config with embeddings='bert'")
    if len(backbone.decoder_layers) > len(source.layers) or len(backbone.encoder_layers) > len(source.layers):
        raise ValueError(f"the BERT model has {len(source.layers)} layers; the seq2seq model asks for "
                         f"{len(backbone.encoder_layers)} encoder and {len(backbone.decoder_layers)} decoder layers")
    embeddings = source.embeddings.state_dict()
    backbone.encoder_embeddings.load_state_dict(embeddings)
    backbone.decoder_embeddings.load_state_dict(embeddings)
    for i, layer in enumerate(backbone.encoder_layers):
        layer.load_state_dict(source.layers[i].state_dict())
    for i, layer in enumerate(backbone.decoder_layers):
        missing, unexpected = layer.load_state_dict(source.layers[i].state_dict(), strict=False)
        assert not unexpected and all(k.startswith(("cross_attn.", "cross_norm.")) for k in missing), missing
    model.tie_weights()
