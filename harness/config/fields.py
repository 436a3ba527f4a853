"""The value types every config section is built from (pydantic v2), so that each rule is written once.

Numbers must be finite (``allow_inf_nan=False``) and are never booleans (YAML reads ``yes`` as true); a number
written as text (``1.2e7``: YAML 1.1 reads an exponent without a sign as a string) is read as a number; flags
are true/false only; unknown keys are refused.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict

# Every section: unknown keys refused, inf / nan refused, values checked again when replaced.
SECTION = ConfigDict(extra="forbid", allow_inf_nan=False)


def _number(value: Any) -> Any:
    """Booleans are not numbers; text holding a number is that number (integral floats stay for ``int``)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value  # left to the type's own message
        if math.isfinite(number) and number.is_integer() and "." not in value and "e" not in value.lower():
            return int(value)
        return number
    return value


Int = Annotated[int, BeforeValidator(_number)]
Float = Annotated[float, BeforeValidator(_number)]
PositiveInt = Annotated[Int, Field(gt=0)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]  # [0, 1]
OpenFraction = Annotated[Float, Field(gt=0, lt=1)]  # (0, 1)
Flag = Annotated[bool, Strict()]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


Name = Annotated[str, AfterValidator(_not_blank)]
