"""The filter expression language's syntax: tokens, the syntax tree and a recursive-descent parser (never
``eval``). Types and evaluation over Arrow columns: ``data_pipeline.filters``.

Grammar (keywords in any case; a column name that is not a plain identifier, or is a keyword, goes in
backticks)::

    expr    := and_expr ("or" and_expr)*
    and_expr:= not_expr ("and" not_expr)*
    not_expr:= "not" not_expr | test
    test    := sum [CMP sum | "is" ["not"] "null" | ["not"] "in" "(" literal ("," literal)* ")"]
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/") unary)*
    unary   := "-" unary | atom
    atom    := NUMBER | STRING | "true" | "false" | NAME | `any name` | "(" expr ")"
    CMP     := "==" | "!=" | "<" | "<=" | ">" | ">="
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Union

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<quoted>`[^`]+`)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|<|>|\+|-|\*|/|\(|\)|,)
""", re.VERBOSE)
KEYWORDS = frozenset({"and", "or", "not", "is", "null", "in", "true", "false"})
COMPARISON_OPS = frozenset({"==", "!=", "<", "<=", ">", ">="})


# ---- syntax tree --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str


@dataclass(frozen=True)
class Literal:
    value: Any  # int | float | str | bool


@dataclass(frozen=True)
class Unary:
    op: str  # "-" or "not"
    operand: "Node"


@dataclass(frozen=True)
class Binary:
    op: str  # arithmetic, comparison, "and", "or"
    left: "Node"
    right: "Node"


@dataclass(frozen=True)
class IsNull:
    operand: "Node"
    negated: bool


@dataclass(frozen=True)
class InList:
    operand: "Node"
    values: tuple[Any, ...]
    negated: bool


Node = Union[Column, Literal, Unary, Binary, IsNull, InList]


class FilterSyntaxError(ValueError):
    """A filter expression that does not parse; the message names the expression and the position."""


@dataclass(frozen=True)
class _Token:
    kind: str  # number | string | name | op | kw | end
    text: str
    pos: int  # 0-based character offset


def _tokenize(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise FilterSyntaxError(f"filter {text!r}: unexpected {text[pos]!r} at character {pos + 1}")
        kind = m.lastgroup
        if kind == "name" and m.group().lower() in KEYWORDS:
            tokens.append(_Token("kw", m.group().lower(), pos))
        elif kind == "quoted":
            tokens.append(_Token("name", m.group()[1:-1], pos))
        elif kind != "ws":
            tokens.append(_Token(kind, m.group(), pos))
        pos = m.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    """Recursive descent over the grammar in the module docstring."""

    def __init__(self, text: str):
        self.text, self.tokens, self.i = text, _tokenize(text), 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def accept(self, kind: str, text: str) -> bool:
        tok = self.peek()
        if tok.kind == kind and tok.text == text:
            self.i += 1
            return True
        return False

    def fail(self, expected: str) -> FilterSyntaxError:
        tok = self.peek()
        found = "the end" if tok.kind == "end" else repr(tok.text)
        return FilterSyntaxError(f"filter {self.text!r}: expected {expected} at character {tok.pos + 1}, "
                                 f"found {found}")

    def expect(self, kind: str, text: str) -> None:
        if not self.accept(kind, text):
            raise self.fail(repr(text))

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise FilterSyntaxError(f"filter {self.text!r} is empty")
        node = self.or_expr()
        if self.peek().kind != "end":
            raise self.fail("an operator ('and', 'or', a comparison) or the end")
        return node

    def or_expr(self) -> Node:
        node = self.and_expr()
        while self.accept("kw", "or"):
            node = Binary("or", node, self.and_expr())
        return node

    def and_expr(self) -> Node:
        node = self.not_expr()
        while self.accept("kw", "and"):
            node = Binary("and", node, self.not_expr())
        return node

    def not_expr(self) -> Node:
        if self.accept("kw", "not"):
            return Unary("not", self.not_expr())
        return self.test()

    def test(self) -> Node:
        node = self.sum()
        tok = self.peek()
        if tok.kind == "op" and tok.text in COMPARISON_OPS:
            self.take()
            return Binary(tok.text, node, self.sum())
        if self.accept("kw", "is"):
            negated = self.accept("kw", "not")
            self.expect("kw", "null")
            return IsNull(node, negated)
        negated = False
        if tok.kind == "kw" and tok.text == "not" and self.tokens[self.i + 1].text == "in":
            self.take()
            negated = True
        if self.accept("kw", "in"):
            self.expect("op", "(")
            values = [self.literal()]
            while self.accept("op", ","):
                values.append(self.literal())
            self.expect("op", ")")
            return InList(node, tuple(values), negated)
        return node

    def sum(self) -> Node:
        node = self.product()
        while self.peek().kind == "op" and self.peek().text in "+-":
            node = Binary(self.take().text, node, self.product())
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.peek().kind == "op" and self.peek().text in "*/":
            node = Binary(self.take().text, node, self.unary())
        return node

    def unary(self) -> Node:
        if self.accept("op", "-"):
            return Unary("-", self.unary())
        return self.atom()

    def literal(self) -> Any:
        negative = self.accept("op", "-")
        node = self.atom()
        if not isinstance(node, Literal) or (negative and isinstance(node.value, (str, bool))):
            raise self.fail("a number or a quoted string")
        return -node.value if negative else node.value

    def atom(self) -> Node:
        tok = self.take()
        if tok.kind == "number":
            value = float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
            return Literal(value)
        if tok.kind == "string":
            return Literal(re.sub(r"\\(.)", r"\1", tok.text[1:-1]))  # \" \' \\ stand for themselves
        if tok.kind == "kw" and tok.text in ("true", "false"):
            return Literal(tok.text == "true")
        if tok.kind == "name":
            return Column(tok.text)
        if tok.kind == "op" and tok.text == "(":
            node = self.or_expr()
            self.expect("op", ")")
            return node
        self.i -= 1
        raise self.fail("a column, a number, a string or '('")


def parse_tree(expression: str) -> Node:
    """The syntax tree of ``expression``; FilterSyntaxError names the position at fault."""
    return _Parser(expression).parse()
