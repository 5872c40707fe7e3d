"""Package attributes imported from their submodules on first use, so that reading a config stays fast.

A package lists `name -> submodule`; `from package import name` works as with eager imports.
"""

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """(__getattr__, __dir__) for `package` that import `exports[name]` from `package.<submodule>` on demand."""

    def __getattr__(name):
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
