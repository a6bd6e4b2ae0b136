"""Critique and refinement (tunelab.feedback.build, kind refine) with a tiny random chat model: refinements are
stored as corrections with metadata naming the model, wait in the review queue, and become chat rows."""

from __future__ import annotations

from pathlib import Path

import pytest

import tunelab
from tunelab.errors import FeedbackError
from tunelab.feedback import FeedbackRecord, FeedbackStore, RefineSettings, build_training_data
from tunelab.feedback.build import REFINE_PROMPT, clean_refinement, refine_prompt
from tunelab.feedback.review import review

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"


@pytest.fixture
def store(tmp_path):
    with FeedbackStore(tmp_path / "fb.db") as opened:
        opened.add_many([
            FeedbackRecord(input="What is 17 + 25?", output="32", model="m", source="person", verdict="bad",
                           critique="The sum is wrong.", reference="42"),                    # 1 refined
            FeedbackRecord(input=[{"role": "user", "content": "Translate 'good morning' into French."}],
                           output="Je m'aime", model="m", source="gold", verdict="bad",
                           critique="That is not a greeting."),                              # 2 refined
            FeedbackRecord(input="Name a planet.", output="Pluto", model="m", source="person", verdict="bad",
                           critique="Not a planet any more.", correction="Mars"),             # 3 has a correction
            FeedbackRecord(input="Say hi.", output="Hi!", model="m", source="person", verdict="good"),  # 4 good
            FeedbackRecord(input="Count to three.", output="1 2", model="m", source="rule", verdict="bad"),  # 5
        ])
        yield opened


def quiet_settings(**kw) -> RefineSettings:
    return RefineSettings(**{"max_new_tokens": 6, "batch_size": 2, "keep_truncated": True, "show_progress": False,
                             **kw})


def test_refine_stores_refinements_and_builds_chat_rows(store, chat_llama):
    model, tokenizer = tunelab.load(chat_llama)
    result = build_training_data(store, "refine", refine=quiet_settings(model="tiny-refiner"),
                                 refiner=(model.eval(), tokenizer), log=lambda line: None)
    refined = [store.get(1), store.get(2)]
    for record in refined:
        assert record.correction and record.correction == clean_refinement(record.correction)
        info = record.metadata["refinement"]
        assert info["model"] == "tiny-refiner" and info["reviewed"] is False
        assert info["critique"] == record.critique and info["created_at"] == record.updated_at
    assert store.get(3).correction == "Mars" and "refinement" not in store.get(3).metadata  # a person's stays
    assert result.report.refined == 2
    assert result.rows == [
        {"messages": [{"role": "user", "content": "What is 17 + 25?"},
                      {"role": "assistant", "content": refined[0].correction}]},
        {"messages": [{"role": "user", "content": "Translate 'good morning' into French."},
                      {"role": "assistant", "content": refined[1].correction}]},
        {"messages": [{"role": "user", "content": "Name a planet."}, {"role": "assistant", "content": "Mars"}]},
    ]
    assert result.report.skipped["bad, no correction"] == 1  # record 5 has no critique to refine from
    assert "refined 2 bad records from their critiques, stored as corrections; 0 refinements dropped" in \
        result.report.lines()[1]
    # the refinements wait for a person in `tunelab feedback review`; record 1 was judged by a person already
    assert 1 in [r.id for r in store.query(needs_review=True)]
    # a second build refines nothing again: the records have corrections now
    again = build_training_data(store, "refine", refine=quiet_settings(model="tiny-refiner"),
                                refiner=(model, tokenizer), log=lambda line: None)
    assert again.report.refined == 0 and again.rows == result.rows


def test_refine_by_model_source_with_a_verifier_and_without_truncated_ones(store, chat_llama, tmp_path):
    check = tmp_path / "checks.py"
    check.write_text("def has_reference(output, example):\n"
                     "    return 'reference' in example and example['answer'] == '42'\n")
    settings = quiet_settings(model=str(chat_llama), verifier=f"{check}:has_reference")
    result = build_training_data(store, "refine", refine=settings, log=lambda line: None)
    assert result.report.refined == 1 and result.report.refine_dropped == {"failed the verifier": 1}
    assert store.get(1).metadata["refinement"]["verifier"] == f"{check}:has_reference"
    assert store.get(2).correction is None
    # six tokens are not enough for a whole answer: a refinement cut off there is dropped by default
    dropped = build_training_data(store, "refine", refine=quiet_settings(model=str(chat_llama),
                                                                        keep_truncated=False),
                                  log=lambda line: None)
    assert dropped.report.refined == 0 and dropped.report.refine_dropped == {"cut off at 6 tokens": 1}
    assert store.get(2).correction is None


def test_review_shows_a_refinement_and_a_verdict_marks_it_reviewed(store, chat_llama):
    model, tokenizer = tunelab.load(chat_llama)
    build_training_data(store, "refine", refine=quiet_settings(model="tiny-refiner"), refiner=(model, tokenizer),
                        log=lambda line: None)
    shown = []
    answers = iter(["r"])
    summary, waiting = review(store, lambda prompt: next(answers, None), shown.append, limit=1)
    assert waiting == 3  # 1 (a person's verdict, refined), 2 (refined; a gold verdict), 5 (a rule's verdict)
    text = "".join(shown)
    assert "correction (refined by tiny-refiner, not reviewed yet; e replaces it):" in text
    record = store.get(1)
    assert record.metadata["refinement"]["reviewed"] is True and record.correction == store.get(1).correction
    assert 1 not in [r.id for r in store.query(needs_review=True)]


def test_prompt_template():
    record = FeedbackRecord(input=[{"role": "user", "content": "2 + 2?"}], output="5", model="m", source="rule",
                            verdict="bad", critique="Off by one.", reference=["4"])
    text = refine_prompt(REFINE_PROMPT, record)
    assert "Request:\n2 + 2?\n\nAnswer:\n5\n\nFeedback:\nOff by one.\n\n" in text
    custom = "Q: {input} | A: {output} | {critique} | gold {reference} | {keep: this} {}"
    assert refine_prompt(custom, record) == 'Q: 2 + 2? | A: 5 | Off by one. | gold ["4"] | {keep: this} {}'
    with pytest.raises(FeedbackError, match=r"unknown placeholder \{critque\}; did you mean \{critique\}\?"):
        RefineSettings(prompt="{output} {critque}")
    with pytest.raises(FeedbackError, match=r"refine prompt: it needs \{critique\}"):
        RefineSettings(prompt="Improve: {output}")
    assert clean_refinement("  Improved answer: 42\n") == "42"
    assert clean_refinement("**Answer:** Paris") == "Paris"


def test_a_refiner_without_a_chat_template_is_an_error(store, tmp_path):
    from tunelab.tokenizer import Tokenizer

    import transformers as tf
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=2, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "m")
    Tokenizer(backend, special_tokens={"unk_token": "<unk>"}).save(tmp_path / "m")
    with pytest.raises(FeedbackError, match="refine: .* has no chat template; refinements need a chat model"):
        build_training_data(store, "refine", refine=quiet_settings(model=str(tmp_path / "m")), log=lambda line: None)
