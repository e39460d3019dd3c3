"""Typed building blocks for the configuration (pydantic v2), shared by gateway.config and
each backend kind's own settings class.

Every settings model refuses unknown keys and is frozen. Numbers are strict (``"5"`` is not
an int); relative paths resolve against the config file's folder, passed as the validation
context ``{"root": Path}``, so nothing downstream needs to know where the YAML was.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(path: Path, info: ValidationInfo) -> Path:
    root = (info.context or {}).get("root")
    return path if path.is_absolute() or root is None else Path(root) / path


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"expected http(s)://host:port, got {value!r}")
    return value.rstrip("/")


PosInt = Annotated[int, Field(strict=True, gt=0)]
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
PosFloat = Annotated[float, Field(strict=True, gt=0)]
Name = Annotated[str, Field(strict=True, min_length=1)]
ConfigPath = Annotated[Path, AfterValidator(_resolve)]
HttpUrl = Annotated[str, Field(strict=True), AfterValidator(_http_url)]
