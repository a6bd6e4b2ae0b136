"""The "freeze" fine-tuning method: train the upper layers and heads, keep embeddings and lower layers fixed.

Lower Transformer layers hold general features and the embeddings most of the parameters of small models;
freezing them (Howard and Ruder 2018; Lee et al. 2019, "What would Elsa do?") cuts memory and overfitting.
"""

from __future__ import annotations

from torch import nn


def _embedding_modules(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's token / position / segment embedding tables (not those inside its layers)."""
    return [
        m
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Embedding) and not name.startswith("layers.")
    ]


def freeze(model: nn.Module, *, embeddings: bool = True, first_n_layers: int = 0) -> None:
    """Set requires_grad False on the embeddings (token, position, segment) and the first N backbone layers.

    Other parameters are left as they are. An output projection tied to the token embeddings (GPT-2's and
    BERT's MLM head) is the same tensor and is frozen with them.
    """
    backbone = getattr(model, "backbone", model)
    layers = getattr(backbone, "layers", None)
    if first_n_layers < 0:
        raise ValueError(f"first_n_layers must be >= 0, got {first_n_layers}")
    if first_n_layers and layers is None:
        raise ValueError(f"{type(backbone).__name__} has no `layers` to freeze")
    if layers is not None and first_n_layers > len(layers):
        raise ValueError(f"first_n_layers={first_n_layers} but the model has only {len(layers)} layers")
    if embeddings:
        for module in _embedding_modules(backbone):
            module.requires_grad_(False)
    for layer in list(layers or [])[:first_n_layers]:
        layer.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
