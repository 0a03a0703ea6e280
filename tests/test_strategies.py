"""Tests for layergeo.strategies: the paper's layer maps, every strategy, and the ``mapping`` CLI."""

import json

import pytest

from layergeo.cli import main
from layergeo.errors import LayergeoError
from layergeo.strategies import MappingOptions, build_mapper, build_mapping, forward_targets, parse_pairs, strategy_names


def mapper(strategy="forward", lt=12, ls=3, seed=0, **kw):
    return build_mapper(MappingOptions(strategy=strategy, **kw), lt, ls, seed)


def targets(pairs):
    """Teacher targets of student layers 1..L_S (drops the S0 pair)."""
    return [t for s, t in sorted(pairs) if s != 0]


# --- forward: the paper's maps and the ceil rule ---------------------------------------------

PAPER_MAPS = {
    1: [12],
    2: [6, 12],
    3: [4, 8, 12],
    4: [3, 6, 9, 12],
    6: [2, 4, 6, 8, 10, 12],
    9: [2, 3, 4, 6, 7, 8, 10, 11, 12],
    12: list(range(1, 13)),
}


@pytest.mark.parametrize("ls", sorted(PAPER_MAPS))
def test_forward_paper_maps(ls):
    assert forward_targets(12, ls) == PAPER_MAPS[ls]
    pairs = mapper("forward", 12, ls).pairs_at()
    assert pairs == [(0, 0)] + [(j + 1, t) for j, t in enumerate(PAPER_MAPS[ls])]


