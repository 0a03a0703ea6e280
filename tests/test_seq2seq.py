"""Tests for the seq2seq family: tiny random T5, BART, Marian and bert2bert models, built offline.

Per-stack mappings, the token-level losses against a hand computation, copy init weight by
weight, the save/load round trip, per-stack geometry against a float64 brute force, resume,
and the run directory of a tiny seq2seq run.
"""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import (
    AutoModelForSeq2SeqLM, BartConfig, BertConfig, EncoderDecoderConfig, MarianConfig, T5Config,
)

from layergeo.cli import main
from layergeo.config import StudentConfig, load_config
from layergeo.errors import LayergeoError
from layergeo.families import get_family
from layergeo.models import Student, find_stack
from layergeo.runs import RunDir
from layergeo.strategies import MappingOptions, build_mapper, build_mapping, copy_targets, first_last_targets

SEQ2SEQ = get_family("seq2seq")
V, D = 97, 16


def tiny_config(kind: str, encoder_layers: int = 6, decoder_layers: int = 6):
    """Tiny random configs in the style of Hugging Face's model tests."""
    if kind == "t5":
        return T5Config(vocab_size=V, d_model=D, d_ff=24, d_kv=8, num_heads=2, num_layers=encoder_layers,
                        num_decoder_layers=decoder_layers, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if kind in ("bart", "marian"):
        cls = BartConfig if kind == "bart" else MarianConfig
        return cls(vocab_size=V, d_model=D, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                   max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    bert = dict(vocab_size=V, hidden_size=D, num_attention_heads=2, intermediate_size=24, max_position_embeddings=64)
    config = EncoderDecoderConfig.from_encoder_decoder_configs(
        BertConfig(num_hidden_layers=encoder_layers, **bert), BertConfig(num_hidden_layers=decoder_layers, **bert))
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 0, 3
    return config


KINDS = ("t5", "bart", "marian", "bert2bert")


def tiny_model(kind: str, **depths):
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(tiny_config(kind, **depths)).eval()


def batch_for(model, seed: int = 0, batch: int = 3, source: int = 7, target: int = 5):
    """Random inputs with padded sources and targets (labels -100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, V, (batch, source), generator=g)
    attention = torch.ones(batch, source, dtype=torch.long)
    attention[0, -2:] = 0
    labels = torch.randint(4, V, (batch, target), generator=g)
    labels[1, -2:] = -100
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "decoder_input_ids": decoder_input_ids}


# ---- the family reads each config's own names


@pytest.mark.parametrize("kind", KINDS)
def test_depths_and_width_come_from_each_configs_own_names(kind):
    config = tiny_config(kind, encoder_layers=5, decoder_layers=3)
    assert SEQ2SEQ.depths(config) == {"encoder": 5, "decoder": 3}
    assert SEQ2SEQ.width(config) == D


@pytest.mark.parametrize("kind", KINDS)
def test_forward_gives_logits_states_and_masks_per_stack(kind):
    model = tiny_model(kind, encoder_layers=3, decoder_layers=2)
    batch = batch_for(model)
    out = model(**SEQ2SEQ.inputs(batch), output_hidden_states=True)
    states, masks = SEQ2SEQ.hidden_states(out), SEQ2SEQ.masks(batch)
    assert out.logits.shape == (3, 5, V)
    assert len(states["encoder"]) == 4 and len(states["decoder"]) == 3
    assert states["encoder"][0].shape == (3, 7, D) and states["decoder"][0].shape == (3, 5, D)
    assert masks["encoder"].sum() == 3 * 7 - 2 and masks["decoder"].sum() == 3 * 5 - 2


# ---- copy init, weight by weight


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k in sb)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", ["forward", "first_last"])
def test_copy_init_puts_the_chosen_teacher_layers_in_the_student_slots(kind, rule):
    teacher = tiny_model(kind)
    spec = StudentConfig(layers=3, decoder_layers=2, init="copy", copy_rule=rule)
    plan = {"encoder": copy_targets(rule, 6, 3), "decoder": copy_targets(rule, 6, 2)}
    student = SEQ2SEQ.build_student(teacher, spec, plan)
    assert SEQ2SEQ.depths(student.config) == {"encoder": 3, "decoder": 2}
    for stack, part in (("encoder", "get_encoder"), ("decoder", "get_decoder")):
        t_layers = find_stack(getattr(teacher, part)(), 6, stack)
        s_layers = find_stack(getattr(student, part)(), plan[stack].__len__(), stack)
        for j, k in enumerate(plan[stack]):
            assert _same(s_layers[j], t_layers[k - 1]), (stack, j, k)
            if kind == "t5" and j == 0:  # the relative position bias lives in layer 0 only: the student keeps it
                bias = s_layers[0].layer[0].SelfAttention.relative_attention_bias.weight
                assert torch.equal(bias, t_layers[0].layer[0].SelfAttention.relative_attention_bias.weight)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert torch.equal(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)


def test_random_init_keeps_nothing_of_the_teacher():
    teacher = tiny_model("bart")
    student = SEQ2SEQ.build_student(teacher, StudentConfig(layers=2, init="random"), {"encoder": [1, 2], "decoder": [1, 2]})
    assert not torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


def test_the_copy_rules_are_the_authors():
    assert first_last_targets(12, 3) == [1, 7, 12] and first_last_targets(12, 6) == [1, 3, 5, 8, 10, 12]
    assert first_last_targets(12, 9) == [1, 2, 3, 6, 7, 8, 10, 11, 12]  # T5 (paper notes section 3.2)
    assert copy_targets("forward", 12, 3) == [4, 8, 12]  # BART copies its matching targets
    assert first_last_targets(36, 9) == [1, 5, 10, 14, 19, 23, 28, 32, 36]  # Qwen3-8B -> 9 (0, 4, ..., 35 0-based)
    for lt in range(1, 40):
        for ls in range(1, lt + 1):
            chosen = first_last_targets(lt, ls)
            assert len(set(chosen)) == ls and chosen[0] == 1 and (ls == 1 or chosen[-1] == lt) and chosen == sorted(chosen)


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_student_loads_with_from_pretrained_and_gives_the_same_logits(kind, tmp_path):
    teacher = tiny_model(kind)
    model = SEQ2SEQ.build_student(teacher, StudentConfig(layers=2), {"encoder": [3, 6], "decoder": [3, 6]}).eval()
    student = Student(model, D, {"encoder": [0, 1, 2], "decoder": [0, 1, 2]}, student_width=D)
    model.save_pretrained(tmp_path)
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    batch = batch_for(model)
    with torch.no_grad():
        assert torch.equal(model(**SEQ2SEQ.inputs(batch)).logits, again(**SEQ2SEQ.inputs(batch)).logits)
    assert len(student.projections) == 0  # same width: states are compared directly


def test_frozen_embeddings_cover_tokens_positions_and_the_tied_head_but_not_t5s_position_bias():
    for kind in KINDS:
        model = tiny_model(kind, encoder_layers=2, decoder_layers=2)
        frozen = {id(p) for p in SEQ2SEQ.embedding_parameters(model)}
        assert id(model.get_input_embeddings().weight) in frozen
        assert id(model.get_output_embeddings().weight) in frozen or not model.config.tie_word_embeddings
        if kind == "t5":
            bias = model.get_encoder().block[0].layer[0].SelfAttention.relative_attention_bias.weight
            assert id(bias) not in frozen


# ---- losses against a hand computation


def test_token_level_ce_and_kl_with_temperature_ignore_padding_as_a_hand_computation():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    labels = torch.tensor([[1, 2, 3, -100], [4, -100, -100, -100]])
    batch = {"labels": labels}
    t = 2.0
    kl_terms, ce_terms = [], []
    s64, t64 = student.double().numpy(), teacher.double().numpy()
    for b in range(2):
        for i in range(4):
            if labels[b, i] == -100:
                continue
            p = np.exp(t64[b, i] / t) / np.exp(t64[b, i] / t).sum()
            q = np.exp(s64[b, i] / t) / np.exp(s64[b, i] / t).sum()
            kl_terms.append(t * t * float((p * np.log(p / q)).sum()))
            logq = s64[b, i] - math.log(np.exp(s64[b, i]).sum())
            ce_terms.append(-float(logq[labels[b, i]]))
    assert float(SEQ2SEQ.kl_loss(student, teacher, batch, t)) == pytest.approx(np.mean(kl_terms), rel=1e-5)
    assert float(SEQ2SEQ.task_loss(student, batch)) == pytest.approx(np.mean(ce_terms), rel=1e-5)


# ---- mappings per stack


DEPTHS = {"encoder": (6, 3), "decoder": (6, 2)}


def test_every_strategy_applies_per_stack():
    def pairs(strategy, **kw):
        return build_mapping(MappingOptions(strategy=strategy, **kw), DEPTHS, seed=4).pairs_at(0, 0)

    assert pairs("forward") == {"encoder": [(0, 0), (1, 2), (2, 4), (3, 6)], "decoder": [(0, 0), (1, 3), (2, 6)]}
    assert pairs("reverse") == {"encoder": [(0, 0), (1, 6), (2, 4), (3, 2)], "decoder": [(0, 0), (1, 6), (2, 3)]}
    assert pairs("all_to_one") == {"encoder": [(0, 3), (1, 3), (2, 3), (3, 3)], "decoder": [(0, 3), (1, 3), (2, 3)]}
    assert pairs("none") == {"encoder": [], "decoder": []}
    assert pairs("forward", embeddings=False)["decoder"] == [(1, 3), (2, 6)]
    explicit = pairs("encoder:1:4,decoder:2:5")
    assert explicit == {"encoder": [(0, 0), (1, 4)], "decoder": [(0, 0), (2, 5)]}
    assert pairs("encoder:1:4", embeddings=False) == {"encoder": [(1, 4)], "decoder": []}


def test_shuffle_and_rail_draw_each_stack_from_its_own_stream_and_stack_zero_as_one_stack_would():
    for strategy in ("shuffle", "rail"):
        options = MappingOptions(strategy=strategy)
        same_depths = {"encoder": (12, 4), "decoder": (12, 4)}
        differ = 0
        for seed in range(8):
            mapping = build_mapping(options, same_depths, seed)
            drawn = mapping.pairs_at(0, 0)
            assert drawn["encoder"] == build_mapper(options, 12, 4, seed).pairs_at(0, 0)  # stack 0 = one-stack draw
            differ += drawn["encoder"] != drawn["decoder"]
        assert differ >= 6  # independent streams: 4-layer draws of 12 coincide rarely


def test_stackless_explicit_pairs_are_refused_for_two_stacks_and_unknown_stacks_are_named():
    with pytest.raises(LayergeoError, match="name no stack"):
        build_mapping(MappingOptions(strategy="1:4"), DEPTHS)
    with pytest.raises(LayergeoError, match="'cross'"):
        build_mapping(MappingOptions(strategy="cross:1:4"), DEPTHS)
    assert build_mapping(MappingOptions(strategy="1:4"), {"encoder": (6, 3)}).pairs_at() == {"encoder": [(0, 0), (1, 4)]}


def test_the_mapping_command_prints_each_stack(capsys):
    assert main(["mapping", "--family", "seq2seq", "--teacher-layers", "6", "--student-layers", "3",
                 "--strategy", "reverse", "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pairs"] == {"encoder": [[0, 0], [1, 6], [2, 4], [3, 2]], "decoder": [[0, 0], [1, 6], [2, 4], [3, 2]]}


# ---- a tiny seq2seq run: run directory, resume, geometry


TINY = ["--preset", "seq2seq-tiny", "--set", "device=cpu", "--set", "data.max_train=48", "--set", "data.max_eval=12",
        "--set", "train.eval_every=2", "--set", "train.max_steps=4", "--set", "teacher.train.max_steps=3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq2seq") / "run"
    assert main(["train", *TINY, "--set", "matching.strategy=shuffle", "--out", str(out)]) == 0
    return out


def test_a_tiny_seq2seq_run_writes_a_complete_run_directory(tiny_run):
    run = RunDir(tiny_run)
    results = run.results()
    for split in ("dev", "test"):
        assert 0 <= results[split]["bleu"] <= 100 and 0 <= results[split]["chrf"] <= 100 and results[split]["n"] == 12
    assert results["stack_layers"] == {"encoder": {"teacher": 4, "student": 2}, "decoder": {"teacher": 4, "student": 2}}
    logged = run.mappings()[0]["pairs"]
    assert set(logged) == {"encoder", "decoder"} and logged["encoder"][0] == [0, 0]
    metrics = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert any("hidden_decoder" in m for m in metrics) and any(m.get("split") == "dev" and "bleu" in m for m in metrics)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(run.checkpoint("best"))
    assert SEQ2SEQ.depths(loaded.config) == {"encoder": 2, "decoder": 2}


def test_resume_after_a_failure_gives_the_same_results(tiny_run, tmp_path, monkeypatch):
    from layergeo.families.seq2seq import Seq2SeqFamily

    out = tmp_path / "resumed"
    teacher = ["--set", f"teacher.dir={tiny_run / 'teacher'}"]
    original, calls = Seq2SeqFamily.evaluate, []

    def fails_on_the_second_dev_evaluation(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Seq2SeqFamily, "evaluate", fails_on_the_second_dev_evaluation)
    assert main(["train", *TINY, *teacher, "--set", "matching.strategy=shuffle", "--out", str(out)]) == 2
    monkeypatch.undo()
    assert not RunDir(out).finished
    assert main(["train", "--out", str(out), "--resume"]) == 0
    again, first = RunDir(out).results(), RunDir(tiny_run).results()
    for split in ("dev", "test"):
        assert again[split]["bleu"] == first[split]["bleu"] and again[split]["token_ce"] == first[split]["token_ce"]
    a = AutoModelForSeq2SeqLM.from_pretrained(RunDir(out).checkpoint("best")).state_dict()
    b = AutoModelForSeq2SeqLM.from_pretrained(RunDir(tiny_run).checkpoint("best")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_angles_measure_each_stack_as_a_float64_brute_force(tiny_run, tmp_path):
    from layergeo.collect import hidden_states, load_run, texts_loader

    out = tmp_path / "angles"
    assert main(["angles", "--run", str(tiny_run), "--out", str(out), "--max-examples", "6", "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stacks"]) == {"encoder", "decoder"}
    for stack in ("encoder", "decoder"):
        angles = pd.read_csv(out / stack / "angles.csv")
        assert set(angles["stack"]) == {stack} and (out / stack / "angles_frac_acute.png").is_file()
        loaded = load_run(tiny_run)
        loader, _, _ = texts_loader(loaded, "dev", None, 6)
        batches = list(hidden_states(loaded, loader, torch.device("cpu")))
        teacher = torch.cat([b[stack][0] for b in batches]).double()
        student = torch.cat([b[stack][1] for b in batches]).double()
        assert summary["n_tokens"][stack] == teacher.shape[0]
        encoded = loader.dataset  # what counts: every source token, every target token (the labels, padding apart)
        counted = encoded.features["input_ids"] if stack == "encoder" else encoded.labels
        assert teacher.shape[0] == sum(len(ids) for ids in counted)
        # every (student layer, teacher pair) cell: fraction of positions where (T_i - S)(T_k - S) > 0
        for row in angles.itertuples():
            u_i = teacher[:, row.teacher_i] - student[:, row.student_layer]
            u_k = teacher[:, row.teacher_k] - student[:, row.student_layer]
            cos = (u_i * u_k).sum(-1) / (u_i.norm(dim=-1) * u_k.norm(dim=-1))
            assert row.frac_acute == pytest.approx(float((cos > 0).double().mean()), abs=1e-9)
            assert row.n_tokens == teacher.shape[0]


def test_seq2seq_refuses_what_it_cannot_do(tiny_run, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("In the beginning.\n")
    assert main(["angles", "--run", str(tiny_run), "--texts", str(texts), "--out", str(tmp_path / "a")]) == 2
    assert "need the target" in capsys.readouterr().err
    assert main(["train", *TINY, "--set", "train.teacher_cache=true", "--out", str(tmp_path / "b")]) == 2
    assert "teacher_cache is not available for the seq2seq family" in capsys.readouterr().err
    assert main(["train", *TINY, "--set", "student.layers=5", "--out", str(tmp_path / "c")]) == 2
    assert "deeper than its teacher encoder" in capsys.readouterr().err
    assert main(["train", *TINY, "--set", "student.init=random", "--set", "student.hidden_size=32", "--out", str(tmp_path / "d")]) == 2
    assert "narrower seq2seq student is not supported" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_a_config_with_the_teacher_of_another_family_is_refused(tiny_run, tmp_path, capsys):
    config = load_config(preset="tiny", overrides=[f"teacher.dir={tiny_run / 'teacher'}"])
    assert config.teacher.family == "encoder"
    assert main(["train", "--preset", "tiny", "--set", f"teacher.dir={tiny_run / 'teacher'}", "--out", str(tmp_path / "x")]) == 2
    assert "is a seq2seq model" in capsys.readouterr().err
