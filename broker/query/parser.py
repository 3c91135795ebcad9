"""The string face of the query language: ``parse(text) -> Query`` and ``to_text(Query)``.

Grammar (whitespace between conditions means *and*; ``and``/``&``, ``or``/``|``, ``not``/``!``
are also accepted; ``not`` binds tightest, then *and*, then *or*)::

    query     := expr? option*          options (sort=, limit=) may appear anywhere at top level
    expr      := and_expr (("or" | "|") and_expr)*
    and_expr  := unary (("and" | "&")? unary)*
    unary     := ("!" | "not") unary | "(" expr ")" | condition
    condition := FIELD OP VALUE | FIELD "=" VALUE ".." VALUE | FIELD ["not"] "in" "[" VALUE, ... "]"
               | BOOLFIELD
    OP        := = == != < <= > >= ~ !~
    option    := "sort=" ["-"]FIELD ("," ["-"]FIELD)* | "limit=" INT

Values take units where the field has them: sizes ``80GB 80GiB 1TB 512MB`` (stored in GB) and
prices ``6/h $6 $6/h`` (stored in US$/h).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from broker.errors import QueryError
from broker.query import ir
from broker.query.fields import LOOKUP, FieldSpec, Kind, Unit
from broker.query.ir import Expr, Flag, Query, SortKey, to_text

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op><=|>=|!=|==|!~|=|<|>|~)
  | (?P<punct>[()\[\],!|&])
  | (?P<word>[^\s()\[\],!|&<>=~"']+)
    """,
    re.VERBOSE,
)
_KEYWORDS = ir.KEYWORDS
# A sign and an exponent are accepted so that every number to_text prints (repr of a float, e.g.
# 1e-05 or -2.5) parses back to the very same value.
_NUMBER = re.compile(
    r"^(?P<sign>-)?(?P<dollar>\$)?(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
    r"(?P<unit>[A-Za-z$/]*)$"
)
_SIZE_UNITS = {
    "gb": 1.0,
    "g": 1.0,
    "gib": 1.073741824,
    "tb": 1000.0,
    "t": 1000.0,
    "tib": 1099.511627776,
    "mb": 0.001,
    "mib": 0.001048576,
}
_PRICE_UNITS = {"/h", "/hr", "$/h", "$/hr", "usd/h", "usd/hr", "$", "/hour", "$/hour"}
_ALL_UNITS = sorted(
    [*_SIZE_UNITS, *_PRICE_UNITS, "GB", "GiB", "TB", "MB", "MiB"], key=len, reverse=True
)


@dataclass(frozen=True)
class Token:
    """One lexical token with its 1-based column."""

    kind: str  # str | op | punct | word | eof
    text: str
    col: int

    @property
    def keyword(self) -> str | None:
        """The keyword this word is, if any (case-insensitive)."""
        low = self.text.lower()
        return low if self.kind == "word" and low in _KEYWORDS else None


