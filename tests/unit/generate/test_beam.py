"""Beam search: beam 1 is greedy (encoder-decoder and decoder-only), batching changes nothing, and GNMT's
length penalty orders hypotheses as the formula says on a hand-made distribution."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.generate.beam import BeamSettings, beam_search, length_penalty, search
from tunelab.models.registry import build_model
from tunelab.models.seq2seq import Seq2SeqConfig

EOS = 2


def seq2seq_model(seed: int = 0):
    torch.manual_seed(seed)
    config = Seq2SeqConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                           dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=EOS, max_position_embeddings=64)
    model = build_model(config, ["lm"]).eval()
    with torch.no_grad():  # larger weights than the init, so that the distributions are far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return model


def sources(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@torch.no_grad()
def naive_greedy(model, source: list[int], max_new: int, eos: int) -> list[int]:
    """Greedy decoding written plainly: the whole model on the whole prefix at every step, no cache."""
    src = torch.tensor([source])
    out = [model.config.start_token_id]
    for _ in range(max_new):
        logits = model(src, decoder_input_ids=torch.tensor([out])).logits["lm"][0, -1]
        token = int(logits.argmax())
        if token == eos:
            break
        out.append(token)
    return out[1:]


def test_beam_one_is_greedy_for_an_encoder_decoder():
    model = seq2seq_model()
    inputs = sources(6, 1)
    # a random model rarely ends with its EOS: take as EOS a token its greedy outputs do produce
    produced = [t for s in inputs for t in naive_greedy(model, s, 12, eos=-1)[2:]]
    eos = max(set(produced), key=produced.count)
    best = beam_search(model, inputs, BeamSettings(beam_size=1, max_new_tokens=12, length_penalty=0.6),
                       eos_token_ids={eos})
    for source, hypothesis in zip(inputs, best):
        assert hypothesis.token_ids == naive_greedy(model, source, 12, eos)
    assert any(h.finished for h in best) and any(len(h.token_ids) >= 2 for h in best)


def test_beam_one_is_greedy_for_a_decoder(make_hf_model):
    from tunelab.checkpoint.hf import read_hf_model
    from tunelab.generate.decode import GenerationSettings, decode_tokens

    for case in ("llama-gqa", "gpt2-lm"):
        _, path = make_hf_model(case)
        model = read_hf_model(path)
        prompts = [[5, 9, 13, 7], [11, 3], [4, 4, 8, 20, 31, 6]]  # different lengths: left padding
        eos = {17}  # a token these random models produce now and then, so that some rows end early
        rows = [[] for _ in prompts]
        for step in decode_tokens(model, prompts, GenerationSettings(max_new_tokens=10), eos):
            for row, token in enumerate(step):
                if token is not None and (not rows[row] or rows[row][-1] not in eos):
                    rows[row].append(token)
        greedy = [r[:-1] if r and r[-1] in eos else r for r in rows]
        best = beam_search(model, prompts, BeamSettings(beam_size=1, max_new_tokens=10), eos_token_ids=eos)
        assert [h.token_ids for h in best] == greedy, case


def test_a_batch_decodes_as_each_input_alone():
    model = seq2seq_model(3)
    inputs = sources(5, 2)
    settings = BeamSettings(beam_size=3, max_new_tokens=10, length_penalty=1.0)
    together = beam_search(model, inputs, settings)
    for source, hypothesis in zip(inputs, together):
        alone = beam_search(model, [source], settings)[0]
        assert alone.token_ids == hypothesis.token_ids
        assert alone.score == pytest.approx(hypothesis.score, abs=1e-5)


def test_wider_beams_find_hypotheses_at_least_as_likely_as_greedy_on_average():
    model = seq2seq_model(4)
    inputs = sources(8, 5)
    greedy = beam_search(model, inputs, BeamSettings(beam_size=1, max_new_tokens=10, length_penalty=0.0))
    wide = beam_search(model, inputs, BeamSettings(beam_size=5, max_new_tokens=10, length_penalty=0.0))
    assert sum(h.log_prob for h in wide) > sum(h.log_prob for h in greedy)


def test_gnmt_length_penalty_values():
    assert length_penalty(1, 0.6) == 1.0
    assert length_penalty(7, 0.6) == pytest.approx((12 / 6) ** 0.6)
    assert length_penalty(30, 0.0) == 1.0


class TableStepper:
    """A hand-made next-token distribution over {0: 'a', 1: 'b', 2: EOS}, as a function of the prefix:

        []      -> EOS 0.5, a 0.5            short: EOS                 log P = log 0.5            = -0.693
        [a]     -> b 0.8, EOS 0.1, a 0.1     long:  a b EOS             log P = log(.5 * .8 * .8)  = -1.139
        [a, b]  -> EOS 0.8, a 0.1, b 0.1
    """

    TABLE = {(): [0.5, 0.0, 0.5], (0,): [0.1, 0.8, 0.1], (0, 1): [0.1, 0.1, 0.8]}

    def __init__(self, beams: int) -> None:
        self.device = torch.device("cpu")
        self.prefixes: list[tuple[int, ...]] = [()] * beams

    def logits(self) -> torch.Tensor:
        rows = [self.TABLE.get(p, [1 / 3] * 3) for p in self.prefixes]
        return torch.tensor(rows).clamp(min=1e-9).log()

    def advance(self, order: torch.Tensor, tokens: torch.Tensor) -> None:
        self.prefixes = [self.prefixes[i] + (t,) for i, t in zip(order.tolist(), tokens.tolist())]


@pytest.mark.parametrize("alpha, expected", [(0.0, []), (0.6, []), (2.0, [0, 1])])
def test_length_penalty_decides_between_a_short_and_a_long_hypothesis(alpha, expected):
    # short: -0.693 / lp(1) = -0.693 always; long: -1.139 / ((5 + 3) / 6)^alpha, better only when alpha > 1.73
    best = search(TableStepper(2), B=1, K=2, max_steps=5, alpha=alpha, stop={EOS})[0]
    assert best.token_ids == expected
    log_p = math.log(0.5) if not expected else math.log(0.5 * 0.8 * 0.8)
    assert best.log_prob == pytest.approx(log_p, abs=1e-6)
    assert best.score == pytest.approx(log_p / length_penalty(len(expected) + 1, alpha), abs=1e-6)


def test_out_of_steps_the_live_beams_count():
    best = search(TableStepper(1), B=1, K=1, max_steps=2, alpha=0.0, stop={EOS})[0]
    assert best.token_ids == [0, 1] and not best.finished  # a (0.5), b (0.8); EOS would have been the third


def test_settings_are_checked():
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        BeamSettings(beam_size=0)
    with pytest.raises(ValueError, match="length_penalty must be >= 0"):
        BeamSettings(length_penalty=-1)
