"""The query language: tokens, grammar, errors with positions, and evaluation to a mask."""

from __future__ import annotations

import operator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facefind.db.errors import QuerySyntaxError
from facefind.retrieval.query import (MAX_DEPTH, MAX_LENGTH, And, Attr, Compare, Not, Or, evaluate,
                             literal_text, literals, parse)

NAMES = ["5_o_Clock_Shadow", "Big_Nose", "Eyeglasses", "Male", "Smiling", "Young", "Blond_Hair"]
K = len(NAMES)


def A(name: str) -> Attr:
    return Attr(name, NAMES.index(name))


def C(name: str, op: str, value: float) -> Compare:
    return Compare(name, NAMES.index(name), op, value)


# -- valid expressions ------------------------------------------------------------------------

VALID = [
    ("Eyeglasses", A("Eyeglasses")),
    ("  eyeGLASSES ", A("Eyeglasses")),
    ("5_o_clock_shadow", A("5_o_Clock_Shadow")),
    ("Big_Nose and Eyeglasses and not Male",
     And((A("Big_Nose"), A("Eyeglasses"), Not(A("Male"))))),
    ("Big_Nose & Eyeglasses && ~Male", And((A("Big_Nose"), A("Eyeglasses"), Not(A("Male"))))),
    ("Male OR Young | Smiling || Big_Nose",
     Or((A("Male"), A("Young"), A("Smiling"), A("Big_Nose")))),
    # precedence: not > and > or
    ("Male or Young and Smiling", Or((A("Male"), And((A("Young"), A("Smiling")))))),
    ("Male and Young or Smiling", Or((And((A("Male"), A("Young"))), A("Smiling")))),
    ("not Male and Young", And((Not(A("Male")), A("Young")))),
    ("not (Male and Young)", Not(And((A("Male"), A("Young"))))),
    ("(Male or Young) and Smiling", And((Or((A("Male"), A("Young"))), A("Smiling")))),
    ("!!Male", Not(Not(A("Male")))),
    ("NOT not Male", Not(Not(A("Male")))),
    ("Smiling > 0.9", C("Smiling", ">", 0.9)),
    ("Smiling>=.9", C("Smiling", ">=", 0.9)),
    ("Young <= 0.2", C("Young", "<=", 0.2)),
    ("Young<0", C("Young", "<", 0.0)),
    ("Young >= 1", C("Young", ">=", 1.0)),
    ("Young > 5e-1", C("Young", ">", 0.5)),
    ("0.2 < Young", C("Young", ">", 0.2)),
    ("0.9 >= smiling", C("Smiling", "<=", 0.9)),
    ("not Smiling > 0.9", Not(C("Smiling", ">", 0.9))),
    ("Smiling > 0.9 or (Blond_Hair and Young)",
     Or((C("Smiling", ">", 0.9), And((A("Blond_Hair"), A("Young")))))),
    ("Male and (Young and Smiling)", And((A("Male"), And((A("Young"), A("Smiling")))))),
    ("Male\tand\nYoung", And((A("Male"), A("Young")))),
    ("Male\u00a0and\u3000Young", And((A("Male"), A("Young")))),
]


@pytest.mark.parametrize("expr,tree", VALID)
def test_valid_expressions_parse_to_the_expected_tree(expr: str, tree) -> None:
    node = parse(expr, NAMES)
    assert node == tree
    assert parse(str(node), NAMES) == node  # the canonical text reads back to the same tree


# -- invalid expressions: position and message -----------------------------------------------

