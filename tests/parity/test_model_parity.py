"""Our models read from Hugging Face directories give the reference implementation's outputs.

Each case builds a tiny random transformers model (weights from N(0, 0.3), so logits are O(1)), saves it
with save_pretrained, reads it with read_hf_model and compares every head's output in fp32 on a padded
batch (no padding, right padding, left padding): max |ours - theirs| <= 1e-5 over the real (non-padding)
positions.
"""

from __future__ import annotations

import pytest
import torch

from tunelab.checkpoint.hf import read_hf_model

TOL = 1e-5

ENCODERS = [
    "bert-base", "bert-mlm", "bert-pretraining", "bert-cls", "bert-tagger", "bert-qa",
    "roberta-mlm", "roberta-cls", "distilbert-mlm", "distilbert-cls",
]
DECODERS = [
    "gpt2-lm", "gpt2-cls", "llama-gqa", "llama-tied", "llama-bias", "llama-rope-linear", "llama-rope-llama3",
    "qwen2", "mistral-window", "llama-cls",
]
TOKEN_LEVEL = {"hidden", "lm", "mlm", "tagger", "qa"}  # compared per real token; the rest per sequence

PARAMS = (
    [pytest.param(case, "none", id=f"{case}-nopad") for case in ENCODERS + DECODERS]
    + [pytest.param(case, "right", id=f"{case}-right") for case in ENCODERS + DECODERS]
    + [pytest.param(case, "left", id=f"{case}-left") for case in ENCODERS + DECODERS]
)


def reference_outputs(hf_model, out) -> dict[str, torch.Tensor]:
    """A transformers output object under our head names."""
    name = type(hf_model).__name__
    if name.endswith("PreTraining"):
        return {"mlm": out.prediction_logits, "nsp": out.seq_relationship_logits}
    if name.endswith("MaskedLM"):
        return {"mlm": out.logits}
    if name.endswith("SequenceClassification"):
        return {"classifier": out.logits}
    if name.endswith("TokenClassification"):
        return {"tagger": out.logits}
    if name.endswith("QuestionAnswering"):
        return {"qa": torch.stack([out.start_logits, out.end_logits], dim=-1)}
    if name.endswith(("CausalLM", "LMHeadModel")):
        return {"lm": out.logits}
    return {"hidden": out.last_hidden_state, "pooled": out.pooler_output}


def make_batch(tiny, case: str, padding: str):
    """input_ids, attention_mask, extra kwargs (token types, positions) for both models."""
    lengths = {"none": [tiny.SEQ] * 3, "right": [tiny.SEQ, 7, 3], "left": [tiny.SEQ, 8, 2]}[padding]
    side = "left" if padding == "left" else "right"
    ids, mask = tiny.padded_batch(lengths, tiny.SEQ, side=side, pad=tiny.pad_id(case), seed=1)
    kwargs = {}
    if case.startswith("bert"):
        # segment A then segment B, as in a sentence pair
        kwargs["token_type_ids"] = (torch.arange(tiny.SEQ) >= 5).long().expand_as(ids) * mask
    if padding == "left" and case in DECODERS:
        # decoders: real tokens count from 0 whatever the padding (what generate does); encoders compute
        # their own (RoBERTa counts from pad_token_id + 1 over the real tokens, BERT from the first column)
        kwargs["position_ids"] = tiny.left_padded_positions(mask)
    return ids, mask, kwargs


def compare(tiny, case, ours, theirs: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, float]:
    diffs = {}
    for head, expected in theirs.items():
        actual = {"hidden": ours.hidden, "pooled": ours.pooled}.get(head)
        if actual is None:
            actual = ours.logits[head]
        where = mask if head in TOKEN_LEVEL else None
        diffs[head] = tiny.record(f"parity {case}", tiny.max_diff(actual, expected, where))
    return diffs


@pytest.mark.parametrize("case,padding", PARAMS)
def test_outputs_match_transformers(tiny, make_hf_model, case, padding):
    hf_model, path = make_hf_model(case)
    model = read_hf_model(path)
    assert not model.training
    ids, mask, kwargs = make_batch(tiny, case, padding)
    hf_mask = None if padding == "none" else mask
    with torch.no_grad():
        theirs = reference_outputs(hf_model, hf_model(input_ids=ids, attention_mask=hf_mask, **kwargs))
        ours = model(ids, hf_mask, **kwargs)
    assert set(ours.logits) == set(theirs) - {"hidden", "pooled"}
    diffs = compare(tiny, case, ours, theirs, mask)
    assert all(d <= TOL for d in diffs.values()), diffs
    # the outputs are O(1), so a tolerance of 1e-5 is a real test
    assert max(float(t.abs().max()) for t in theirs.values()) > 0.5


def test_bert_hidden_states_and_pooler(tiny, make_hf_model):
    """BertModel: last_hidden_state on real tokens and pooler_output, with right padding and segments."""
    hf_model, path = make_hf_model("bert-base", seed=3)
    model = read_hf_model(path)
    ids, mask, kwargs = make_batch(tiny, "bert-base", "right")
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, attention_mask=mask, **kwargs)
        ours = model(ids, mask, **kwargs)
    assert ours.logits == {}
    assert ours.hidden.shape == theirs.last_hidden_state.shape == (3, tiny.SEQ, 32)
    assert tiny.record("parity bert hidden", tiny.max_diff(ours.hidden, theirs.last_hidden_state, mask)) <= TOL
    assert tiny.record("parity bert pooled", tiny.max_diff(ours.pooled, theirs.pooler_output)) <= TOL


def test_padding_does_not_change_real_positions(tiny, make_hf_model):
    """A right-padded row gives the same outputs on its real tokens as the row alone (our model only)."""
    _, path = make_hf_model("llama-gqa")
    model = read_hf_model(path)
    ids, mask = tiny.padded_batch([tiny.SEQ, 5], tiny.SEQ, side="right", pad=tiny.PAD, seed=2)
    with torch.no_grad():
        batched = model(ids, mask).logits["lm"][1, :5]
        alone = model(ids[1:, :5]).logits["lm"][0]
    assert tiny.max_diff(batched, alone) <= TOL


@pytest.mark.parametrize("case,option,plain", [
    ("mistral-window", "sliding_window", None),
    ("llama-rope-linear", "rope_scaling", None),
    ("llama-rope-llama3", "rope_scaling", None),
])
def test_variant_options_change_the_output(tiny, make_hf_model, case, option, plain):
    """The variant cases above are not vacuous: without the option the model's logits differ."""
    _, path = make_hf_model(case)
    _, plain_path = make_hf_model(case, **{option: plain})
    ids = tiny.random_ids(1, tiny.SEQ)
    with torch.no_grad():
        with_option = read_hf_model(path)(ids).logits["lm"]
        without = read_hf_model(plain_path)(ids).logits["lm"]
    assert tiny.max_diff(with_option, without) > 1e-2
