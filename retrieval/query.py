"""The facefind query language: parse boolean attribute expressions into a small tree, evaluate it.

Grammar (keywords and attribute names are case-insensitive)::

    expr     := and_expr (OR and_expr)*             OR  := 'or'  | '|' | '||'
    and_expr := unary (AND unary)*                  AND := 'and' | '&' | '&&'
    unary    := NOT unary | primary                 NOT := 'not' | '!' | '~'
    primary  := '(' expr ')' | NAME [CMP NUMBER] | NUMBER CMP NAME | PREFIX ':' VALUE
    CMP      := '>' | '>=' | '<' | '<='
    PREFIX   := 'label' | 'split' | 'person'        VALUE := NAME | NUMBER | "text" | 'text'

Precedence is not > and > or. A bare ``NAME`` is true when the attribute's probability reaches its
calibrated threshold (``p >= threshold``); ``NAME > 0.9`` compares the probability itself, with
the number in [0, 1] (``0.9 < NAME`` is the same thing). Comparisons happen in float32, the
precision the probabilities are stored in, so ``Smiling >= 0.9`` includes a stored ``0.9``.
A name token is ``[A-Za-z0-9_]+`` that is not a number, so ``5_o_Clock_Shadow`` is a name.

A prefixed literal (a ``Tag``) is a fact recorded about an entry rather than predicted:
``label:Eyeglasses`` (the ground-truth label of an annotated file), ``split:val`` (its split in
the dataset's partition file), ``person:12`` or ``person:"Ada"`` (the person its face belongs to,
``facefind people``). Tags are true or false, never compared with numbers; they mix with
everything else (``label:Eyeglasses and not Eyeglasses``). What a prefix may name depends on the
index, so ``parse`` takes one resolver per prefix (or the one-line reason the index has none).

The empty expression is an error; the engine takes ``None`` to mean "every image". Nothing here
calls ``eval`` or builds SQL text: the tree is folded straight into numpy operations.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar, Union

import numpy as np

from facefind.db.errors import QuerySyntaxError

MAX_LENGTH = 2000   # characters; longer input is refused before tokenising
MAX_DEPTH = 64      # nesting of parentheses and 'not'

# ---------------------------------------------------------------------------------------------
# The tree


@dataclass(frozen=True)
class Attr:
    """``NAME``: the attribute's probability reaches its calibrated threshold."""

    name: str    # canonical spelling, as in the index
    index: int   # row in the (K, N) probability matrix

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Compare:
    """``NAME op value``: the attribute's probability compared with a number in [0, 1]."""

    name: str
    index: int
    op: str      # one of '>', '>=', '<', '<='
    value: float

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.value!r}"


@dataclass(frozen=True)
class Not:
    child: "Node"

    def __str__(self) -> str:
        inner = str(self.child)
        return f"not ({inner})" if isinstance(self.child, (And, Or)) else f"not {inner}"


@dataclass(frozen=True)
class And:
    children: tuple["Node", ...]

    def __str__(self) -> str:
        return " and ".join(f"({c})" if isinstance(c, (And, Or)) else str(c) for c in self.children)


@dataclass(frozen=True)
class Or:
    children: tuple["Node", ...]

    def __str__(self) -> str:
        return " or ".join(f"({c})" if isinstance(c, (And, Or)) else str(c) for c in self.children)


@dataclass(frozen=True)
class Tag:
    """``prefix:value``: a recorded fact about the entry (``label:Male``, ``split:val``, ``person:3``)."""

    prefix: str   # one of PREFIXES
    value: str    # canonical spelling (the attribute, split or person name; a person's id)
    key: int      # what evaluation looks up: the label row, the split code, the person id

    def __str__(self) -> str:
        if re.fullmatch(r"[A-Za-z0-9_]+", self.value):
            return f"{self.prefix}:{self.value}"
        quote = "'" if '"' in self.value else '"'  # the tokenizer reads "..." and '...', no escapes
        return f"{self.prefix}:{quote}{self.value}{quote}"


