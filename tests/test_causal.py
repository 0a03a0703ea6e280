"""Tests for the causal (decoder-only) family: tiny random GPT-2, Llama and Qwen3 models, built offline.

Mappings without the embedding pair, the completion mask of CE and KL against a hand
computation, copy init weight by weight, LoRA training only the adapter, the merged save ->
``from_pretrained`` round trip, choice ranking against a brute force, resume, geometry against
a float64 brute force, and the run directory of a tiny run.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from layergeo import completions
from layergeo.cli import main
from layergeo.config import LoraSettings, StudentConfig, load_config
from layergeo.families import get_family
from layergeo.families.causal import _scored_rows, choice_scores
from layergeo.models import find_stack
from layergeo.runs import RunDir
from layergeo.strategies import build_mapping

CAUSAL = get_family("causal")
V, D = 97, 16
KINDS = ["llama", "qwen3", "gpt2"]
TINY = ["--preset", "causal-tiny", "--set", "device=cpu", "--set", "data.max_train=48", "--set", "data.max_eval=12",
        "--set", "train.batch_size=8", "--set", "teacher.train.batch_size=8", "--set", "train.eval_every=3"]


def tiny_config(kind: str, layers: int = 6):
    """Tiny random configs in the style of Hugging Face's model tests."""
    extra = {"gpt2": {"n_inner": 24}, "llama": {"num_key_value_heads": 1, "intermediate_size": 24},
             "qwen3": {"num_key_value_heads": 1, "intermediate_size": 24, "head_dim": 8}}[kind]
    return AutoConfig.for_model(kind, vocab_size=V, hidden_size=D, num_hidden_layers=layers, num_attention_heads=2,
                                max_position_embeddings=64, tie_word_embeddings=True, **extra)


def tiny_model(kind: str, layers: int = 6):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(kind, layers)).eval()


class WordTokenizer:
    """Whitespace tokens over a fixed vocabulary: enough for the encoder of completion tasks."""

    def __init__(self, words):
        self.vocab = {w: i + 3 for i, w in enumerate(words)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab[w] for w in text.split()]}


def test_depths_and_width_come_from_each_configs_own_names():
    for kind in KINDS:
        config = tiny_config(kind, layers=5)
        assert CAUSAL.depths(config) == {"decoder": 5} and CAUSAL.width(config) == D


@pytest.mark.parametrize("kind", KINDS)
def test_copy_init_copies_embeddings_norm_head_and_the_chosen_layers(kind):
    teacher = tiny_model(kind)
    student = CAUSAL.build_student(teacher, StudentConfig(layers=3, init="copy"), {"decoder": [1, 4, 6]})
    t_stack, s_stack = find_stack(teacher, 6, "t"), find_stack(student, 3, "s")
    for j, k in enumerate([1, 4, 6]):
        a, b = t_stack[k - 1].state_dict(), s_stack[j].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    t_rest = {n: v for n, v in teacher.state_dict().items() if ".h." not in n and ".layers." not in n}
    s_state = student.state_dict()
    assert t_rest and all(torch.equal(v, s_state[n]) for n, v in t_rest.items())  # embeddings, final norm, head


def test_qwen3_students_keep_the_attention_kind_of_the_layers_they_copy():
    config = tiny_config("qwen3")
    config.layer_types = ["full_attention", "sliding_attention"] * 3
    teacher = AutoModelForCausalLM.from_config(config)
    student = CAUSAL.build_student(teacher, StudentConfig(layers=2, init="copy"), {"decoder": [2, 5]})
    assert student.config.layer_types == ["sliding_attention", "full_attention"]


def test_a_narrower_random_student_gets_consistent_heads():
    teacher = tiny_model("llama")
    student = CAUSAL.build_student(teacher, StudentConfig(layers=2, init="random", hidden_size=12), {"decoder": [3, 6]})
    config = student.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (12, 2, 1, 6)
    assert config.intermediate_size == 18  # the teacher's ratio 24 / 16
    student(input_ids=torch.tensor([[1, 2, 3]]))  # it runs


def test_lora_freezes_the_copy_and_trains_only_the_adapter():
    teacher = tiny_model("llama")
    spec = StudentConfig(layers=2, init="copy", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    student = CAUSAL.build_student(teacher, spec, {"decoder": [3, 6]})
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n or "embed" in n for n in trainable)


