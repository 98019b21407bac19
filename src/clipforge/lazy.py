"""Package attributes imported on first use (PEP 562), so ``import clipforge`` stays cheap and the
ONNX runtime path never imports torch through a package ``__init__``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_attributes(package: str, table: dict[str, str], prefix: str = "") -> Callable[[str], Any]:
    """A module ``__getattr__``: ``name`` comes from module ``prefix + table[name]``, cached in the package."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module '{package}' has no attribute {name!r}")
        value = getattr(importlib.import_module(prefix + module), name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    return __getattr__