def test_forward_ceil_rule_all_depths():
    for lt in range(1, 25):
        for ls in range(1, lt + 1):
            got = forward_targets(lt, ls)
            assert got == [-(-j * lt // ls) for j in range(1, ls + 1)], (lt, ls)
            assert len(got) == ls
            assert got[-1] == lt
            assert all(a < b for a, b in zip(got, got[1:])), (lt, ls, got)
            assert got[0] >= 1


def test_qwen_style_map():
    assert forward_targets(36, 9) == [4, 8, 12, 16, 20, 24, 28, 32, 36]


# --- embedding pair --------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["forward", "reverse", "shuffle", "rail", "explicit"])
def test_embedding_pair_default_and_off(strategy):
    kw = {"pairs": "1:4,2:8,3:12"} if strategy == "explicit" else {}
    on = mapper(strategy, **kw).pairs_at()
    assert on[0] == (0, 0)
    assert sum(1 for s, _ in on if s == 0) == 1
    off = mapper(strategy, embeddings=False, **kw).pairs_at()
    assert all(s != 0 for s, _ in off)
    assert all(t != 0 for _, t in off)
    assert len(off) == 3 and len(on) == 4


def test_reverse_is_forward_reversed_and_keeps_embeddings():
    assert mapper("reverse").pairs_at() == [(0, 0), (1, 12), (2, 8), (3, 4)]
    assert targets(mapper("reverse", 12, 6).pairs_at()) == [12, 10, 8, 6, 4, 2]
    assert targets(mapper("reverse", 12, 9).pairs_at()) == [12, 11, 10, 8, 7, 6, 4, 3, 2]
    for lt in range(1, 17):
        for ls in range(1, lt + 1):
            rev = mapper("reverse", lt, ls).pairs_at()
            assert rev[0] == (0, 0)
            assert targets(rev) == forward_targets(lt, ls)[::-1]


# --- all_to_one -------------------------------------------------------------------------------

def test_all_to_one_default_middle():
    pairs = mapper("all_to_one").pairs_at()
    assert pairs == [(0, 6), (1, 6), (2, 6), (3, 6)]
    assert mapper("all_to_one", 6, 2).pairs_at() == [(0, 3), (1, 3), (2, 3)]
    assert mapper("all_to_one", 7, 3).pairs_at() == [(s, 3) for s in range(4)]


def test_all_to_one_configurable_target():
    assert mapper("all_to_one", target=12).pairs_at() == [(s, 12) for s in range(4)]
    assert mapper("all_to_one", target=2, embeddings=False).pairs_at() == [(1, 2), (2, 2), (3, 2)]
    with pytest.raises(LayergeoError):
        mapper("all_to_one", target=13)


# --- shuffle ----------------------------------------------------------------------------------

def test_shuffle_is_permutation_and_reproducible():
    for ls in (3, 4, 6, 9):
        fwd = forward_targets(12, ls)
        for seed in range(10):
            a = mapper("shuffle", 12, ls, seed).pairs_at()
            assert a[0] == (0, 0)
            assert [s for s, _ in a] == list(range(ls + 1))
            assert sorted(targets(a)) == fwd
            assert mapper("shuffle", 12, ls, seed).pairs_at() == a


def test_shuffle_differs_across_seeds():
    draws = {tuple(targets(mapper("shuffle", 12, 6, seed).pairs_at())) for seed in range(20)}
    assert len(draws) >= 2


@pytest.mark.parametrize("ls", [3, 4, 6, 9])
def test_shuffle_fair_never_forward_or_reverse(ls):
    fwd = forward_targets(12, ls)
    for seed in range(200):
        order = targets(mapper("shuffle", 12, ls, seed).pairs_at())
        assert order != fwd and order != fwd[::-1], (ls, seed, order)
        assert sorted(order) == fwd


def test_shuffle_any_allows_forward():
    fwd = forward_targets(12, 3)
    orders = [targets(mapper("shuffle", 12, 3, seed, shuffle="any").pairs_at()) for seed in range(200)]
    assert fwd in orders
    assert fwd[::-1] in orders
    assert all(sorted(o) == fwd for o in orders)


def test_shuffle_short_students_and_bad_mode():
    for seed in range(10):
        assert sorted(targets(mapper("shuffle", 12, 2, seed).pairs_at())) == [6, 12]
        assert targets(mapper("shuffle", 12, 1, seed).pairs_at()) == [12]
    with pytest.raises(LayergeoError):
        mapper("shuffle", shuffle="sometimes")


# --- rail -------------------------------------------------------------------------------------

def test_rail_draw_properties():
    for lt, ls in [(12, 3), (12, 6), (6, 3), (24, 9), (5, 5)]:
        m = mapper("rail", lt, ls, seed=3)
        assert m.dynamic
        for epoch in range(10):
            pairs = m.pairs_at(epoch, 0)
            assert pairs[0] == (0, 0)
            assert [s for s, _ in pairs] == list(range(ls + 1))
            t = targets(pairs)
            assert len(t) == ls and len(set(t)) == ls
            assert t == sorted(t)
            assert all(1 <= x <= lt for x in t)
    full = mapper("rail", 5, 5).pairs_at(3, 0)
    assert targets(full) == [1, 2, 3, 4, 5]


def test_rail_reproducible_and_changes_across_epochs():
    a, b = mapper("rail", seed=7), mapper("rail", seed=7)
    draws_a = [a.pairs_at(e, 0) for e in range(10)]
    assert draws_a == [b.pairs_at(e, 0) for e in range(10)]
    assert len({tuple(d) for d in draws_a}) >= 2
    # the draw for an epoch does not depend on the steps or on which epochs were asked for before
    assert a.pairs_at(4, 123) == draws_a[4]
    c = mapper("rail", seed=8)
    assert [c.pairs_at(e, 0) for e in range(10)] != draws_a


def test_rail_embeddings_off_and_states():
    m = mapper("rail", embeddings=False)
    assert all(s != 0 for s, _ in m.pairs_at(2, 0))
    assert m.student_states() == [1, 2, 3]
    assert m.teacher_states() == list(range(1, 13))
    on = mapper("rail")
    assert on.student_states() == [0, 1, 2, 3]
    assert on.teacher_states() == list(range(13))


def test_rail_every_steps_changes_by_step_period():
    m = mapper("rail", seed=1, rail_every_steps=5)
    assert m.period(0, 0) == m.period(3, 4) == 0
    assert m.period(0, 5) == 1 and m.period(9, 12) == 2
    # within one step period the pairs do not depend on the epoch
    first = m.pairs_at(0, 0)
    for epoch in range(5):
        for step in range(5):
            assert m.pairs_at(epoch, step) == first
    # across step periods they change
    draws = {tuple(m.pairs_at(0, 5 * p)) for p in range(10)}
    assert len(draws) >= 2
    # and they match the epoch-mode draw of the same period number
    epoch_mode = mapper("rail", seed=1)
    assert m.pairs_at(0, 15) == epoch_mode.pairs_at(3, 0)
    with pytest.raises(LayergeoError):
        mapper("rail", rail_every_steps=0)


# --- none and explicit ------------------------------------------------------------------------

def test_none_gives_no_pairs():
    m = mapper("none")
    assert m.pairs_at() == [] and m.pairs_at(3, 7) == []
    assert m.student_states() == [] and m.teacher_states() == []


def test_explicit_pairs():
    m = mapper("explicit", pairs="1:4,2:8,3:12")
    assert m.name == "explicit"
    assert m.pairs_at() == [(0, 0), (1, 4), (2, 8), (3, 12)]
    assert m.student_states() == [0, 1, 2, 3]
    assert m.teacher_states() == [0, 4, 8, 12]
    assert mapper("explicit", pairs="3:1, 1:12").pairs_at() == [(0, 0), (1, 12), (3, 1)]
    # an explicit S0 pair replaces the default embedding pair
    assert mapper("explicit", pairs="0:6,1:12").pairs_at() == [(0, 6), (1, 12)]


def test_explicit_via_strategy_string():
    m = mapper("1:4,2:8,3:12")
    assert m.name == "explicit"
    assert m.pairs_at() == [(0, 0), (1, 4), (2, 8), (3, 12)]
    assert mapper("3:4,1:12", embeddings=False).pairs_at() == [(1, 12), (3, 4)]


def test_parse_pairs():
    assert parse_pairs("0:0,1:4,2:8") == [(0, 0), (1, 4), (2, 8)]
    for bad in ("1-4", "1:4:5", "a:b", "", ","):
        with pytest.raises(LayergeoError):
            parse_pairs(bad)


@pytest.mark.parametrize(
    "pairs",
    ["4:4", "1:13", "-1:4", "1:-1", "1:4,1:8", "1:4,2:x", "nonsense"],
)
def test_explicit_bad_pairs(pairs):
    with pytest.raises(LayergeoError):
        mapper("explicit", pairs=pairs)


def test_explicit_needs_pairs():
    with pytest.raises(LayergeoError):
        mapper("explicit")


def test_bad_strategy_and_depths():
    with pytest.raises(LayergeoError, match="unknown matching strategy"):
        mapper("sideways")
    with pytest.raises(LayergeoError):
        mapper("1:4,1:8")
    for strategy in strategy_names():
        with pytest.raises(LayergeoError, match="deeper"):
            build_mapper(MappingOptions(strategy=strategy, pairs="1:1"), 6, 7)
        with pytest.raises(LayergeoError):
            build_mapper(MappingOptions(strategy=strategy, pairs="1:1"), 6, 0)
    with pytest.raises(LayergeoError):
        forward_targets(3, 4)


def test_registry_and_static_mappers():
    assert {"forward", "reverse", "all_to_one", "shuffle", "rail", "none", "explicit"} <= set(strategy_names())
    for name in ("forward", "reverse", "all_to_one", "shuffle", "none"):
        m = mapper(name, seed=5)
        assert not m.dynamic
        assert m.pairs_at(0, 0) == m.pairs_at(7, 1000)
        assert m.period(3, 99) == 0


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_mapping_json_exact(capsys):
    rc = main(["mapping", "--teacher-layers", "12", "--student-layers", "3", "--strategy", "reverse", "--format", "json"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.strip() == '{"strategy": "reverse", "pairs": [[0, 0], [1, 12], [2, 8], [3, 4]]}'
    assert json.loads(out) == {"strategy": "reverse", "pairs": [[0, 0], [1, 12], [2, 8], [3, 4]]}


def test_cli_mapping_json_options(capsys):
    assert main(["mapping", "--teacher-layers", "12", "--student-layers", "3", "--strategy", "all_to_one",
                 "--target", "9", "--no-embeddings", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == [[1, 9], [2, 9], [3, 9]]
    assert main(["mapping", "--teacher-layers", "12", "--student-layers", "3", "--strategy", "1:4,2:8,3:12",
                 "--no-embeddings", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"strategy": "explicit", "pairs": [[1, 4], [2, 8], [3, 12]]}
    assert main(["mapping", "--teacher-layers", "12", "--student-layers", "3", "--strategy", "rail", "--seed", "2",
                 "--epoch", "4", "--format", "json"]) == 0
    expected = mapper("rail", seed=2).pairs_at(4, 0)
    assert json.loads(capsys.readouterr().out)["pairs"] == [list(p) for p in expected]


def test_cli_mapping_table(capsys):
    rc = main(["mapping", "--teacher-layers", "12", "--student-layers", "3", "--strategy", "forward"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.strip().splitlines()
    assert "forward" in lines[0] and "12-layer teacher" in lines[0] and "3-layer student" in lines[0]
    assert lines[1].split() == ["student", "teacher"]
    assert [line.split() for line in lines[2:]] == [["S0", "T0"], ["S1", "T4"], ["S2", "T8"], ["S3", "T12"]]


def test_cli_mapping_table_none(capsys):
    assert main(["mapping", "--teacher-layers", "6", "--student-layers", "2", "--strategy", "none"]) == 0
    out = capsys.readouterr().out
    assert "(no pairs)" in out
    assert "S0" not in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--teacher-layers", "12", "--student-layers", "13"],
        ["--teacher-layers", "12", "--student-layers", "3", "--strategy", "sideways"],
        ["--teacher-layers", "12", "--student-layers", "3", "--strategy", "1:4,1:8"],
        ["--teacher-layers", "12", "--student-layers", "3", "--strategy", "all_to_one", "--target", "40"],
        ["--teacher-layers", "0", "--student-layers", "0"],
    ],
)
def test_cli_mapping_bad_input(argv, capsys):
    rc = main(["mapping", *argv])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("layergeo mapping: error: ")
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("ls", [3, 4])
def test_distinct_shuffle_gives_the_seeds_of_a_grid_distinct_fair_orders_until_there_are_none_left(ls):
    import itertools
    import math

    lt = 2 * ls
    forward = forward_targets(lt, ls)
    n_fair = math.factorial(ls) - 2
    options = MappingOptions(strategy="shuffle", shuffle="distinct", embeddings=False)
    orders = [[t for _, t in build_mapper(options, lt, ls, seed).pairs_at()] for seed in range(n_fair + 2)]
    fair = {tuple(p) for p in itertools.permutations(forward)} - {tuple(forward), tuple(forward[::-1])}
    assert {tuple(o) for o in orders[:n_fair]} == fair  # seeds 0..N-1: every fair order once
    assert orders[n_fair:] == orders[:2]  # then they repeat, in the same order
    note = build_mapper(options, lt, ls, 1).note
    assert f"of the {n_fair} fair orders" in note
    # stack 0 draws as a one-stack run; another stack goes through the same fair orders in its own fixed order
    stacks = [build_mapping(options, {"encoder": (lt, ls), "decoder": (lt, ls)}, seed).pairs_at()
              for seed in range(n_fair)]
    assert [s["encoder"] for s in stacks] == [build_mapper(options, lt, ls, seed).pairs_at() for seed in range(n_fair)]
    decoder = [tuple(t for _, t in s["decoder"]) for s in stacks]
    assert set(decoder) == fair
    assert decoder != [tuple(o) for o in orders[:n_fair]]


def test_the_default_shuffle_is_distinct_and_the_default_rail_redraws_ten_times():
    options = MappingOptions(strategy="shuffle", embeddings=False)
    assert options.shuffle == "distinct"
    orders = {tuple(t for _, t in build_mapper(options, 6, 3, seed).pairs_at()) for seed in range(4)}
    assert len(orders) == 4  # the four fair orders of 3 of 6 layers, one per seed
    assert MappingOptions().rail_draws == 10


def test_rail_draws_spread_that_many_draws_over_the_run():
    from layergeo.strategies import rail_schedule

    options = MappingOptions(strategy="rail", rail_draws=4)
    scheduled = rail_schedule(options, total_steps=30)
    assert scheduled.rail_every_steps == 8  # ceil(30 / 4): periods 0..3 over steps 0..29
    mapper = build_mapper(scheduled, 12, 3, seed=0)
    assert {mapper.period(0, step) for step in range(30)} == {0, 1, 2, 3}
    assert rail_schedule(MappingOptions(strategy="rail"), 30).rail_every_steps == 3  # the default: 10 draws
    assert rail_schedule(MappingOptions(strategy="rail", rail_draws=None), 30).rail_every_steps is None  # every epoch
    assert rail_schedule(MappingOptions(strategy="rail", rail_every_steps=7), 30).rail_every_steps == 7  # a period wins
    assert rail_schedule(MappingOptions(strategy="rail", rail_draws=50), 30).rail_every_steps == 1
