import pytest
import torch

from tunelab.generate.decode import GenerationSettings
from tunelab.generate.sampling import next_tokens
from tunelab.generate.stopping import StopStringFilter


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 2.9, 0.0]])
    assert next_tokens(logits).tolist() == [1, 0]


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(next_tokens(logits, temperature=1.5, top_k=1, generator=g), logits.argmax(-1))


def test_top_p_keeps_the_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps tokens 0 and 1 only
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(next_tokens(logits, temperature=1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(20000, 3)
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(next_tokens(logits, temperature=1.0, generator=g), minlength=3).float() / 20000
    assert torch.allclose(counts, probs, atol=0.02)


def test_seeded_sampling_repeats():
    logits = torch.randn(3, 100)
    a = next_tokens(logits, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = next_tokens(logits, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs", [{"max_new_tokens": -1}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}]
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        GenerationSettings(**kwargs)


def test_stop_string_split_across_pieces_is_never_shown():
    f = StopStringFilter(["</end>"])
    shown = "".join(f.feed(p) for p in ["Hello wor", "ld </", "en", "d> more"])
    assert shown == "Hello world "
    assert f.stopped
    assert f.flush() == ""


def test_text_that_only_looks_like_a_stop_string_is_released():
    f = StopStringFilter(["STOP"])
    out = [f.feed("abc ST"), f.feed("ART now")]
    assert out[0] == "abc " and out[1] == "START now"
    assert not f.stopped


def test_earliest_of_several_stop_strings_wins():
    f = StopStringFilter(["\n\n", "User:"])
    assert f.feed("answer User: hi\n\nmore") == "answer "
