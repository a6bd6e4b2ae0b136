"""The model object tunelab trains, evaluates, serves and saves: a backbone with named task heads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

import torch
import torch.utils.checkpoint
from torch import nn

from tunelab.nn.attention import build_attention_mask
from tunelab.nn.kv_cache import KVCache


@dataclass
class ModelConfig:
    """Fields shared by every family's config; each family adds its own."""

    model_type: str = ""
    vocab_size: int = 0
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Task heads: label names for classification / tagging heads (index = class id).
    labels: list[str] = field(default_factory=list)

    family = ""  # "bert", "gpt2", "llama", "rnn": set by each subclass

    @property
    def output_size(self) -> int:
        """Width of the hidden vectors the heads see."""
        return self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ModelOutput:
    """hidden [B, T, D]; pooled [B, D] (encoders with a pooler); logits of each head that ran, by name;
    state: a recurrent model's state after the last token (pass it back as `state=` to continue the text)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    logits: dict[str, torch.Tensor] = field(default_factory=dict)
    state: Any = None

    def __getitem__(self, head: str) -> torch.Tensor:
        return self.logits[head]


class Model(nn.Module):
    """backbone + heads. Head names: "lm" (causal LM), "mlm", "nsp", "classifier", "tagger", "qa"."""

    def __init__(self, config: ModelConfig, backbone: nn.Module, heads: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads or {})
        self.tie_weights()

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def is_decoder(self) -> bool:
        return getattr(self.backbone, "causal", False)

    @property
    def is_recurrent(self) -> bool:
        """A recurrent model (family rnn): it carries a state instead of attending to a KV cache."""
        return getattr(self.backbone, "recurrent", False)

    @property
    def is_encoder_decoder(self) -> bool:
        """An encoder-decoder (seq2seq): forward takes decoder_input_ids; generation encodes the source once."""
        return getattr(self.backbone, "encoder_decoder", False)

    def tie_weights(self) -> None:
        """Share the token-embedding matrix with the output projection where the config says so."""
        if not getattr(self.config, "tie_embeddings", False):
            return
        embedding = self.backbone.tok_embeddings.weight
        if "lm" in self.heads:
            self.heads["lm"].proj.weight = embedding
        if "mlm" in self.heads:
            self.heads["mlm"].decoder.weight = embedding

    def add_head(self, name: str, head: nn.Module) -> None:
        self.heads[name] = head
        self.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        state: Any = None,
        heads: Iterable[str] | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T]; attention_mask [B, T_past + T] (1 = token, 0 = padding).

        state: a recurrent model's state to start from (None: zeros); ModelOutput.state is the one after.
        heads: names of the heads to run (default all; () for hidden states only).
        decoder_input_ids [B, T_dec] (encoder-decoders only): the target shifted right; hidden and the heads'
        logits are then the decoder's.
        """
        new_state = None
        if self.is_recurrent:
            if cache is not None or document_ids is not None:
                raise ValueError("a recurrent model takes state=, not a KV cache or per-document masks "
                                 "(packed rows: train it with task recurrent_lm)")
            hidden, new_state = self.backbone(input_ids, attention_mask, state=state)
            pooled = None
        else:
            if state is not None:
                raise ValueError(f"state= is for recurrent models; a {self.family} model has none")
            extra = {}
            if decoder_input_ids is not None:
                extra = {"decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_attention_mask}
            hidden, pooled = self.backbone(
                input_ids,
                attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                document_ids=document_ids,
                cache=cache,
                **extra,
            )
        names = self.heads.keys() if heads is None else heads
        mask = attention_mask[:, -input_ids.shape[1]:] if attention_mask is not None else None
        if decoder_input_ids is not None:
            mask = decoder_attention_mask
        logits = {name: self.heads[name](hidden, pooled, mask) for name in names}
        return ModelOutput(hidden=hidden, pooled=pooled, logits=logits, state=new_state)

    def new_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None, device=None
    ) -> KVCache:
        """An empty KV cache for decoding up to max_len positions (decoders, and the decoder of an encoder-decoder)."""
        param = next(self.parameters())
        if self.is_encoder_decoder:
            return self.backbone.new_cache(batch_size, max_len, dtype=dtype or param.dtype, device=device or param.device)
        if not self.is_decoder or self.is_recurrent:
            raise TypeError(f"{self.family} is not a Transformer decoder; it has no KV cache")
        attn = self.backbone.layers[0].attn
        return KVCache(
            len(self.backbone.layers),
            batch_size,
            attn.num_kv_heads,
            attn.head_dim,
            max_len,
            dtype=dtype or param.dtype,
            device=device or param.device,
        )

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def set_gradient_checkpointing(self, enabled: bool = True) -> int:
        """Activation (gradient) checkpointing of every Transformer block (each child of a ModuleList named
        *layers): while training with autograd, a block keeps only its inputs and runs its forward again in the
        backward pass (torch.utils.checkpoint, non-reentrant; dropout draws the same masks again). The blocks
        keep their names and weights. Returns the blocks changed; recurrent layers are left as they are."""
        blocks = transformer_blocks(self)
        for block in blocks:
            block.__dict__.pop("forward", None)  # back to the class's forward
            if enabled:
                block.forward = _checkpointed(block)
        return len(blocks)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: each child of a ModuleList named *layers (an encoder-decoder's two stacks
    included), except torch's recurrent layers. Gradient checkpointing and FSDP2's sharding work block by block."""
    return [block for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1].endswith("layers")
            for block in module if not isinstance(block, nn.RNNBase)]


def _checkpointed(block: nn.Module):
    """`block`'s forward, checkpointed while training with autograd (plain otherwise: evaluation, decoding)."""
    plain = type(block).forward.__get__(block)

    def forward(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(plain, *args, use_reentrant=False, **kwargs)
        return plain(*args, **kwargs)

    return forward


def decoder_attention_mask(
    attention_mask: torch.Tensor | None,
    query_len: int,
    past_len: int,
    *,
    document_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for a causal decoder: no mask at all on the fast path (no padding, no packing)."""
    key_len = past_len + query_len
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if document_ids is not None and not bool((document_ids > 0).any()):
        # every row holds one document (a long text cut into rows; padding is -1 and masked as padding):
        # per-document attention is plain causal attention, which takes the fused kernel below
        document_ids = None
    if sliding_window is not None and key_len <= sliding_window:
        sliding_window = None
    if attention_mask is None and document_ids is None and sliding_window is None:
        if past_len == 0:
            return None, True
        if query_len == 1:
            return None, False
    mask = build_attention_mask(
        attention_mask, query_len, key_len, causal=True, document_ids=document_ids, sliding_window=sliding_window
    )
    return mask, False


def default_position_ids(input_ids: torch.Tensor, past_len: int) -> torch.Tensor:
    """[B, T] positions past_len .. past_len + T - 1 for every row."""
    T = input_ids.shape[1]
    return torch.arange(past_len, past_len + T, device=input_ids.device).expand(input_ids.shape[0], T)
