"""Model families (one file each), task heads, and the registry that builds them."""

from tunelab.models.base import Model, ModelConfig, ModelOutput
from tunelab.models.bert import BertConfig, BertModel
from tunelab.models.gpt2 import GPT2Config, GPT2Model
from tunelab.models.llama import LlamaConfig, LlamaModel
from tunelab.models.rnn import RNNConfig, RNNModel
from tunelab.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer
from tunelab.models.registry import FAMILIES, build_model, config_from_dict, make_head

__all__ = [
    "FAMILIES",
    "BertConfig",
    "BertModel",
    "GPT2Config",
    "GPT2Model",
    "LlamaConfig",
    "LlamaModel",
    "Model",
    "ModelConfig",
    "ModelOutput",
    "RNNConfig",
    "RNNModel",
    "Seq2SeqConfig",
    "Seq2SeqTransformer",
    "build_model",
    "config_from_dict",
    "make_head",
]