INVALID = [
    ("", 0, "empty expression"),
    ("   ", 0, "empty expression"),
    ("Eyeglases", 0, "did you mean Eyeglasses"),
    ("Male and Eyeglases", 9, "did you mean Eyeglasses"),
    ("Big Nose", 0, "did you mean Big_Nose"),
    ("Zebra", 0, "known attributes: 5_o_Clock_Shadow"),
    ("Male and", 8, "found end of expression"),
    ("Male Smiling", 5, "join terms with 'and' or 'or'"),
    ("(Male", 5, "missing ')' to close the '(' at position 0"),
    ("(Male Young)", 6, "expected 'and', 'or' or ')'"),
    ("Male)", 4, "unmatched ')'"),
    ("()", 1, "unexpected ')'"),
    ("and Male", 0, "found 'and'"),
    ("Smiling == 0.9", 8, "equality is not supported"),
    ("Smiling = 0.9", 8, "equality is not supported"),
    ("Smiling != 0.9", 8, "'!=' is not supported"),
    ("Smiling => 0.9", 8, "did you mean '>='"),
    ("Smiling > 1.5", 10, "not a probability"),
    ("Smiling > 2e3", 10, "not a probability"),
    ("Smiling >", 9, "expected a number in [0, 1]"),
    ("Smiling > Young", 10, "expected a number in [0, 1]"),
    ("Smiling > -0.5", 10, "unexpected character '-'"),
    ("0.5", 0, "found the number '0.5'"),
    ("0.5 < 0.7", 6, "expected an attribute name after '0.5 <'"),
    ("Male $ Young", 5, "unexpected character '$'"),
    ("Malé", 3, "unexpected character 'é'"),
    ("Male and 'Young'", 9, "attribute names take no quotes: write Young"),
    ("0.9.1 > Male", 0, "malformed number"),
    ("Male > 0.5.", 7, "malformed number"),
]


@pytest.mark.parametrize("expr,position,fragment", INVALID)
def test_invalid_expressions_report_position_and_reason(expr: str, position: int,
                                                        fragment: str) -> None:
    with pytest.raises(QuerySyntaxError) as info:
        parse(expr, NAMES)
    err = info.value
    assert fragment in err.message
    assert err.position == position
    assert err.expression == expr
    if expr.strip() and "\n" not in expr:
        caret_line = err.render().splitlines()[-1]
        assert caret_line.index("^") - 2 == position  # render() indents by two spaces


def test_unknown_name_is_not_accepted_even_when_close() -> None:
    with pytest.raises(QuerySyntaxError, match="did you mean Eyeglasses"):
        parse("eyeglases", NAMES)


