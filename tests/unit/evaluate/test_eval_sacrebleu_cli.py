"""Our corpus BLEU and chrF equal what sacreBLEU's own command prints for the same files.

The references are Multi30k's 1,014 German validation sentences; the hypotheses are the same sentences
damaged deterministically (words dropped, swapped and replaced, some lines left whole) so that the scores
sit mid-range, where a tokenisation or smoothing difference would show.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.evaluate.metrics import bleu, chrf, rouge

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
REFERENCES = DATA / "multi30k_en_de" / "val.de"
SACREBLEU = Path(sys.executable).parent / "sacrebleu"


def damaged(lines: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for line in lines:
        words = line.split()
        kind = rng.randrange(4)
        if kind == 1 and len(words) > 2:
            del words[rng.randrange(len(words))]
        elif kind == 2 and len(words) > 3:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        elif kind == 3:
            words[rng.randrange(len(words))] = "Hund"
        out.append(" ".join(words))
    return out


@pytest.mark.skipif(not SACREBLEU.exists(), reason="the sacrebleu command is not installed beside this Python")
def test_bleu_and_chrf_equal_the_sacrebleu_command(tmp_path):
    references = REFERENCES.read_text(encoding="utf-8").splitlines()
    hypotheses = damaged(references)
    (tmp_path / "hyp.de").write_text("\n".join(hypotheses) + "\n", encoding="utf-8")
    result = subprocess.run([str(SACREBLEU), str(REFERENCES), "-i", str(tmp_path / "hyp.de"), "-m", "bleu", "chrf",
                             "-w", "6"], capture_output=True, text=True, check=True)
    scores = {entry["name"]: entry["score"] for entry in json.loads(result.stdout)}
    assert 40 < scores["BLEU"] < 90 and 60 < scores["chrF2"] < 95
    assert bleu(hypotheses, references) == pytest.approx(scores["BLEU"], abs=1e-6)
    assert chrf(hypotheses, references) == pytest.approx(scores["chrF2"], abs=1e-6)


def test_rouge_on_a_worked_example():
    """ROUGE-1/2/L F-measures by hand (Lin 2004), on a pair with no stemming effects:
    reference "the cat sat on the mat" (6 tokens), prediction "the cat lay on the mat" (6 tokens).
    unigrams in common 5 -> F1 = 5/6; bigrams (5 each) in common: the-cat, on-the, the-mat = 3 -> 3/5;
    longest common subsequence: the cat on the mat = 5 -> 5/6."""
    scores = rouge(["the cat lay on the mat"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert scores["rougeL"] == pytest.approx(5 / 6)