def test_the_merged_checkpoint_loads_with_from_pretrained_and_gives_the_adapters_logits(tmp_path):
    from layergeo.adapters import save_model

    teacher = tiny_model("qwen3")
    spec = StudentConfig(layers=2, init="copy", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    student = CAUSAL.build_student(teacher, spec, {"decoder": [3, 6]})
    with torch.no_grad():  # a trained adapter (B starts at zero, which would make the test vacuous)
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_model(student, tmp_path)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    student.eval()
    with torch.no_grad():
        expected, got = student(input_ids=ids).logits, loaded(input_ids=ids).logits
        plain = CAUSAL.build_student(teacher, StudentConfig(layers=2, init="copy"), {"decoder": [3, 6]}).eval()(input_ids=ids).logits
    assert torch.allclose(expected, got, atol=1e-5) and not torch.allclose(plain, got, atol=1e-3)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_the_authors_llm_mappings_have_no_embedding_pair_and_all_to_one_targets_the_middle():
    config = load_config(preset="causal")
    assert not config.matching.embeddings and config.loss.normalize == "l2"
    config.matching.strategy = "all_to_one"
    pairs = build_mapping(config.matching, {"decoder": (36, 9)}).pairs_at()["decoder"]
    assert pairs == [(s, 18) for s in range(1, 10)]
    config.matching.strategy = "forward"
    assert build_mapping(config.matching, {"decoder": (36, 9)}).pairs_at()["decoder"] == [(j, 4 * j) for j in range(1, 10)]
    from layergeo.strategies import copy_targets

    assert copy_targets("first_last", 36, 9) == [1, 5, 10, 14, 19, 23, 28, 32, 36]  # the authors' LAYER_COPY_MAP[36]
    assert copy_targets("first_last", 30, 10) == [1, 4, 7, 11, 14, 17, 20, 24, 27, 30]  # the embedded preset's


def _task(choices=(" yes", " no")):
    frame = pd.DataFrame({"text": ["a b c d", "c d"], "completion": [" yes", " no"]})
    return completions.CompletionTask("t", {"train": frame}, "test", head="Q ", tail=" A", choices=choices)


def test_encoding_masks_the_prompt_and_cuts_the_text_to_fit():
    tok = WordTokenizer(["Q", "A", "a", "b", "c", "d", "yes", "no"])
    task = _task()
    encoded = completions.encode_completions(task.splits["train"], task, tok, max_length=7)
    first = encoded[0]
    # bos Q a b A yes eos: the text "a b c d" is cut to two words to leave room for head, tail and answer
    assert first["input_ids"] == [1, 3, 5, 6, 4, 9, 2]
    assert first["labels"] == [-100] * 5 + [9, 2]
    assert first["distil_mask"] == [0, 0, 0, 0, 1, 1, 0]  # the positions that predict "yes" and eos
    everything = completions.encode_completions(task.splits["train"], task, tok, max_length=7, positions="all")
    assert everything[0]["distil_mask"] == [1, 1, 1, 1, 1, 1, 0]
    assert encoded.choice_ids == [[9], [10]] and encoded.gold == [0, 1]
    assert encoded.completions == ["yes", "no"]


def test_completion_ce_and_kl_average_over_the_masked_positions_as_a_hand_computation():
    torch.manual_seed(0)
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])  # the second example is padded after 7
    distil = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    batch = {"labels": labels, "distil_mask": distil}
    student, teacher = torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    terms, kls = [], []
    for b, t in [(0, 1), (0, 2), (1, 0)]:  # position t predicts the completion token at t + 1
        terms.append(-F.log_softmax(student[b, t], -1)[labels[b, t + 1]])
        p, q = F.softmax(teacher[b, t] / 2, -1), F.softmax(student[b, t] / 2, -1)
        kls.append(4 * (p * (p.log() - q.log())).sum())
    assert CAUSAL.task_loss(student, batch) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    assert CAUSAL.kl_loss(student, teacher, batch, 2.0) == pytest.approx(float(torch.stack(kls).mean()), rel=1e-5)


