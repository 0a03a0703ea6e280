"""The teacher-output cache: same losses as the live teacher, reuse, invalidation, stored layers, lookup."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import layergeo.cache as cache_module
import layergeo.distil as train_module
from layergeo.families import get_family
from layergeo.teacher import encode_splits, fine_tune_teacher
from layergeo import data
from layergeo.cache import TeacherCache
from layergeo.cli import main
from layergeo.config import load_config
from layergeo.errors import LayergeoError
from layergeo.models import build_student, load_checkpoint
from layergeo.runs import RunDir, read_jsonl
from layergeo.strategies import forward_targets

ENCODER = get_family("encoder")

SMALL = ["data.max_train=64"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "teacher"
    fine_tune_teacher(load_config(preset="tiny", overrides=SMALL), out)
    return out


def _config(teacher_dir: Path, *overrides: str):
    return load_config(preset="tiny", overrides=[*SMALL, f"teacher.dir={teacher_dir}", *overrides])


def _setup(teacher_dir: Path, *overrides: str):
    """What distil_student has before training: config, mapper, teacher (eval), tokenizer, train split, student."""
    config = _config(teacher_dir, *overrides)
    mapper, _ = train_module.validate_student_config(config, teacher_dir)
    task = ENCODER.load_task(config)
    teacher, tokenizer = load_checkpoint(RunDir(teacher_dir).checkpoint("best"))
    teacher.eval()
    encoded = encode_splits(config, ENCODER, task, tokenizer, None)["train"]
    torch.manual_seed(0)
    student = build_student(teacher, config.student, mapper.student_states(), forward_targets(4, config.student.layers))
    student.eval()  # no dropout: both paths see the same student function
    return config, mapper, teacher, tokenizer, task, encoded, student


def _open(teacher_dir: Path, teacher, tokenizer, encoded, root: Path, layers, **kw) -> TeacherCache:
    args = {"checkpoint": RunDir(teacher_dir).checkpoint("best"), "task": "rotten_tomatoes", "split": "train",
            "max_length": 32, "layers": layers, "dtype": "float32", "root": root, **kw}
    return TeacherCache.open_or_build(teacher, tokenizer, encoded, **args)


def _batches(encoded, tokenizer, n=3, batch_size=16):
    loader = data.make_loader(encoded, tokenizer, batch_size, shuffle=True, seed=7)
    return [b for _, b in zip(range(n), loader)]


# ---- (a), (b): the losses


@pytest.mark.parametrize("strategy", ["forward", "rail"])
@pytest.mark.parametrize("dtype, rel", [("float32", 1e-5), ("float16", 1e-2)])
def test_step_losses_from_the_cache_equal_the_live_teacher(teacher_dir, tmp_path, strategy, dtype, rel):
    """float32: the live losses up to rounding (1e-5 relative; on CPU they come out bit-identical).
    float16 rounds every stored state to 11 significant bits (2^-11 ~ 5e-4 relative per value); in the MSE
    these errors mostly average out (~1e-4 relative here), so 1e-2 is a safe bound for the rounding.
    Logits are float32 under both dtypes, so CE and KL stay as exact as with float32."""
    config, mapper, teacher, tokenizer, _, encoded, student = _setup(
        teacher_dir, f"matching.strategy={strategy}", "matching.rail_every_steps=1")
    cache = _open(teacher_dir, teacher, tokenizer, encoded, tmp_path, mapper.teacher_states()["encoder"], dtype=dtype)
    live = train_module.distillation_losses(student, teacher, mapper, config)
    cached = train_module.distillation_losses(student, teacher, mapper, config, cache=cache)
    with torch.no_grad():
        for step, batch in enumerate(_batches(encoded, tokenizer)):
            a, b = live(batch, 0, step), cached(batch, 0, step)
            assert set(a) == set(b) == {"loss", "ce", "kl", "hidden"}
            assert a["hidden"] > 0 and a["kl"] > 0
            assert float(b["ce"]) == float(a["ce"])
            assert float(b["kl"]) == pytest.approx(float(a["kl"]), rel=1e-5, abs=1e-9)
            for term in ("hidden", "loss"):
                assert float(b[term]) == pytest.approx(float(a[term]), rel=rel), term


def _train(out: Path, teacher: Path, *overrides: str) -> list[dict]:
    args = ["train", "--preset", "tiny", "--out", str(out), "--set", f"teacher.dir={teacher}"]
    for item in (*SMALL, "train.batch_size=16", "train.log_every=1", "matching.rail_every_steps=1", *overrides):
        args += ["--set", item]
    assert main(args) == 0
    return read_jsonl(out / "metrics.jsonl")


def _assert_same_run(cached: list[dict], live: list[dict]) -> None:
    assert [sorted(r) for r in cached] == [sorted(r) for r in live]
    for c, l in zip(cached, live):
        for key, value in l.items():
            if isinstance(value, float):
                assert c[key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
            else:
                assert c[key] == value, key


def test_whole_runs_with_the_cache_match_live_runs_and_share_it(teacher_dir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)  # a fresh cache folder for this test
    cache_on = ("train.teacher_cache=true", "train.cache_dtype=float32")
    before = cache_module.build_count

    live = _train(tmp_path / "live", teacher)
    assert json.loads((tmp_path / "live" / "results.json").read_text())["teacher_cache"] == {"used": False}
    assert not (teacher / "cache").exists()

    cached = _train(tmp_path / "cached", teacher, *cache_on)
    _assert_same_run(cached, live)
    results = json.loads((tmp_path / "cached" / "results.json").read_text())
    env = json.loads((tmp_path / "cached" / "env.json").read_text())
    info = results["teacher_cache"]
    assert info["used"] and info["built"] and info["layers"] == [0, 2, 4] and env["teacher_cache"] == info
    folder = teacher / "cache" / info["key"]
    assert Path(info["path"]).resolve() == folder.resolve() and cache_module.build_count == before + 1
    state0 = (folder / "state_0.npy").stat()

    # rail needs every state: the teacher runs once more and only the missing files are added
    rail_live = _train(tmp_path / "rail-live", teacher, "matching.strategy=rail")
    rail = _train(tmp_path / "rail", teacher, "matching.strategy=rail", *cache_on)
    _assert_same_run(rail, rail_live)
    info = json.loads((tmp_path / "rail" / "results.json").read_text())["teacher_cache"]
    assert info["built"] and info["layers"] == [0, 1, 2, 3, 4] and Path(info["path"]).resolve() == folder.resolve()
    assert (folder / "state_0.npy").stat().st_ino == state0.st_ino
    assert json.loads((folder / "meta.json").read_text())["layers"] == [0, 1, 2, 3, 4]
    assert cache_module.build_count == before + 2

    # a further run of the sweep reuses it as it is
    meta = (folder / "meta.json").stat().st_mtime_ns
    again = _train(tmp_path / "again", teacher, *cache_on)
    assert again == cached
    assert not json.loads((tmp_path / "again" / "results.json").read_text())["teacher_cache"]["built"]
    assert cache_module.build_count == before + 2 and (folder / "meta.json").stat().st_mtime_ns == meta
    assert [p.name for p in (teacher / "cache").iterdir() if p.is_dir()] == [info["key"]]


# ---- (c): reuse and invalidation


def test_reused_and_invalidated_by_every_ingredient(teacher_dir, tmp_path):
    config, mapper, teacher, tokenizer, task, encoded, _ = _setup(teacher_dir)
    layers = mapper.teacher_states()["encoder"]
    start = cache_module.build_count
    first = _open(teacher_dir, teacher, tokenizer, encoded, tmp_path, layers)
    assert first.built and cache_module.build_count == start + 1
    mtime = (first.path / "meta.json").stat().st_mtime_ns
    second = _open(teacher_dir, teacher, tokenizer, encoded, tmp_path, layers)
    assert not second.built and second.key == first.key and cache_module.build_count == start + 1
    assert (first.path / "meta.json").stat().st_mtime_ns == mtime
    assert not _open(teacher_dir, teacher, tokenizer, encoded, tmp_path, [0]).built  # a subset is stored

    keys = {first.key}

    def new_key(cache: TeacherCache) -> None:
        assert cache.built and cache.key not in keys
        keys.add(cache.key)

    new_key(_open(teacher_dir, teacher, tokenizer, encoded, tmp_path, layers, max_length=16))
    new_key(_open(teacher_dir, teacher, tokenizer, encoded, tmp_path, layers, task="bbc_news"))
    new_key(_open(teacher_dir, teacher, tokenizer, encoded, tmp_path, layers, split="dev"))
    new_key(_open(teacher_dir, teacher, tokenizer, encoded, tmp_path, layers, dtype="float16"))
    fewer = data.EncodedSplit({k: v[:-1] for k, v in encoded.features.items()}, encoded.labels[:-1])
    new_key(_open(teacher_dir, teacher, tokenizer, fewer, tmp_path, layers))
    edited = data.EncodedSplit({k: [list(r) for r in v] for k, v in encoded.features.items()}, encoded.labels)
    edited.features["input_ids"][3][1] += 1
    new_key(_open(teacher_dir, teacher, tokenizer, edited, tmp_path, layers))
    reseeded = encode_splits(_config(teacher_dir, "seed=1"), ENCODER, ENCODER.load_task(_config(teacher_dir, "seed=1")),
                             tokenizer, None)["train"]  # max_train samples by seed: other examples
    new_key(_open(teacher_dir, teacher, tokenizer, reseeded, tmp_path, layers))

    other = tmp_path / "other-teacher"
    with torch.no_grad():
        teacher.classifier.bias.add_(1.0)
    teacher.save_pretrained(other)
    changed = _open(teacher_dir, teacher, tokenizer, encoded, tmp_path, layers, checkpoint=other)
    new_key(changed)
    assert not np.allclose(changed.logits, first.logits)
    assert cache_module.build_count == start + 1 + 8


def test_a_damaged_or_foreign_cache_is_rebuilt(teacher_dir, tmp_path):
    _, _, teacher, tokenizer, _, encoded, _ = _setup(teacher_dir)
    reference = _open(teacher_dir, teacher, tokenizer, encoded, tmp_path / "reference", [0, 2])
    path = _open(teacher_dir, teacher, tokenizer, encoded, tmp_path / "root", [0, 2]).path
    (path / "state_2.npy").write_bytes(b"garbage")
    repaired = _open(teacher_dir, teacher, tokenizer, encoded, tmp_path / "root", [0, 2])
    assert repaired.built and repaired.layers == [0, 2]
    assert np.array_equal(repaired.states[2], reference.states[2]) and np.array_equal(repaired.logits, reference.logits)
    meta = json.loads((path / "meta.json").read_text())
    meta["ingredients"]["max_length"] = 99  # a folder whose meta does not match its key
    (path / "meta.json").write_text(json.dumps(meta))
    rebuilt = _open(teacher_dir, teacher, tokenizer, encoded, tmp_path / "root", [0])
    assert rebuilt.built and rebuilt.layers == [0] and rebuilt.path == path


# ---- (d): which states are stored


@pytest.mark.parametrize("strategy, stored", [("forward", [0, 2, 4]), ("reverse", [0, 2, 4]), ("all_to_one", [2]),
                                              ("rail", [0, 1, 2, 3, 4]), ("none", [])])
def test_only_the_states_a_strategy_can_match_are_stored(teacher_dir, tmp_path, strategy, stored):
    teacher_copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher_copy)
    config, mapper, teacher, tokenizer, _, encoded, _ = _setup(teacher_copy, f"matching.strategy={strategy}",
                                                              "train.teacher_cache=true")
    cache = train_module.open_teacher_cache(config, teacher_copy, teacher, tokenizer, "rotten_tomatoes", encoded, mapper)
    assert cache.layers == stored and cache.dtype == "float16"
    files = sorted(p.name for p in cache.path.iterdir())
    assert files == sorted(["meta.json", "logits.npy", "offsets.npy", *(f"state_{t}.npy" for t in stored)])
    assert cache.path.parent == teacher_copy / "cache"
    n_tokens = sum(len(r) for r in encoded.features["input_ids"])
    assert cache.n_tokens == n_tokens and cache.logits.shape == (64, 2)
    assert all(cache.states[t].shape == (n_tokens, 64) and cache.states[t].dtype == np.float16 for t in stored)
    expected = 64 * 2 * 4 + 65 * 8 + len(stored) * n_tokens * 64 * 2  # float32 logits, int64 offsets, float16 states
    assert expected < cache.disk_bytes() < expected + 8192


def test_no_cache_when_off_or_when_the_loss_ignores_the_teacher(teacher_dir, tmp_path):
    for overrides in ([], ["train.teacher_cache=true", "loss.alpha_kl=0", "matching.strategy=none"]):
        config, mapper, teacher, tokenizer, _, encoded, _ = _setup(teacher_dir, *overrides)
        assert train_module.open_teacher_cache(config, tmp_path, teacher, tokenizer, "rt", encoded, mapper) is None
    assert not (tmp_path / "cache").exists()


# ---- (e): lookup


def test_lookup_scatters_the_teacher_states_into_the_padded_batch(teacher_dir, tmp_path):
    _, _, teacher, tokenizer, _, encoded, _ = _setup(teacher_dir)
    cache = _open(teacher_dir, teacher, tokenizer, encoded, tmp_path, [0, 1, 2, 3, 4])
    for batch in _batches(encoded, tokenizer, n=2, batch_size=24):
        mask = batch["attention_mask"]
        assert (mask == 0).any() and bool((mask[:, :-1] >= mask[:, 1:]).all())  # right-padded, with padding
        with torch.no_grad():
            live = teacher(**ENCODER.inputs(batch), output_hidden_states=True)
        logits, states = cache.lookup(batch["index"], mask)
        assert logits.dtype == torch.float32 and logits.shape == (24, 2)
        torch.testing.assert_close(logits, live.logits, rtol=1e-5, atol=1e-6)
        assert sorted(states) == [0, 1, 2, 3, 4]
        keep = mask.bool()
        for t, state in states.items():
            assert state.dtype == torch.float32 and state.shape == live.hidden_states[t].shape
            assert torch.count_nonzero(state[~keep]) == 0
            torch.testing.assert_close(state[keep], live.hidden_states[t][keep], rtol=1e-5, atol=1e-5)
        _, some = cache.lookup(batch["index"], mask, [4, 0])
        assert sorted(some) == [0, 4] and torch.equal(some[4], states[4])
    # a repeated example: the same rows, however the batch is laid out
    subset = data.EncodedSplit({k: [v[i] for i in (5, 0, 5)] for k, v in encoded.features.items()}, [0, 0, 0])
    mask = next(iter(data.make_loader(subset, tokenizer, 3, shuffle=False, seed=0)))["attention_mask"]
    _, one = cache.lookup(torch.tensor([5, 0, 5]), mask, [3])
    assert torch.equal(one[3][0], one[3][2])


def test_lookup_refuses_what_does_not_fit(teacher_dir, tmp_path):
    _, _, teacher, tokenizer, _, encoded, _ = _setup(teacher_dir)
    cache = _open(teacher_dir, teacher, tokenizer, encoded, tmp_path, [0])
    batch = _batches(encoded, tokenizer, n=1)[0]
    with pytest.raises(LayergeoError, match="stores states"):
        cache.lookup(batch["index"], batch["attention_mask"], [3])
    with pytest.raises(LayergeoError, match="does not match"):
        cache.lookup(batch["index"].flip(0), batch["attention_mask"])
    # a mask already on a device (here "meta", as a GPU would hold it) is checked through its host copy
    with pytest.raises(LayergeoError, match="does not match"):
        cache.lookup(batch["index"].flip(0), batch["attention_mask"].to("meta"), host_mask=batch["attention_mask"])
    with pytest.raises(LayergeoError, match="out of range"):
        cache.lookup(torch.tensor([64]), torch.ones(1, 8, dtype=torch.long))


def test_bad_cache_dtype_is_a_one_line_error(teacher_dir, tmp_path, capsys):
    args = ["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--set", f"teacher.dir={teacher_dir}",
            "--set", "train.teacher_cache=true", "--set", "train.cache_dtype=bfloat16"]
    assert main(args) == 2
    assert "'train.cache_dtype' got 'bfloat16'; choose one of float16, float32" in capsys.readouterr().err
    assert load_config().train.teacher_cache is False
