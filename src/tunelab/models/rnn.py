"""Recurrent language models: Elman RNN, LSTM and GRU over word embeddings, with tied input/output embeddings.

The recurrent layers are torch's own (nn.RNN, nn.LSTM, nn.GRU), one module per layer so that dropout can
sit between them. Per time step t, with x_t the layer input and h_{t-1} the previous hidden state:

    RNN  (Elman 1990):                h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)       (or relu)
    LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000):
        i_t = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)       input gate
        f_t = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)       forget gate
        g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)          candidate cell
        o_t = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)       output gate
        c_t = f_t * c_{t-1} + i_t * g_t;   h_t = o_t * tanh(c_t)
    GRU  (Cho et al. 2014):
        r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr);  z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn));  h_t = (1 - z_t) * n_t + z_t * h_{t-1}

torch stores the four LSTM gates (three GRU gates) stacked in weight_ih_l0 / weight_hh_l0 in the order
i, f, g, o (r, z, n).

Dropout, as in Merity et al. 2018 ("Regularizing and Optimizing LSTM Language Models", AWD-LSTM, sec. 4),
each optional:
    embedding_dropout  whole words: rows of the embedding matrix zeroed for a forward pass (Gal & Ghahramani 2016)
    input_dropout      on the embedded inputs of the first layer
    hidden_dropout     between recurrent layers
    output_dropout     on the last layer's outputs, before the heads
    weight_dropout     DropConnect (Wan et al. 2013) on the hidden-to-hidden weights W_hh: one mask per forward
                       pass, shared by every time step (Merity et al.'s "weight drop", their main regulariser)
With `variational_dropout` (default) a mask is drawn once per sequence and reused at every time step
(Gal & Ghahramani 2016; Merity et al.'s "locked dropout"); without it every element of every step gets its
own mask, which is Zaremba et al. 2014 ("Recurrent Neural Network Regularization": dropout on the
non-recurrent connections only). The recurrent state itself is never dropped.

Tied embeddings (Press & Wolf 2017; Inan et al. 2017): the output layer's weight is the input embedding
matrix [V, E]. When the recurrent layers are wider than the embeddings (hidden_size != embedding_size), a
linear projection H -> E (`out_proj`) maps the last layer's output to the embedding size, so every head sees
vectors of `output_size` = E; without tying the heads see the last layer's H-wide output.

State: `forward(..., state=S)` starts from S (None: zeros) and returns the state after the last real token
of every row, so that a long text can be fed in consecutive chunks (truncated back-propagation through
time): chunk by chunk with the state carried gives the same outputs as the whole text at once.
A state is a list with one tuple per layer: (h, c) for an LSTM, (h,) for an RNN or GRU, each [1, B, H].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tunelab.models.base import ModelConfig

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
POOLINGS = ("last", "max", "mean", "concat")

RecurrentState = list[tuple[torch.Tensor, ...]]


@dataclass
class RNNConfig(ModelConfig):
    model_type: str = "tunelab-rnn"
    cell: str = "lstm"  # rnn, lstm or gru
    nonlinearity: str = "tanh"  # cell "rnn" only: tanh or relu
    embedding_size: int = 0  # 0 = hidden_size
    embedding_dropout: float = 0.0
    input_dropout: float = 0.0
    hidden_dropout: float = 0.0
    output_dropout: float = 0.0
    weight_dropout: float = 0.0
    variational_dropout: bool = True
    tie_embeddings: bool = True
    classifier_pooling: str = "concat"  # last, max, mean, concat ([last; max; mean], Howard & Ruder 2018)

    family = "rnn"

    @property
    def embedding_dim(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def output_size(self) -> int:
        """Width of the vectors the heads see: the embedding size when tied, else the hidden size."""
        return self.embedding_dim if self.tie_embeddings else self.hidden_size

    def check(self) -> None:
        """ValueError naming the first field that cannot build a model."""
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be tanh or relu, got {self.nonlinearity!r}")
        if self.hidden_size <= 0 or self.num_layers <= 0 or self.embedding_size < 0 or self.vocab_size <= 0:
            raise ValueError(f"vocab_size, hidden_size and num_layers must be positive and embedding_size >= 0 "
                             f"(got {self.vocab_size}, {self.hidden_size}, {self.num_layers}, {self.embedding_size})")
        for name in ("embedding_dropout", "input_dropout", "hidden_dropout", "output_dropout", "weight_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.classifier_pooling not in POOLINGS:
            raise ValueError(f"classifier_pooling must be one of {', '.join(POOLINGS)}, got {self.classifier_pooling!r}")


class SequenceDropout(nn.Module):
    """Dropout on [B, T, D]; `variational`: one mask per sequence [B, 1, D], reused at every time step."""

    def __init__(self, p: float, variational: bool) -> None:
        super().__init__()
        self.p, self.variational = p, variational

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.variational:
            return nn.functional.dropout(x, self.p, training=True)
        keep = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1.0 - self.p)  # [B, 1, D]
        return x * keep / (1.0 - self.p)


class RNNModel(nn.Module):
    """input ids [B, T] -> hidden [B, T, output_size] and the recurrent state after each row's last token."""

    causal = True
    recurrent = True

    def __init__(self, config: RNNConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        E, H = config.embedding_dim, config.hidden_size
        self.tok_embeddings = nn.Embedding(config.vocab_size, E)
        cell = CELLS[config.cell]
        extra = {"nonlinearity": config.nonlinearity} if config.cell == "rnn" else {}
        self.layers = nn.ModuleList(
            cell(E if i == 0 else H, H, num_layers=1, batch_first=True, **extra) for i in range(config.num_layers)
        )
        self.out_proj = nn.Linear(H, E) if config.tie_embeddings and H != E else None
        variational = config.variational_dropout
        self.input_dropout = SequenceDropout(config.input_dropout, variational)
        self.hidden_dropout = SequenceDropout(config.hidden_dropout, variational)
        self.output_dropout = SequenceDropout(config.output_dropout, variational)

    def init_weights(self) -> None:
        """Embeddings U(-0.1, 0.1) (Zaremba et al. 2014; Merity et al. 2018); recurrent weights keep torch's
        U(-1/sqrt(H), 1/sqrt(H)); an LSTM's forget-gate bias starts at 1 (Jozefowicz et al. 2015), so that
        the cell remembers by default early in training."""
        nn.init.uniform_(self.tok_embeddings.weight, -0.1, 0.1)
        for layer in self.layers:
            layer.reset_parameters()
            if isinstance(layer, nn.LSTM):
                H = layer.hidden_size
                with torch.no_grad():
                    layer.bias_ih_l0[H : 2 * H].fill_(1.0)  # gate order i, f, g, o
                    layer.bias_hh_l0[H : 2 * H].zero_()
        if self.out_proj is not None:
            nn.init.uniform_(self.out_proj.weight, -0.1, 0.1)
            nn.init.zeros_(self.out_proj.bias)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, E]; in training, embedding_dropout zeroes whole words (the same word everywhere)."""
        weight = self.tok_embeddings.weight
        p = self.config.embedding_dropout
        if self.training and p > 0.0:
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1.0 - p)  # [V, 1]
            weight = weight * keep / (1.0 - p)
        return nn.functional.embedding(input_ids, weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        state: RecurrentState | None = None,
    ) -> tuple[torch.Tensor, RecurrentState]:
        """input_ids [B, T]; attention_mask [B, T] or [B, T_past + T] (its last T columns are used: 1 = token).

        Padding may be on either side: the real tokens of each row run through the layers packed
        (pack_padded_sequence), so padding costs nothing and the returned state is the one after each row's
        last real token. Outputs at padded positions are zeros.
        """
        T = input_ids.shape[1]
        mask = attention_mask[:, -T:] if attention_mask is not None else None
        if mask is not None and bool(mask.all()):
            mask = None
        lengths = shift = None
        if mask is not None:
            lengths, shift = _padding(mask)
            input_ids = _roll_rows(input_ids, shift)  # real tokens first in every row: right padding
        x = self.input_dropout(self.embed(input_ids))  # [B, T, E]
        new_state: RecurrentState = []
        with torch.autocast(x.device.type, enabled=False):
            # the recurrence runs in the weights' dtype: a bfloat16 cell state loses precision step after step
            x = x.to(self.tok_embeddings.weight.dtype)
            for i, layer in enumerate(self.layers):
                if i > 0:
                    x = self.hidden_dropout(x)
                weight_p = self.config.weight_dropout if self.training else 0.0
                x, layer_state = _run_layer(layer, x, state[i] if state is not None else None, lengths,
                                            weight_p)  # [B, T, H]
                new_state.append(layer_state)
        x = self.output_dropout(x)
        if self.out_proj is not None:
            x = self.out_proj(x)  # [B, T, E]
        if shift is not None:
            x = _roll_rows(x, -shift)  # back to the caller's padding side
        return x, new_state


def _padding(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths [B], shift [B]) of a mask whose real tokens form one block per row (right or left padding)."""
    mask = mask.bool()
    lengths = mask.sum(dim=1)  # [B]
    first = mask.int().argmax(dim=1)  # [B] first real position (0 for an all-padding row)
    positions = torch.arange(mask.shape[1], device=mask.device)
    block = (positions >= first[:, None]) & (positions < (first + lengths)[:, None])
    if not torch.equal(block, mask):
        raise ValueError("attention_mask: a recurrent model needs the real tokens of a row to be contiguous "
                         "(right or left padding)")
    return lengths, first


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row r rolled left by shift[r] along dim 1: x[r, (t + shift[r]) % T] (x [B, T] or [B, T, D])."""
    if not bool(shift.any()):
        return x
    T = x.shape[1]
    index = (torch.arange(T, device=x.device)[None, :] + shift[:, None]) % T  # [B, T]
    if x.dim() == 3:
        index = index[:, :, None].expand(-1, -1, x.shape[2])
    return x.gather(1, index)


def _run_layer(layer: nn.RNNBase, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None,
               lengths: torch.Tensor | None, weight_dropout: float = 0.0) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One recurrent layer over x [B, T, D_in] (right-padded to `lengths` when given) -> ([B, T, H], state).

    weight_dropout > 0: the layer runs with a dropped-out copy of W_hh (DropConnect); its own weight is kept.
    """
    hx = None
    if state is not None:
        hx = state if isinstance(layer, nn.LSTM) else state[0]
    inputs = x
    if lengths is not None:
        inputs = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
    if weight_dropout > 0.0:
        dropped = nn.functional.dropout(layer.weight_hh_l0, weight_dropout, training=True)  # [gates * H, H]
        out, h = torch.func.functional_call(layer, {"weight_hh_l0": dropped}, (inputs, hx))
    else:
        out, h = layer(inputs, hx)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out, (tuple(h) if isinstance(layer, nn.LSTM) else (h,))


# ------------------------------------------------------------------------------------------- state helpers


def detach_state(state: RecurrentState | None) -> RecurrentState | None:
    """The same state cut from the graph that made it (truncated back-propagation through time)."""
    if state is None:
        return None
    return [tuple(t.detach() for t in layer) for layer in state]


def state_batch_size(state: RecurrentState) -> int:
    return state[0][0].shape[1]


def state_to_tensors(state: RecurrentState | None) -> dict[str, torch.Tensor]:
    """A flat {"layer.i.j": tensor} form (for safetensors / checkpoints); {} for no state."""
    if state is None:
        return {}
    return {f"layer.{i}.{j}": t.detach().cpu().contiguous() for i, layer in enumerate(state) for j, t in enumerate(layer)}


def state_from_tensors(tensors: dict[str, torch.Tensor], device=None) -> RecurrentState | None:
    """Inverse of state_to_tensors."""
    if not tensors:
        return None
    layers: dict[int, dict[int, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        _, i, j = key.split(".")
        layers.setdefault(int(i), {})[int(j)] = tensor.to(device) if device is not None else tensor
    return [tuple(parts[j] for j in sorted(parts)) for _, parts in sorted(layers.items())]
