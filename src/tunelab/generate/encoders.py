"""Single-pass inference with encoders: sentence embeddings and masked-token prediction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.models.base import Model


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors of each sequence, padding excluded: [B, T, D], [B, T] -> [B, D]."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


@torch.inference_mode()
def embed(model: Model, tokenizer, texts: list[str], *, batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
    """Sentence embeddings [N, D]: mean-pooled last hidden states, L2-normalised (sentence-transformers'
    recipe for all-MiniLM-L6-v2)."""
    max_len = tokenizer.model_max_length or getattr(model.config, "max_position_embeddings", None)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer.encode_batch(
            texts[start : start + batch_size],
            padding=True,
            truncation=max_len is not None,
            max_length=max_len,
            return_tensors="pt",
        )
        hidden = model(
            batch["input_ids"], batch["attention_mask"], token_type_ids=batch.get("token_type_ids"), heads=()
        ).hidden
        vectors = mean_pool(hidden.float(), batch["attention_mask"])
        out.append(F.normalize(vectors, p=2, dim=-1) if normalize else vectors)
    return torch.cat(out) if out else torch.empty(0, model.config.hidden_size)


@dataclass
class MaskPrediction:
    token: str
    token_id: int
    probability: float
    sequence: str


def fill_mask(model: Model, tokenizer, text: str, *, top_k: int = 5) -> list[list[MaskPrediction]]:
    """The top_k tokens for every mask token in `text`, with probabilities (one list per mask)."""
    return fill_masks(model, tokenizer, [text], top_k=top_k)[0]


@torch.inference_mode()
def fill_masks(model: Model, tokenizer, texts: list[str], *, top_k: int = 5) -> list[list[list[MaskPrediction]]]:
    """fill_mask for several texts in one padded forward pass (right padding, masked out)."""
    if "mlm" not in model.heads:
        raise TypeError("this model has no masked-LM head; fill-mask needs one (e.g. a BertForMaskedLM checkpoint)")
    mask_token, mask_id = tokenizer.mask_token, tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError("the tokenizer has no mask token")
    encoded = [tokenizer.encode(text) for text in texts]
    for ids in encoded:
        if mask_id not in ids:
            raise ValueError(f"the text has no {mask_token} token")
    T = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), T), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(encoded), T, dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    device = next(model.parameters()).device
    logits = model(input_ids.to(device), attention_mask.to(device), heads=("mlm",)).logits["mlm"]  # [B, T, V]
    out = []
    for row, ids in enumerate(encoded):
        results = []
        for pos in (i for i, t in enumerate(ids) if t == mask_id):
            probs = logits[row, pos].float().softmax(dim=-1)
            top = torch.topk(probs, min(top_k, probs.shape[-1]))
            preds = []
            for p, t in zip(top.values.tolist(), top.indices.tolist()):
                filled = list(ids)
                filled[pos] = t
                preds.append(MaskPrediction(tokenizer.decode([t]).strip(), t, p, tokenizer.decode(filled)))
            results.append(preds)
        out.append(results)
    return out


@dataclass
class Classification:
    label: str
    score: float
    scores: dict[str, float]


@torch.inference_mode()
def classify(model: Model, tokenizer, texts: list[str], *, batch_size: int = 32) -> list[Classification]:
    """The classifier head's label and probabilities for each text (pairs: not here; see tunelab predict)."""
    if "classifier" not in model.heads:
        raise TypeError("this model has no classification head")
    labels = model.config.labels or [str(i) for i in range(model.heads["classifier"].out.out_features)]
    max_len = tokenizer.model_max_length or getattr(model.config, "max_position_embeddings", None)
    results = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer.encode_batch(texts[start : start + batch_size], padding=True, truncation=max_len is not None,
                                       max_length=max_len, return_tensors="pt")
        logits = model(batch["input_ids"], batch["attention_mask"], token_type_ids=batch.get("token_type_ids"),
                       heads=("classifier",)).logits["classifier"]
        for row in logits.float().softmax(dim=-1):
            best = int(row.argmax())
            results.append(Classification(labels[best], float(row[best]), dict(zip(labels, row.tolist()))))
    return results