def tokenize(text: str) -> list[Token]:
    """Split query text into tokens (QueryError on an unclosed quote)."""
    out: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:  # only an unbalanced quote can fail every alternative
            raise QueryError("unclosed quote", text=text, column=pos + 1)
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append(Token(kind, m.group(), pos + 1))
        pos = m.end()
    out.append(Token("eof", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = tokenize(text)
        self.i = 0
        self.sort: tuple[SortKey, ...] | None = None
        self.limit: int | None = None
        self.depth = 0

    # -- helpers -----------------------------------------------------------------------------
    def peek(self, k: int = 0) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> Token:
        t = self.peek()
        self.i += 1
        return t

    def err(self, msg: str, tok: Token, suggestion: str | None = None) -> QueryError:
        return QueryError(msg, text=self.text, column=tok.col, suggestion=suggestion)

    def expect(self, kind: str, text: str, what: str) -> Token:
        t = self.peek()
        if t.kind != kind or t.text != text:
            found = "end of query" if t.kind == "eof" else repr(t.text)
            raise self.err(f"expected {what}, found {found}", t)
        return self.next()

    # -- grammar -----------------------------------------------------------------------------
    def parse(self) -> Query:
        expr = None
        if self.peek().kind != "eof":
            expr = self.expr()
        t = self.peek()
        if t.kind != "eof":
            if t.text == ")":
                raise self.err("unbalanced ')'", t)
            raise self.err(f"unexpected {t.text!r}", t)
        try:
            return Query(expr, self.sort or (), self.limit)
        except QueryError as e:
            raise QueryError(e.detail, text=self.text) from None

    def expr(self) -> Expr | None:
        items = [self.and_expr()]
        while self.peek().keyword == "or" or self.peek().text == "|":
            op = self.next()
            nxt = self.peek()
            if nxt.kind == "eof" or nxt.text == ")" or nxt.keyword == "or" or nxt.text == "|":
                raise self.err("'or' needs a condition on both sides", op)
            items.append(self.and_expr())
        present = [i for i in items if i is not None]
        if len(items) > 1 and len(present) != len(items):
            raise self.err("an 'or' branch holds only sort=/limit= options", self.peek())
        if not present:
            return None
        return ir.or_(*present)

    def _ends_and(self, t: Token) -> bool:
        return t.kind == "eof" or t.text in (")", "|") or t.keyword == "or"

    def and_expr(self) -> Expr | None:
        items: list[Expr] = []
        while not self._ends_and(self.peek()):
            t = self.peek()
            if t.keyword == "and" or t.text == "&":
                self.next()
                if self._ends_and(self.peek()) or self.peek().text == "&":
                    raise self.err("'and' needs a condition on both sides", t)
                if not items:
                    raise self.err("'and' needs a condition on both sides", t)
                continue
            if self._is_option(t):
                self.option()
                continue
            items.append(self.unary())
        if not items:
            return None
        return ir.and_(*items)

    def _is_option(self, t: Token) -> bool:
        nxt = self.peek(1)
        return (
            t.kind == "word"
            and t.text.lower() in ("sort", "limit", "order", "order_by", "sort_by")
            and nxt.kind == "op"
            and nxt.text in ("=", "==")
        )

    def option(self) -> None:
        name_tok = self.next()
        self.next()  # '='
        if self.depth > 0:
            raise self.err(f"{name_tok.text}= must be at the top level, not inside ( )", name_tok)
        name = name_tok.text.lower()
        if name == "limit":
            v = self.next()
            if v.kind != "word" or not v.text.isdigit() or int(v.text) < 1:
                raise self.err(f"limit needs a positive whole number, got {v.text!r}", v)
            if self.limit is not None:
                raise self.err("limit= given twice", name_tok)
            self.limit = int(v.text)
            return
        if self.sort is not None:
            raise self.err("sort= given twice", name_tok)
        keys: list[SortKey] = []
        while True:
            v = self.next()
            if v.kind != "word":
                raise self.err("sort= needs field names like sort=price,-vram", v)
            try:
                keys.append(ir.sort_key(v.text))
            except QueryError as e:
                col = v.col + (1 if v.text[:1] in "+-" else 0)
                raise self.err(
                    f"unknown sort field {v.text.lstrip('+-')!r}", self.tok_at(col), e.suggestion
                ) from None
            if self.peek().text == "," and self.peek().kind == "punct":
                self.next()
                continue
            break
        self.sort = tuple(keys)

    def tok_at(self, col: int) -> Token:
        return Token("word", "", col)

    def unary(self) -> Expr:
        t = self.peek()
        if (t.kind == "punct" and t.text == "!") or t.keyword == "not":
            self.next()
            if self._ends_and(self.peek()):
                raise self.err("'not' needs a condition after it", t)
            return ir.not_(self.unary())
        if t.kind == "punct" and t.text == "(":
            self.next()
            self.depth += 1
            if self.peek().text == ")":
                raise self.err("empty parentheses", self.peek())
            inner = self.expr()
            self.depth -= 1
            close = self.peek()
            if close.text != ")":
                found = "end of query" if close.kind == "eof" else repr(close.text)
                raise self.err(
                    f"missing ')' to close the '(' at column {t.col}; found {found}", close
                )
            self.next()
            if inner is None:
                raise self.err("empty parentheses", t)
            return inner
        return self.condition()

    def field(self, tok: Token) -> FieldSpec:
        if tok.kind != "word" or tok.keyword:
            found = "end of query" if tok.kind == "eof" else repr(tok.text)
            raise self.err(f"expected a field name, found {found}", tok)
        spec = LOOKUP.get(tok.text.lower())
        if spec is None:
            raise self.err(f"unknown field {tok.text!r}", tok, ir.closest_field(tok.text))
        return spec

    def condition(self) -> Expr:
        ftok = self.next()
        spec = self.field(ftok)
        t = self.peek()
        negate_in = False
        if t.keyword == "not" and self.peek(1).keyword == "in":
            self.next()
            negate_in = True
            t = self.peek()
        if t.keyword == "in":
            self.next()
            values = self.value_list(spec)
            try:
                e = ir.isin(spec, values)
            except QueryError as err:
                raise self.err(err.detail, t, err.suggestion) from None
            return ir.not_(e) if negate_in else e
        if t.kind != "op":
            if spec.kind is Kind.BOOL:
                return Flag(spec.name)
            found = "end of query" if t.kind == "eof" else repr(t.text)
            raise self.err(
                f"{spec.short} needs an operator (= != < <= > >= ~ in) and a value; found {found}",
                t,
            )
        op_tok = self.next()
        vtok = self.next()
        if vtok.kind not in ("word", "str") or vtok.keyword in ("and", "or"):
            found = "end of query" if vtok.kind == "eof" else repr(vtok.text)
            raise self.err(f"{spec.short}{op_tok.text} needs a value, found {found}", vtok)
        op = op_tok.text
        try:
            if op in ("~", "!~"):
                e = ir.contains(spec, self.raw_text(vtok))
                return ir.not_(e) if op == "!~" else e
            if vtok.kind == "word" and ".." in vtok.text:
                if op not in ("=", "=="):
                    raise self.err(f"a range lo..hi needs '=', not {op!r}", op_tok)
                lo_s, _, hi_s = vtok.text.partition("..")
                if not lo_s or not hi_s:
                    raise self.err(f"incomplete range {vtok.text!r}; write lo..hi", vtok)
                lo = self.value(spec, lo_s, vtok)
                hi = self.value(spec, hi_s, vtok, offset=len(lo_s) + 2)
                return ir.between(spec, lo, hi)
            value = (
                self.value(spec, self.raw_text(vtok), vtok)
                if vtok.kind == "word"
                else (self.raw_text(vtok))
            )
            norm_op: ir.Op = "==" if op == "=" else op  # type: ignore[assignment]
            return ir.cmp(spec, norm_op, value)
        except QueryError as err:
            if err.column is not None:
                raise
            raise self.err(err.detail, vtok, err.suggestion) from None

    def raw_text(self, tok: Token) -> str:
        if tok.kind == "str":
            body = tok.text[1:-1]
            return re.sub(r"\\(.)", r"\1", body)
        return tok.text

    def value_list(self, spec: FieldSpec) -> list[object]:
        open_tok = self.peek()
        if open_tok.text != "[":
            raise self.err(f"{spec.short} in needs a list like [A100, H100]", open_tok)
        self.next()
        vals: list[object] = []
        while True:
            t = self.next()
            if t.text == "]" and t.kind == "punct":
                if vals:
                    raise self.err("trailing ',' in list", t)
                raise self.err(f"{spec.short} in [] is empty; give at least one value", t)
            if t.kind not in ("word", "str"):
                found = "end of query" if t.kind == "eof" else repr(t.text)
                raise self.err(
                    f"missing ']' to close the list at column {open_tok.col}; found {found}", t
                )
            vals.append(
                self.value(spec, self.raw_text(t), t) if t.kind == "word" else self.raw_text(t)
            )
            sep = self.next()
            if sep.text == "]" and sep.kind == "punct":
                return vals
            if sep.text != "," or sep.kind != "punct":
                found = "end of query" if sep.kind == "eof" else repr(sep.text)
                raise self.err(
                    f"missing ']' to close the list at column {open_tok.col}; found {found}", sep
                )

    def value(self, spec: FieldSpec, text: str, tok: Token, offset: int = 0) -> object:
        """Interpret a bare word for ``spec``: numbers with units, booleans, or text."""
        if spec.kind in (Kind.INT, Kind.FLOAT):
            m = _NUMBER.match(text)
            if not m:
                raise QueryError(
                    f"{spec.short} needs a number{_unit_hint(spec)}, got {text!r}",
                    text=self.text,
                    column=tok.col + offset,
                )
            digits = m.group("num")
            sign = -1 if m.group("sign") else 1
            unit = m.group("unit")
            if m.group("dollar"):
                unit = "$" + unit if unit else "$"
            unit_col = tok.col + offset + len(m.group(0)) - len(m.group("unit"))
            factor = _unit_factor(spec, unit, self.text, unit_col)
            if spec.kind is Kind.INT and digits.isdigit() and factor == 1.0:
                return sign * int(digits)  # exact, however large (float() would round 10**30)
            num = sign * float(digits)
            # Without a conversion the float is kept exactly as written (parse(to_text(q)) == q);
            # a converted size is rounded so that 1TiB reads 1099.511627776, not ...7760001.
            value = num if factor == 1.0 else round(num * factor, 9)
            if spec.kind is Kind.INT:
                if not value.is_integer():
                    raise QueryError(
                        f"{spec.short} needs a whole number, got {text!r}",
                        text=self.text,
                        column=tok.col + offset,
                    )
                return int(value)
            return value
        return text


def _unit_hint(spec: FieldSpec) -> str:
    if spec.unit is Unit.SIZE_GB:
        return " with an optional size unit (80GB, 80GiB, 1TB)"
    if spec.unit is Unit.PRICE_PER_HOUR:
        return " with an optional price unit (6/h, $6/h)"
    return ""


def _unit_factor(spec: FieldSpec, unit: str, text: str, col: int) -> float:
    if not unit:
        return 1.0
    low = unit.lower()
    if spec.unit is Unit.SIZE_GB and low in _SIZE_UNITS:
        return _SIZE_UNITS[low]
    if spec.unit is Unit.PRICE_PER_HOUR and low in _PRICE_UNITS:
        return 1.0
    known = low in _SIZE_UNITS or low in _PRICE_UNITS
    if known or spec.unit is Unit.NONE:
        if spec.unit is Unit.SIZE_GB:
            right = "a size unit such as GB, GiB or TB"
        elif spec.unit is Unit.PRICE_PER_HOUR:
            right = "a price unit such as /h or $/h"
        else:
            right = "a plain number"
        raise QueryError(
            f"unit {unit!r} does not apply to {spec.short} (use {right})", text=text, column=col
        )
    close = difflib.get_close_matches(unit, _ALL_UNITS, n=1, cutoff=0.5)
    raise QueryError(
        f"unknown unit {unit!r} for {spec.short}",
        text=text,
        column=col,
        suggestion=close[0] if close else None,
    )


def parse(text: str) -> Query:
    """Parse the string form into a :class:`Query` (QueryError with a column on bad input)."""
    return _Parser(text).parse()


def parse_expr(text: str) -> Expr | None:
    """Parse a filter with no sort/limit options."""
    q = parse(text)
    if q.sort or q.limit is not None:
        raise QueryError("sort= and limit= are not allowed here", text=text)
    return q.where


__all__ = ["Token", "parse", "parse_expr", "to_text", "tokenize"]
