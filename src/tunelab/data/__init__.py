"""Data: read files, validate them with errors that name file, line and field, encode them per task, batch.

    >>> examples, labels = load_classification("sst2/train.tsv", text_field="sentence")
    >>> dataset = encode_classification(examples, tokenizer, max_length=128)
    >>> sampler = LengthGroupedSampler(dataset.lengths, batch_size=32, seed=0)
    >>> loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=PadCollator(tokenizer.pad_token_id))

Modules: readers (formats, `Record`, `require`, splits), classification, tagging (CoNLL, BIO), qa (SQuAD,
windows, answer post-processing), chat (alpaca / sharegpt / messages, SFT labels), preference (hh-rlhf,
prompt / chosen / rejected, sharegpt and OpenAI preference pairs; KTO's labelled answers), text (causal LM,
packing), pretraining (BERT: sentences, NSP pairs, 80/10/10 masking), collate (padding), samplers
(length-grouped and random batches).
"""

from tunelab.data.chat import Conversation, assistant_spans, encode_chat, load_chat, validate_conversation
from tunelab.data.classification import (ClassificationExample, discover_labels, encode_classification,
                                         load_classification)
from tunelab.data.collate import PadCollator, pad_collate
from tunelab.data.encoded import IGNORE_INDEX, EncodedDataset
from tunelab.data.preference import (LabeledCompletion, PreferencePair, encode_labeled, encode_preferences,
                                     load_labeled, load_preferences)
from tunelab.data.pretraining import (MaskedLMCollator, MaskingSettings, PairSettings, encode_pretraining,
                                      load_documents, mask_tokens, split_sentences)
from tunelab.data.qa import (QAExample, encode_qa_eval, encode_qa_train, postprocess_qa, read_squad,
                             split_by_article)
from tunelab.data.readers import Record, optional, read_records, require, split_train_validation
from tunelab.data.samplers import LengthGroupedSampler, RandomBatchSampler
from tunelab.data.tagging import TaggingExample, align_predictions, encode_tagging, load_tagging, read_conll
from tunelab.data.text import encode_causal_lm, load_text, pack_documents

__all__ = [
    "IGNORE_INDEX", "ClassificationExample", "Conversation", "EncodedDataset", "LabeledCompletion", "LengthGroupedSampler",
    "PreferencePair", "encode_labeled", "encode_preferences", "load_labeled", "load_preferences",
    "MaskedLMCollator", "MaskingSettings", "PadCollator", "PairSettings", "QAExample", "RandomBatchSampler", "Record", "TaggingExample", "align_predictions",
    "assistant_spans", "discover_labels", "encode_causal_lm", "encode_chat", "encode_classification",
    "encode_pretraining", "encode_qa_eval", "encode_qa_train", "encode_tagging", "load_chat",
    "load_classification", "load_documents", "load_tagging", "load_text", "mask_tokens", "optional", "pack_documents", "pad_collate", "postprocess_qa", "read_conll", "read_records",
    "read_squad", "require", "split_by_article", "split_sentences", "split_train_validation", "validate_conversation",
]