Node = Union[Attr, Compare, Tag, Not, And, Or]
Literal = Union[Attr, Compare, Tag]
PREFIXES = ("label", "split", "person")
# What a prefix may name: a resolver from the value as typed to ``(canonical value, key)`` that
# raises LookupError with a one-line message (e.g. a did-you-mean), or that message as a string
# when the index has nothing to name (no labels, no partition file, no persons).
Resolver = Callable[[str], "tuple[str, int]"]

_FLIP = {">": "<", ">=": "<=", "<": ">", "<=": ">="}

# ---------------------------------------------------------------------------------------------
# Tokens

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<number>(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?(?![A-Za-z0-9_.]))
  | (?P<name>[A-Za-z0-9_]+)
  | (?P<string>"[^"]*"|'[^']*')
  | (?P<op>>=|<=|==|!=|=>|=<|&&|\|\||[<>=&|!~():])
    """,
    re.VERBOSE,  # explicit ASCII classes for names and numbers; \s also takes unicode spaces
)
_KEYWORDS = {"and": "and", "or": "or", "not": "not"}
_SYMBOLS = {"&": "and", "&&": "and", "|": "or", "||": "or", "!": "not", "~": "not",
            "(": "(", ")": ")", ":": ":", ">": "cmp", ">=": "cmp", "<": "cmp", "<=": "cmp"}
_BAD_OPS = {
    "=": "equality is not supported on probabilities; use >= or <= (e.g. Smiling >= 0.9)",
    "==": "equality is not supported on probabilities; use >= or <= (e.g. Smiling >= 0.9)",
    "!=": "'!=' is not supported; use not, < or > (e.g. not Smiling, or Smiling < 0.5)",
    "=>": "'=>' is not an operator; did you mean '>='?",
    "=<": "'=<' is not an operator; did you mean '<='?",
}


@dataclass(frozen=True)
class _Token:
    kind: str   # 'name' | 'number' | 'string' | 'and' | 'or' | 'not' | '(' | ')' | ':' | 'cmp' | 'end'
    text: str
    pos: int


def _tokenize(expr: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if m is None:
            if expr[pos] in "\"'":
                raise QuerySyntaxError(f"unclosed quote {expr[pos]} (position {pos})", expr, pos)
            raise QuerySyntaxError(
                f"unexpected character {expr[pos]!r}: use attribute names, and/or/not, "
                f"parentheses and >, >=, <, <= (position {pos})", expr, pos)
        kind, text = m.lastgroup, m.group()
        if kind == "name":
            if text.isdigit():  # digits glued to something: '0.9.1', '1.5.'
                raise QuerySyntaxError(f"malformed number (position {pos})", expr, pos)
            kind = _KEYWORDS.get(text.lower(), "name")
        elif kind == "op":
            if text in _BAD_OPS:
                raise QuerySyntaxError(f"{_BAD_OPS[text]} (position {pos})", expr, pos)
            kind = _SYMBOLS[text]
        if kind != "ws":
            tokens.append(_Token(kind, text, pos))
        pos = m.end()
    tokens.append(_Token("end", "", len(expr)))
    return tokens


# ---------------------------------------------------------------------------------------------
# The parser


def parse(expr: str, attributes: Sequence[str],
          tags: Mapping[str, Resolver | str] | None = None) -> Node:
    """Parse ``expr`` into a tree whose names are checked against ``attributes`` (the index's)
    and whose prefixed literals are resolved by ``tags`` (prefix -> resolver, or the one-line
    reason the index has none; a prefix missing from ``tags`` is refused the same way).

    Raises ``QuerySyntaxError`` with the 0-based position of the problem: malformed syntax,
    an unknown name (with a did-you-mean), a number outside [0, 1], too long or too deeply nested.
    """
    if len(expr) > MAX_LENGTH:
        raise QuerySyntaxError(
            f"expression is {len(expr):,} characters long; the limit is {MAX_LENGTH:,}. "
            "Split the query or simplify it", expr[:80] + "...", None)
    if not expr.strip():
        raise QuerySyntaxError(
            "empty expression: name at least one attribute, e.g. 'Smiling and not Male'", expr, 0)
    return _Parser(expr, attributes, tags or {}).parse()


class _Parser:
    """Recursive descent over the token list; one method per grammar rule."""

    def __init__(self, expr: str, attributes: Sequence[str], tags: Mapping[str, Resolver | str]) -> None:
        self.expr = expr
        self.attributes = list(attributes)
        self.tags = tags
        self.lookup = {name.lower(): i for i, name in enumerate(self.attributes)}
        self.tokens = _tokenize(expr)
        self.i = 0
        self.depth = 0

    # -- helpers
    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def error(self, message: str, pos: int) -> QuerySyntaxError:
        return QuerySyntaxError(f"{message} (position {pos})", self.expr, pos)

    def describe(self, tok: _Token) -> str:
        return "end of expression" if tok.kind == "end" else repr(tok.text)

    def enter(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nests deeper than {MAX_DEPTH} levels of parentheses "
                             "and 'not'; simplify it", tok.pos)

    # -- grammar
    def parse(self) -> Node:
        node = self.or_expr()
        tok = self.tok
        if tok.kind == ")":
            raise self.error("unmatched ')'", tok.pos)
        if tok.kind != "end":
            raise self.error(f"unexpected {self.describe(tok)} after a complete term: join terms "
                             "with 'and' or 'or'", tok.pos)
        return node

    def or_expr(self) -> Node:
        children = [self.and_expr()]
        while self.tok.kind == "or":
            self.advance()
            children.append(self.and_expr())
        return children[0] if len(children) == 1 else Or(tuple(children))

    def and_expr(self) -> Node:
        children = [self.unary()]
        while self.tok.kind == "and":
            self.advance()
            children.append(self.unary())
        return children[0] if len(children) == 1 else And(tuple(children))

    def unary(self) -> Node:
        if self.tok.kind == "not":
            self.enter(self.advance())
            child = self.unary()
            self.depth -= 1
            return Not(child)
        return self.primary()

    def primary(self) -> Node:
        tok = self.tok
        if tok.kind == "(":
            self.enter(self.advance())
            node = self.or_expr()
            if self.tok.kind != ")":
                if self.tok.kind == "end":
                    raise self.error(f"missing ')' to close the '(' at position {tok.pos}",
                                     self.tok.pos)
                raise self.error(f"expected 'and', 'or' or ')' but found {self.describe(self.tok)}",
                                 self.tok.pos)
            self.advance()
            self.depth -= 1
            return node
        if tok.kind == "name" and self.tokens[self.i + 1].kind == ":":
            return self.tag(tok)
        if tok.kind == "name":
            self.advance()
            index = self.resolve(tok)
            if self.tok.kind != "cmp":
                return Attr(self.attributes[index], index)
            op = self.advance().text
            value = self.number(self.tok, f"{self.attributes[index]} {op}")
            self.advance()
            return Compare(self.attributes[index], index, op, value)
        if tok.kind == "number":
            self.advance()
            if self.tok.kind != "cmp":
                raise self.error(f"expected an attribute name but found the number {tok.text!r}",
                                 tok.pos)
            value = self.number(tok, "")
            op = self.advance().text
            name_tok = self.tok
            if name_tok.kind != "name":
                raise self.error(f"expected an attribute name after '{tok.text} {op}' but found "
                                 f"{self.describe(name_tok)}", name_tok.pos)
            self.advance()
            index = self.resolve(name_tok)
            return Compare(self.attributes[index], index, _FLIP[op], value)
        if tok.kind == "string":
            raise self.error(f"attribute names take no quotes: write {tok.text[1:-1] or 'a name'} (quotes are "
                             "for values with spaces, e.g. person:\"Ada Lovelace\")", tok.pos)
        if tok.kind == ")":
            raise self.error("unexpected ')': expected an attribute name, 'not' or '('", tok.pos)
        raise self.error(f"expected an attribute name, 'not' or '(' but found {self.describe(tok)}",
                         tok.pos)

    def tag(self, tok: _Token) -> Tag:
        """``PREFIX ':' VALUE``, resolved by the index's resolver for that prefix."""
        prefix = tok.text.lower()
        if prefix not in PREFIXES:
            close = difflib.get_close_matches(prefix, PREFIXES, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}:? " if close else ""
            raise self.error(f"unknown prefix {tok.text}: {hint}use label:NAME, split:train|val|test "
                             "or person:ID", tok.pos)
        self.advance()
        self.advance()  # ':'
        value = self.tok
        if value.kind not in ("name", "number", "string") or (value.kind == "string" and len(value.text) == 2):
            raise self.error(f"expected a value after '{prefix}:' but found {self.describe(value)}, "
                             f"e.g. {_EXAMPLES[prefix]}", value.pos)
        self.advance()
        if self.tok.kind == "cmp":
            raise self.error(f"{prefix}: literals are true or false and take no comparison; "
                             f"e.g. {_EXAMPLES[prefix]} or not {_EXAMPLES[prefix]}", self.tok.pos)
        resolver = self.tags.get(prefix, f"this index has nothing for {prefix}: literals")
        if isinstance(resolver, str):
            raise self.error(resolver, tok.pos)
        text = value.text[1:-1] if value.kind == "string" else value.text
        try:
            canonical, key = resolver(text)
        except LookupError as err:
            raise self.error(str(err.args[0]) if err.args else f"unknown {prefix} {text!r}", value.pos) from None
        return Tag(prefix, canonical, int(key))

    def number(self, tok: _Token, context: str) -> float:
        """Read ``tok`` as a probability in [0, 1]; the caller advances past it."""
        if tok.kind != "number":
            raise self.error(f"expected a number in [0, 1] after '{context}' but found "
                             f"{self.describe(tok)}, e.g. Smiling > 0.9", tok.pos)
        value = float(tok.text)
        if not 0.0 <= value <= 1.0:
            raise self.error(f"{tok.text} is not a probability: use a number in [0, 1]", tok.pos)
        return value

    def resolve(self, tok: _Token) -> int:
        """The row of attribute ``tok`` (case-insensitive), or an error with a did-you-mean."""
        index = self.lookup.get(tok.text.lower())
        if index is not None:
            return index
        raise self.error(f"unknown attribute {tok.text!r}{self._suggest(tok)}", tok.pos)

    def _suggest(self, tok: _Token) -> str:
        nxt = self.tokens[self.i] if self.i < len(self.tokens) else None
        if nxt is not None and nxt.kind == "name":  # 'Big Nose' -> Big_Nose
            joined = self.lookup.get(f"{tok.text}_{nxt.text}".lower())
            if joined is not None:
                return f"; did you mean {self.attributes[joined]}? (names use '_' for spaces)"
        return did_you_mean(tok.text, self.attributes, "attributes")


_EXAMPLES = {"label": "label:Eyeglasses", "split": "split:val", "person": "person:3"}


def did_you_mean(text: str, names: Sequence[str], what: str) -> str:
    """``"; did you mean A or B?"`` for the names close to ``text`` (case-insensitive), else
    ``"; known <what>: ..."`` listing them (the first 40)."""
    lookup = {n.lower(): n for n in names}
    close = difflib.get_close_matches(text.lower(), list(lookup), n=3, cutoff=0.6)
    if close:
        return "; did you mean " + " or ".join(lookup[c] for c in close) + "?"
    shown = list(names)[:40]
    more = f", ... ({len(names) - 40} more)" if len(names) > 40 else ""
    return f"; known {what}: " + ", ".join(shown) + more


def name_resolver(names: Sequence[str], what: str) -> Resolver:
    """A resolver for a prefix whose values are ``names`` (case-insensitive): the key is the
    name's position; an unknown name raises LookupError with a did-you-mean."""
    lookup = {n.lower(): i for i, n in enumerate(names)}

    def resolve(text: str) -> tuple[str, int]:
        i = lookup.get(text.lower())
        if i is None:
            raise LookupError(f"unknown {what} {text!r}{did_you_mean(text, names, what + 's')}")
        return names[i], i

    return resolve


# ---------------------------------------------------------------------------------------------
# Folding the tree: masks, scores, literals

T = TypeVar("T")


def fold(node: Node, leaf: Callable[[Literal], T], negate: Callable[[T], T],
         conj: Callable[[list[T]], T], disj: Callable[[list[T]], T]) -> T:
    """Reduce the tree bottom-up: ``leaf`` for literals, then not/and/or combinators."""
    if isinstance(node, (Attr, Compare, Tag)):
        return leaf(node)
    if isinstance(node, Not):
        return negate(fold(node.child, leaf, negate, conj, disj))
    parts = [fold(c, leaf, negate, conj, disj) for c in node.children]
    return conj(parts) if isinstance(node, And) else disj(parts)


_COMPARE = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal}


