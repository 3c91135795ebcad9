"""The query language: one IR (:mod:`broker.query.ir`) with a Python face (field references on
:class:`broker.GPUClient`) and a string face (:func:`parse` / :func:`to_text`).

See ``docs/query.md`` for the semantics.
"""

from __future__ import annotations

from broker.query.builder import F, FieldRef, QueryFields
from broker.query.evaluate import filter_offers, matches, run_query, sort_offers
from broker.query.fields import FIELDS, FieldSpec
from broker.query.ir import (
    And,
    Between,
    Cmp,
    Contains,
    Expr,
    Flag,
    In,
    Not,
    Or,
    Query,
    SortKey,
    to_text,
)
from broker.query.parser import parse, parse_expr
from broker.query.pushdown import Hints, hints


def as_query(q: str | Expr | Query | None) -> Query:
    """Accept a query string, an expression, or a Query; return a Query."""
    if q is None:
        return Query()
    if isinstance(q, Query):
        return q
    if isinstance(q, str):
        return parse(q)
    if isinstance(q, FieldRef):
        return Query(q.as_expr())
    return Query(q)


__all__ = [
    "FIELDS",
    "And",
    "Between",
    "Cmp",
    "Contains",
    "Expr",
    "F",
    "FieldRef",
    "FieldSpec",
    "Flag",
    "Hints",
    "In",
    "Not",
    "Or",
    "Query",
    "QueryFields",
    "SortKey",
    "as_query",
    "filter_offers",
    "hints",
    "matches",
    "parse",
    "parse_expr",
    "run_query",
    "sort_offers",
    "to_text",
]