def test_length_guard() -> None:
    ok = " or ".join(["Male"] * ((MAX_LENGTH - 4) // 8 + 1))
    assert len(ok) <= MAX_LENGTH
    assert isinstance(parse(ok, NAMES), Or)
    with pytest.raises(QuerySyntaxError, match="limit is 2,000"):
        parse("Male " + " " * MAX_LENGTH, NAMES)


@pytest.mark.parametrize("opener", ["(", "not ", "!"])
def test_depth_guard(opener: str) -> None:
    closer = ")" if opener == "(" else ""
    deep_ok = opener * MAX_DEPTH + "Male" + closer * MAX_DEPTH
    assert parse(deep_ok, NAMES) is not None
    too_deep = opener * (MAX_DEPTH + 1) + "Male" + closer * (MAX_DEPTH + 1)
    with pytest.raises(QuerySyntaxError, match="nests deeper") as info:
        parse(too_deep, NAMES)
    assert info.value.position == MAX_DEPTH * len(opener)


def test_sequential_groups_do_not_count_as_depth() -> None:
    expr = " and ".join(["(Male)"] * (MAX_DEPTH * 2))
    assert len(parse(expr, NAMES).children) == MAX_DEPTH * 2


# -- evaluation -------------------------------------------------------------------------------


def _catalog() -> tuple[np.ndarray, np.ndarray]:
    probs = np.array([[0.1, 0.5, 0.5000001, 0.9, 1.0, 0.0]] * K, dtype=np.float32)
    thresholds = np.full(K, 0.5, dtype=np.float32)
    return probs, thresholds


def test_bare_name_means_probability_reaches_threshold() -> None:
    probs, thr = _catalog()
    assert evaluate(parse("Male", NAMES), probs, thr).tolist() == [0, 1, 1, 1, 1, 0]
    thr[NAMES.index("Male")] = 0.95
    assert evaluate(parse("Male", NAMES), probs, thr).tolist() == [0, 0, 0, 0, 1, 0]


@pytest.mark.parametrize("expr,expected", [
    ("Male > 0.5", [0, 0, 1, 1, 1, 0]),
    ("Male >= 0.5", [0, 1, 1, 1, 1, 0]),
    ("Male < 0.5", [1, 0, 0, 0, 0, 1]),
    ("Male <= 0.5", [1, 1, 0, 0, 0, 1]),
    ("Male >= 0.9", [0, 0, 0, 1, 1, 0]),   # 0.9 is compared in float32: a stored 0.9 passes
    ("Male > 0.9", [0, 0, 0, 0, 1, 0]),
    ("Male >= 0", [1, 1, 1, 1, 1, 1]),
    ("Male > 1", [0, 0, 0, 0, 0, 0]),
    ("0.9 <= Male", [0, 0, 0, 1, 1, 0]),
    ("not Male > 0.5 and Young", [0, 1, 0, 0, 0, 0]),
])
def test_comparisons(expr: str, expected: list[int]) -> None:
    probs, thr = _catalog()
    assert evaluate(parse(expr, NAMES), probs, thr).astype(int).tolist() == expected


def test_evaluate_on_ground_truth_labels() -> None:
    labels = np.zeros((K, 4), dtype=np.uint8)
    labels[NAMES.index("Male")] = [1, 1, 0, 0]
    labels[NAMES.index("Eyeglasses")] = [1, 0, 1, 0]
    half = np.full(K, 0.5, dtype=np.float32)
    mask = evaluate(parse("Eyeglasses and not Male", NAMES), labels, half)
    assert mask.tolist() == [False, False, True, False]
    assert evaluate(parse("Male > 0.9", NAMES), labels, half).tolist() == [True, True, False, False]


def test_literals_carry_polarity_and_are_distinct() -> None:
    node = parse("Eyeglasses and not (Male or Smiling > 0.9) and not not Eyeglasses", NAMES)
    lits = literals(node)
    assert [(literal_text(lit, pos)) for lit, pos in lits] == [
        "Eyeglasses", "not Male", "Smiling <= 0.9"]  # a negated comparison reads as what it means


# -- property tests ---------------------------------------------------------------------------

VALUES = [0.0, 0.25, 0.5, 0.6, 0.75, 0.9, 1.0]
OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
FLIP = {">": "<", ">=": "<=", "<": ">", "<=": ">="}
NUMBER_SPELLINGS = {0.0: ["0", "0.0", ".0"], 0.25: ["0.25", ".25", "2.5e-1"],
                    0.5: ["0.5", ".5", "0.50", "5E-1"], 0.6: ["0.6", ".6"], 0.75: ["0.75"],
                    0.9: ["0.9", ".90"], 1.0: ["1", "1.0", "1."]}

leaves = st.one_of(
    st.tuples(st.just("attr"), st.integers(0, K - 1)),
    st.tuples(st.just("cmp"), st.integers(0, K - 1), st.sampled_from(list(OPS)),
              st.sampled_from(VALUES)),
)
trees = st.recursive(
    leaves,
    lambda sub: st.one_of(
        st.tuples(st.just("not"), sub),
        st.tuples(st.just("and"), st.lists(sub, min_size=2, max_size=3)),
        st.tuples(st.just("or"), st.lists(sub, min_size=2, max_size=3)),
    ),
    max_leaves=10,
)
PREC = {"or": 1, "and": 2, "not": 3, "attr": 4, "cmp": 4}
WORDS = {"and": ["and", "AND", "And", "&", "&&"], "or": ["or", "OR", "|", "||"],
         "not": ["not ", "NOT ", "!", "~", "not("]}


def render(tree, draw) -> str:
    """Text for ``tree`` in a randomly chosen spelling, with parentheses where precedence needs
    them and sometimes where it does not."""
    kind = tree[0]
    if kind == "attr":
        name = NAMES[tree[1]]
        text = draw(st.sampled_from([name, name.lower(), name.upper()]))
    elif kind == "cmp":
        _, k, op, value = tree
        number = draw(st.sampled_from(NUMBER_SPELLINGS[value]))
        text = (f"{NAMES[k]} {op} {number}" if draw(st.booleans())
                else f"{number}{FLIP[op]}{NAMES[k]}")
    elif kind == "not":
        word = draw(st.sampled_from(WORDS["not"]))
        child = render(tree[1], draw)
        if word == "not(":
            text = f"not({child})"
        else:
            text = word + (child if PREC[tree[1][0]] >= 3 else f"({child})")
    else:
        parts = []
        for child in tree[1]:
            t = render(child, draw)
            parts.append(t if PREC[child[0]] > PREC[kind] else f"({t})")
        text = "".join(p + (f" {draw(st.sampled_from(WORDS[kind]))} " if i < len(parts) - 1
                            else "") for i, p in enumerate(parts))
    return f"( {text} )" if draw(st.integers(0, 9)) == 0 else text


def brute_force(tree, probs: np.ndarray, thresholds: np.ndarray, i: int) -> bool:
    """The tree's truth for image ``i``, in plain Python (comparisons in float32, as documented)."""
    kind = tree[0]
    if kind == "attr":
        return float(probs[tree[1], i]) >= float(np.float32(thresholds[tree[1]]))
    if kind == "cmp":
        _, k, op, value = tree
        return OPS[op](float(probs[k, i]), float(np.float32(value)))
    if kind == "not":
        return not brute_force(tree[1], probs, thresholds, i)
    results = [brute_force(c, probs, thresholds, i) for c in tree[1]]
    return all(results) if kind == "and" else any(results)


@settings(max_examples=400, deadline=None)
@given(tree=trees, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_random_trees_match_brute_force(tree, seed: int, data) -> None:
    rng = np.random.default_rng(seed)
    n = 40
    probs = rng.choice(np.array(VALUES + [0.1, 0.55, 0.95], dtype=np.float32), size=(K, n))
    probs[:, : n // 2] = rng.random((K, n // 2), dtype=np.float32)
    thresholds = rng.choice(np.array([0.25, 0.5, 0.6, 0.75], dtype=np.float32), size=K)
    text = render(tree, data.draw)
    node = parse(text, NAMES)
    mask = evaluate(node, probs, thresholds)
    assert mask.dtype == bool and mask.shape == (n,)
    expected = [brute_force(tree, probs, thresholds, i) for i in range(n)]
    assert mask.tolist() == expected, text
    assert parse(str(node), NAMES) == node


TOKENS = NAMES + ["and", "or", "not", "&", "|", "!", "~", "(", ")", ">", ">=", "<", "<=", "=",
                  "0.5", "1", "2", ".", "-", "Eyeglases", "é", "\t", "\n", "'"]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(st.sampled_from(TOKENS), max_size=25)
                 .map(" ".join), st.lists(st.sampled_from(TOKENS), max_size=25).map("".join)))
def test_any_text_parses_or_raises_query_syntax_error(text: str) -> None:
    try:
        node = parse(text, NAMES)
    except QuerySyntaxError as err:
        assert err.position is None or 0 <= err.position <= len(text)
        assert err.render()
    else:
        assert parse(str(node), NAMES) == node


@pytest.mark.parametrize("text", ["\x00", "𝔐ale", "Male\u2028and Young", "a" * 1999,
                                  "(" * 1000, "not " * 499, "Male" + " and Male" * 220])
def test_hostile_text_never_escapes_the_error_family(text: str) -> None:
    try:
        parse(text, NAMES)
    except QuerySyntaxError:
        pass


def test_reindex_points_literals_at_another_attribute_order() -> None:
    from facefind.retrieval.query import reindex

    node = parse("(Male and not eyeglasses) or Smiling > 0.5", ["Male", "Eyeglasses", "Smiling"])
    other = ["smiling", "EYEGLASSES", "Male", "Bald"]
    moved = reindex(node, other)
    assert str(moved) == "(Male and not EYEGLASSES) or smiling > 0.5"
    #                       rows: smiling, eyeglasses, male, bald; columns: 3 images
    rows = np.array([[0.9, 0.1, 0.1], [0, 1, 0], [1, 1, 0], [1, 1, 1]], dtype=np.float32)
    assert evaluate(moved, rows, np.full(4, 0.5, np.float32)).tolist() == [True, False, False]
    with pytest.raises(QuerySyntaxError, match="Smiling is not among"):
        reindex(node, ["Male", "Eyeglasses"])