def literal_mask(lit: Attr | Compare, rows: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Boolean (N,) truth of one prediction literal over ``rows`` (K, N); thresholds apply to bare names."""
    row = rows[lit.index]
    if isinstance(lit, Attr):
        return row >= np.float32(thresholds[lit.index])
    return _COMPARE[lit.op](row, np.float32(lit.value))


def _all(parts: list[np.ndarray]) -> np.ndarray:
    out = parts[0].copy()
    for p in parts[1:]:
        np.logical_and(out, p, out=out)
    return out


def _any(parts: list[np.ndarray]) -> np.ndarray:
    out = parts[0].copy()
    for p in parts[1:]:
        np.logical_or(out, p, out=out)
    return out


def evaluate(node: Node, probs: np.ndarray, thresholds: np.ndarray,
             tag_mask: Callable[[Tag], np.ndarray] | None = None) -> np.ndarray:
    """The (N,) boolean mask of ``node`` over a column-major (K, N) probability matrix, prefixed
    literals answered by ``tag_mask`` (the engine's, which knows the index's labels and persons).

    Works on any (K, N) matrix whose rows compare with floats: ground-truth 0/1 labels with
    thresholds 0.5 give the expression's truth under the labels.
    """
    def leaf(lit: Literal) -> np.ndarray:
        if isinstance(lit, Tag):
            if tag_mask is None:
                raise ValueError(f"{lit} needs the index's recorded facts to evaluate")
            return tag_mask(lit)
        return literal_mask(lit, probs, thresholds)

    return fold(node, leaf, np.logical_not, _all, _any)


def literals(node: Node) -> list[tuple[Literal, bool]]:
    """The distinct literals of ``node`` in reading order, with their polarity.

    Polarity is False for a literal under an odd number of 'not's (``not Male`` -> (Male, False)):
    an image supports the expression through that literal when it is *false*.
    """
    out: dict[tuple[Literal, bool], None] = {}

    def walk(n: Node, positive: bool) -> None:
        if isinstance(n, (Attr, Compare, Tag)):
            out.setdefault((n, positive), None)
        elif isinstance(n, Not):
            walk(n.child, not positive)
        else:
            for c in n.children:
                walk(c, positive)

    walk(node, True)
    return list(out)


def reindex(node: Node, attributes: Sequence[str]) -> Node:
    """``node`` with every prediction literal pointed at its row in another attribute list (matched
    by name, case-insensitively), e.g. ground-truth labels stored in a different order; prefixed
    literals stay as they are. No re-parsing: a name missing from ``attributes`` is a
    QuerySyntaxError naming it."""
    lookup = {name.lower(): i for i, name in enumerate(attributes)}

    def leaf(lit: Literal) -> Node:
        if isinstance(lit, Tag):
            return lit
        index = lookup.get(lit.name.lower())
        if index is None:
            raise QuerySyntaxError(f"{lit.name} is not among {', '.join(attributes)}", str(node), None)
        if isinstance(lit, Attr):
            return Attr(attributes[index], index)
        return Compare(attributes[index], index, lit.op, lit.value)

    return fold(node, leaf, Not, lambda parts: And(tuple(parts)), lambda parts: Or(tuple(parts)))


def literal_text(lit: Literal, positive: bool) -> str:
    """How a literal reads in results: ``Eyeglasses``, ``not Male``, ``Smiling > 0.9``,
    ``label:Male``. A negated comparison reads as the comparison it means (``not Young <= 0.2``
    is ``Young > 0.2``)."""
    if positive:
        return str(lit)
    if isinstance(lit, Compare):
        return f"{lit.name} {_NEGATE[lit.op]} {lit.value!r}"
    return f"not {lit}"


_NEGATE = {">": "<=", ">=": "<", "<": ">=", "<=": ">"}

