"""Row filters over dataset columns: a small expression language (parsed in ``filter_syntax``, never
``eval``), typed and evaluated with pyarrow compute over whole columns.

    f = parse_filter("aesthetic >= 6 and punsafe < 0.1")
    f.check(table.schema, "samples.parquet")     # ValueError naming a missing column and the ones that exist
    mask = f.mask(table)                          # (N,) bool numpy array, one entry per row

Where filters apply: ``pixeldit-data ingest --filter`` (before download, on the URL list's metadata columns),
``pixeldit-data shard --filter`` (on the metadata columns carried by the ingest folders) and per training stage
(``stages.N.filter`` of the run config: ``stage_mask`` over the rows of samples.parquet, so a stage trains on a
subset of the same shards without re-sharding).

Grammar: ``data_pipeline.filter_syntax`` (keywords in any case; a column name that is not a plain identifier,
or is a keyword, goes in backticks).

Examples: ``aesthetic >= 6``, ``pwatermark < 0.5 or pwatermark is null``, ``LICENSE in ("cc0", "cc-by")``,
``width * height >= 512 * 512 and not nsfw``, ```clip score` > 0.3``. Types: numbers compare with numbers,
strings with strings (``==``, ``!=``, order by code point), booleans with booleans; ``/`` is true division.
Nulls: any comparison with a null value is null, ``and`` / ``or`` follow three-valued logic, and a row whose
result is null is left out (``x is null`` selects them explicitly).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pixeldit.errors import ConfigError, DataError

from .filter_syntax import Column, InList, IsNull, Literal, Node, Unary, parse_tree

COMPARISONS = {"==": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater,
               ">=": pc.greater_equal}
ARITHMETIC = {"+": pc.add, "-": pc.subtract, "*": pc.multiply, "/": pc.divide}

Kind = str  # "number" | "string" | "bool"


# ---- types --------------------------------------------------------------------------------------------------


def arrow_kind(arrow_type: pa.DataType) -> Kind | None:
    """The filter type of a column: "number", "string", "bool", or None (not usable in a filter)."""
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return "number"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    if pa.types.is_null(arrow_type):
        return "null"
    return None


def _literal_kind(value: Any) -> Kind:
    return "bool" if isinstance(value, bool) else "string" if isinstance(value, str) else "number"


@dataclass(frozen=True)
class RowFilter:
    """A parsed filter expression; ``columns`` are the names it reads."""

    expression: str
    tree: Node

    @property
    def columns(self) -> list[str]:
        found: list[str] = []

        def walk(n: Node) -> None:
            if isinstance(n, Column) and n.name not in found:
                found.append(n.name)
            for child in (getattr(n, a) for a in ("operand", "left", "right") if hasattr(n, a)):
                walk(child)

        walk(self.tree)
        return found

    def check(self, schema: pa.Schema, where: str) -> None:
        """Raise ValueError (one line) unless every column exists in ``schema`` with a usable type and the
        operand types fit. ``where`` names the table (e.g. ``s3://b/data/samples.parquet``)."""
        missing = [c for c in self.columns if c not in schema.names]
        if missing:
            raise ValueError(f"filter {self.expression!r}: no column {missing[0]!r} in {where}; its columns: "
                             f"{', '.join(schema.names)}")
        kinds = {name: arrow_kind(schema.field(name).type) for name in self.columns}
        for name, kind in kinds.items():
            if kind is None:
                raise ValueError(f"filter {self.expression!r}: column {name!r} of {where} has type "
                                 f"{schema.field(name).type}; filters read numbers, strings and booleans")
        if self._kind(self.tree, kinds) not in ("bool", "null"):
            raise ValueError(f"filter {self.expression!r}: the expression is not a condition (it gives a "
                             f"{self._kind(self.tree, kinds)}); compare it, e.g. {self.expression} > 0")

    def _kind(self, n: Node, kinds: dict[str, Kind]) -> Kind:
        def fit(op: str, a: Kind, b: Kind, want: tuple[Kind, ...]) -> None:
            if "null" in (a, b):
                return
            if a != b or a not in want:
                raise ValueError(f"filter {self.expression!r}: cannot apply {op!r} to a {a} and a {b}")

        if isinstance(n, Column):
            return kinds[n.name]
        if isinstance(n, Literal):
            return _literal_kind(n.value)
        if isinstance(n, Unary):
            inner = self._kind(n.operand, kinds)
            fit(n.op, inner, inner, ("bool",) if n.op == "not" else ("number",))
            return "bool" if n.op == "not" else "number"
        if isinstance(n, IsNull):
            self._kind(n.operand, kinds)
            return "bool"
        if isinstance(n, InList):
            inner = self._kind(n.operand, kinds)
            for v in n.values:
                fit("in", inner, _literal_kind(v), ("number", "string", "bool"))
            return "bool"
        left, right = self._kind(n.left, kinds), self._kind(n.right, kinds)
        if n.op in ARITHMETIC:
            fit(n.op, left, right, ("number",))
            return "number"
        if n.op in ("and", "or"):
            fit(n.op, left, right, ("bool",))
            return "bool"
        fit(n.op, left, right, ("number", "string", "bool") if n.op in ("==", "!=") else ("number", "string"))
        return "bool"

    def mask(self, table: pa.Table) -> np.ndarray:
        """(num_rows,) bool: rows where the expression is true (null counts as false). Call ``check`` first for
        error messages that name the table."""
        self.check(table.schema, "the table")
        result = _evaluate(self.tree, table)
        if isinstance(result, pa.Scalar):
            return np.full(table.num_rows, bool(result.as_py()), dtype=bool)
        return np.asarray(pc.fill_null(result, False).to_numpy(zero_copy_only=False), dtype=bool)


def _evaluate(n: Node, table: pa.Table) -> Any:
    """An Arrow array (or scalar, for constant sub-expressions) of the node's values over ``table``'s rows."""
    if isinstance(n, Column):
        return table.column(n.name).combine_chunks()
    if isinstance(n, Literal):
        return pa.scalar(n.value)
    if isinstance(n, Unary):
        inner = _evaluate(n.operand, table)
        return pc.invert(inner) if n.op == "not" else pc.negate(inner)
    if isinstance(n, IsNull):
        inner = _evaluate(n.operand, table)
        return pc.is_valid(inner) if n.negated else pc.is_null(inner)
    if isinstance(n, InList):
        inner = _evaluate(n.operand, table)
        if isinstance(inner, pa.Scalar):
            inner = pa.array([inner.as_py()] * table.num_rows, inner.type)
        found = pc.is_in(inner, value_set=pa.array(list(n.values)))
        found = pc.if_else(pc.is_null(inner), pa.scalar(None, pa.bool_()), found)  # null in (...) is null
        return pc.invert(found) if n.negated else found
    left, right = _evaluate(n.left, table), _evaluate(n.right, table)
    if n.op == "and":
        return pc.and_kleene(left, right)
    if n.op == "or":
        return pc.or_kleene(left, right)
    if n.op == "/":
        return pc.divide(pc.cast(left, pa.float64()), pc.cast(right, pa.float64()))
    if n.op in ARITHMETIC:
        return ARITHMETIC[n.op](left, right)
    return COMPARISONS[n.op](left, right)


def parse_filter(expression: str) -> RowFilter:
    """Parse ``expression`` (grammar: ``filter_syntax``); ``FilterSyntaxError`` names the position at fault."""
    return RowFilter(expression, parse_tree(expression))


# ---- per training stage: rows of a committed root ---------------------------------------------------------------


def check_stage_filter(root: str, expression: str, where: str = "",
                       storage_options: dict[str, Any] | None = None) -> RowFilter:
    """Parse ``expression`` and check it against the columns of ``{root}/samples.parquet`` (its footer only):
    a missing column is a one-line ConfigError (a ValueError) naming it and the columns that exist. ``where``
    prefixes the message (e.g. the run-config key ``stages.2 (s1024).filter``)."""
    from .dataset_format import SAMPLES, read_samples_schema

    try:
        row_filter = parse_filter(expression)
        row_filter.check(read_samples_schema(root, storage_options), f"{root.rstrip('/')}/{SAMPLES}")
    except ValueError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    return row_filter


def stage_mask(root: str, expression: str, storage_options: dict[str, Any] | None = None, *,
               keys: pa.Array | pa.ChunkedArray | None = None, where: str = "") -> np.ndarray:
    """The stage-time row filter: (N,) bool over the rows of ``read_sample_index(root)`` (committed shards,
    samples.parquet order), True where ``expression`` holds. Reads only the key and the columns the expression
    names. ``keys``: the caller's index keys (e.g. ``SampleIndex.keys``); the mask is checked to line up with
    them row for row. ``where`` prefixes errors (the run-config key). This is the one function a training
    loader calls to select a stage's rows of the same shards (``stages.N.filter``), without re-sharding."""
    from .dataset_format import SAMPLE_COLUMNS, SAMPLES, read_committed_columns

    row_filter = check_stage_filter(root, expression, where, storage_options)
    table = read_committed_columns(root, list(dict.fromkeys([SAMPLE_COLUMNS.key, *row_filter.columns])),
                                   storage_options)
    mine = table.column(SAMPLE_COLUMNS.key)
    if keys is not None and (len(keys) != len(mine) or not mine.equals(
            pa.chunked_array([keys]) if isinstance(keys, pa.Array) else keys)):
        raise DataError(f"{root.rstrip('/')}/{SAMPLES} changed while the stage's rows were selected "
                        f"({len(keys)} rows in the index, {table.num_rows} now); restart once the root is committed")
    return row_filter.mask(table)
