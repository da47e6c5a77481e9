"""JSON Schema keywords a request field's value must meet beyond its type, written into the shapes' TypedDicts
as Annotated metadata (`Annotated[list[Message], NON_EMPTY]`) and into /openapi.json by api/openapi.py. They say
what the adapters' checks already hold a field to; they check nothing themselves.

Hashable (a frozen dataclass over pairs), as typing needs Annotated metadata to be inside a Union."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Keywords:
    pairs: tuple[tuple[str, Any], ...]

    def schema(self) -> dict[str, Any]:
        return dict(self.pairs)


def keywords(**values: Any) -> Keywords:
    return Keywords(tuple(values.items()))


NON_EMPTY = keywords(minItems=1)  # a list with at least one item
NON_NEGATIVE = keywords(minimum=0)
