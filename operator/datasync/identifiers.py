"""SQL identifiers: parsing user input and quoting for PostgreSQL and DuckDB.

Table names arrive SQL-style on the command line (``'"Sales Dept"."Order Items"'``)
and must reach both databases unchanged.  Every identifier we put into SQL goes
through :func:`quote`; nothing is pasted.
"""

from __future__ import annotations

import dataclasses

from datasync import errors

# the schema DataSync keeps its own state in, within a target (no source schema may take it)
META_SCHEMA = "_datasync"


def quote(name: str) -> str:
    """Quote an identifier for PostgreSQL and DuckDB (same rules)."""
    return '"' + name.replace('"', '""') + '"'


def split_qualified(text: str) -> list[str]:
    """Split ``a."b.c".d`` into parts; unquoted parts fold to lower case like SQL."""
    parts: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':
            j, buf = i + 1, []
            while True:
                if j >= n:
                    raise errors.DataSyncError(
                        f"unterminated quoted identifier in {text!r}",
                        'close the double quote, e.g. \'"Sales Dept"."Order Items"\'',
                    )
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            parts.append("".join(buf))
            i = j + 1
        else:
            j = i
            while j < n and text[j] != ".":
                j += 1
            word = text[i:j].strip()
            if not word:
                raise errors.DataSyncError(f"empty name part in {text!r}", "use SCHEMA.TABLE")
            if '"' in word:
                raise errors.DataSyncError(
                    f"stray double quote in table name {text!r}", 'quote whole names: \'"My Schema"."My Table"\''
                )
            parts.append(word.lower())
            i = j
        if i < n:
            if text[i] != ".":
                raise errors.DataSyncError(
                    f"unexpected {text[i]!r} in table name {text!r}",
                    'quote names with spaces or capitals: \'"My Schema"."My Table"\'',
                )
            i += 1
            if i >= n:
                raise errors.DataSyncError(f"table name {text!r} ends with '.'", "use SCHEMA.TABLE")
    return parts


@dataclasses.dataclass(frozen=True, order=True)
class TableName:
    schema: str
    name: str

    @classmethod
    def parse(cls, text: str, default_schema: str = "public") -> TableName:
        parts = split_qualified(text.strip())
        if len(parts) == 1:
            return cls(default_schema, parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        raise errors.DataSyncError(
            f"table name {text!r} has {len(parts)} parts", "use SCHEMA.TABLE or TABLE"
        )

    @property
    def sql(self) -> str:
        return f"{quote(self.schema)}.{quote(self.name)}"

    def __str__(self) -> str:
        def show(p: str) -> str:
            plain = p.isidentifier() and p == p.lower()
            return p if plain else quote(p)

        return f"{show(self.schema)}.{show(self.name)}"