def test_choice_ranking_of_one_token_choices_equals_scoring_each_prompt_and_choice():
    model = tiny_model("llama")
    prompts = [[1, 5, 6, 7], [1, 8, 9]]
    dataset = completions.EncodedCompletions([], prompts, ["x", "y"], [[11], [12], [13]], [0, 2])
    ids = torch.tensor([[1, 5, 6, 7, 11, 2], [1, 8, 9, 13, 2, 0]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=(torch.arange(6) < torch.tensor([[6], [5]])).long()).logits
        fast = choice_scores(model, logits, dataset, [0, 1], "cpu")
        slow = _scored_rows(model, dataset, [0, 1], "cpu")
        by_hand = [[float(F.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0, -2], -1)[c[0]])
                    for c in dataset.choice_ids] for p in prompts]
    assert torch.allclose(torch.tensor(fast), torch.tensor(by_hand), atol=1e-5)
    assert torch.allclose(torch.tensor(slow), torch.tensor(by_hand), atol=1e-5)
    two_tokens = completions.EncodedCompletions([], prompts, ["x", "y"], [[11, 12], [13, 14]], [0, 1])
    with torch.no_grad():
        scores = choice_scores(model, logits, two_tokens, [0, 1], "cpu")
        p = prompts[1] + [13, 14]
        log_p = F.log_softmax(model(input_ids=torch.tensor([p])).logits[0], -1)
    assert scores[1][1] == pytest.approx(float(log_p[2, 13] + log_p[3, 14]), abs=1e-5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("causal") / "run"
    assert main(["train", *TINY, "--set", "matching.strategy=reverse", "--out", str(out)]) == 0
    return out


def test_a_tiny_causal_run_writes_a_complete_run_directory(tiny_run):
    run = RunDir(tiny_run)
    results = run.results()
    for split in ("dev", "test"):
        metrics = results[split]
        assert metrics["n"] == 12 and metrics["accuracy"] == metrics["choice_accuracy"]
        assert 0 <= metrics["exact_match"] <= 1 and metrics["perplexity"] > 1 and metrics["accuracy_by"] == "choice log-likelihood"
        task = get_family("causal").load_task(run.config())
        answers = task.splits[split]["completion"].tolist()
        assert metrics["majority_rate"] == pytest.approx(max(map(answers.count, set(answers))) / 12)
        assert metrics["predicted_classes"] in (1, 2)  # of the task's two answers
    assert run.mappings()[0]["pairs"] == [[1, 4], [2, 2]]  # reverse of T2, T4 with no embedding pair
    teacher_config = RunDir(tiny_run / "teacher").config()
    assert teacher_config.teacher.family == "causal"
    best = AutoModelForCausalLM.from_pretrained(run.checkpoint("best"))
    assert CAUSAL.depths(best.config) == {"decoder": 2}
    init = AutoModelForCausalLM.from_pretrained(run.checkpoint("init")).state_dict()
    adapter = json.loads((run.checkpoint("best") / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8
    # only the adapter trained: the merged weights differ from the copy only in the adapted linear layers
    changed = {n for n, v in best.state_dict().items() if not torch.equal(v, init[n])}
    assert changed and all(n.endswith("proj.weight") for n in changed)


def test_resume_after_a_failure_gives_the_same_results(tiny_run, tmp_path, monkeypatch):
    from layergeo.families.causal import CausalFamily

    out = tmp_path / "resumed"
    original, calls = CausalFamily.evaluate, []

    def fails_on_the_second_dev_evaluation(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return original(self, *args, **kwargs)

    teacher = ["--set", f"teacher.dir={tiny_run / 'teacher'}"]
    monkeypatch.setattr(CausalFamily, "evaluate", fails_on_the_second_dev_evaluation)
    assert main(["train", *TINY, *teacher, "--set", "matching.strategy=reverse", "--out", str(out)]) == 2
    monkeypatch.undo()
    saved = torch.load(out / "checkpoints" / "last" / "state.pt", weights_only=False)["module"]
    assert saved and all("lora_" in k for k in saved)  # only the trainable state is saved
    assert main(["train", "--out", str(out), "--resume"]) == 0
    again, first = RunDir(out).results(), RunDir(tiny_run).results()
    for split in ("dev", "test"):
        assert again[split]["accuracy"] == first[split]["accuracy"] and again[split]["token_ce"] == first[split]["token_ce"]
    a = AutoModelForCausalLM.from_pretrained(RunDir(out).checkpoint("best")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(RunDir(tiny_run).checkpoint("best")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_angles_measure_the_decoder_stack_as_a_float64_brute_force(tiny_run, tmp_path):
    from layergeo.collect import hidden_states, load_run, texts_loader

    out = tmp_path / "angles"
    assert main(["angles", "--run", str(tiny_run), "--out", str(out), "--max-examples", "6", "--device", "cpu"]) == 0
    angles = pd.read_csv(out / "angles.csv")
    loaded = load_run(tiny_run)
    loader, _, _ = texts_loader(loaded, "dev", None, 6)
    batches = list(hidden_states(loaded, loader, torch.device("cpu")))
    teacher = torch.cat([b["decoder"][0] for b in batches]).double()
    student = torch.cat([b["decoder"][1] for b in batches]).double()
    # what counts: the positions that predict a completion token (its word and the eos), per example
    assert teacher.shape[0] == sum(sum(item["distil_mask"]) for item in loader.dataset.items) == 12
    degenerate_rows = 0
    for row in angles.itertuples():
        u_i = teacher[:, row.teacher_i] - student[:, row.student_layer]
        u_k = teacher[:, row.teacher_k] - student[:, row.student_layer]
        valid = (u_i.norm(dim=-1) > 0) & (u_k.norm(dim=-1) > 0)  # S0 = T0 exactly: the LoRA student's embeddings are frozen
        assert row.n_degenerate == int((~valid).sum())
        if not valid.any():
            degenerate_rows += 1
            assert pd.isna(row.frac_acute)
            continue
        cos = (u_i * u_k).sum(-1)[valid] / (u_i.norm(dim=-1) * u_k.norm(dim=-1))[valid]
        assert row.frac_acute == pytest.approx(float((cos > 0).double().mean()), abs=1e-9)
    assert degenerate_rows == 4  # S0 with (T0, T_k), k = 1..4: T0 - S0 = 0 at every token


def test_the_causal_family_refuses_what_it_cannot_do(tiny_run, tmp_path, capsys):
    assert main(["train", *TINY, "--set", "student.init=random", "--out", str(tmp_path / "a")]) == 2
    assert "random base would stay random" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--set", "student.lora.r=8", "--out", str(tmp_path / "b")]) == 2
    assert "LoRA adapters are for the causal family" in capsys.readouterr().err
    assert main(["train", *TINY, "--set", "data.task=glue_like", "--out", str(tmp_path / "c")]) == 2
    assert "unknown completion task" in capsys.readouterr().err
    assert main(["train", *TINY, "--set", "loss.positions=prompt", "--out", str(tmp_path / "d")]) == 2
    assert "loss.positions" in capsys.readouterr().err
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_the_embedded_lm_ships_as_the_published_gguf_file():
    from layergeo import smollm2

    path = smollm2.gguf_path()
    assert path.stat().st_size == 98_362_432 and smollm2.sha256(path) == smollm2.GGUF_SHA256


def test_top_k_kl_is_at_most_the_exact_kl_and_equals_it_when_k_is_the_vocabulary():
    from layergeo.losses import kl_to_teacher, top_k_kl_to_teacher

    torch.manual_seed(0)
    student, teacher = torch.randn(5, 50, dtype=torch.float64), 3 * torch.randn(5, 50, dtype=torch.float64)
    for t in (1.0, 2.0):
        exact = float(kl_to_teacher(student, teacher, t))
        log_p = F.log_softmax(teacher / t, -1)
        previous = 0.0
        for k in (1, 5, 20, 49, 50):
            top, idx = log_p.topk(k, dim=-1)
            value = float(top_k_kl_to_teacher(student, top, idx, t))
            # a brute force of the coarsened distributions (k kept tokens + one bucket)
            p, q = log_p.exp(), F.softmax(student / t, -1)
            keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True)
            pk = torch.cat([p.gather(-1, idx), (p * ~keep).sum(-1, keepdim=True)], -1)
            qk = torch.cat([q.gather(-1, idx), (q * ~keep).sum(-1, keepdim=True)], -1)
            brute = float((pk * (pk.clamp_min(1e-300).log() - qk.clamp_min(1e-300).log())).sum(-1).mean() * t * t)
            assert value == pytest.approx(brute, rel=1e-6, abs=1e-9)
            assert previous - 1e-9 <= value <= exact * (1 + 1e-6)  # a finer bucketing never loses information
            previous = value
        assert previous == pytest.approx(exact, rel=1e-6)  # kl_to_teacher computes in float32
