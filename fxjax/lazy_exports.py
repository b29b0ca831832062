"""A package's public names imported from their modules on first use (PEP 562), so that importing the
package (or one light module of it) does not load jax, grain or torch-sized dependencies it may not need.

    __getattr__, __dir__ = lazy_exports(__name__, {"DataPipeline": "fxjax.data.pipeline"}, globals())

(rewards/, which imports nothing of fxjax's, keeps its own copy of these few lines.)
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence

__all__ = ["lazy_exports"]

# what a package's namespace holds for its own use, not for its users (dir(fxjax) listed them)
_PLUMBING = frozenset({"annotations", "TYPE_CHECKING", "lazy_exports", "importlib"})


def lazy_exports(package: str, exports: Mapping[str, str], namespace: dict,
                 submodules: Sequence[str] = ()) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's module-level `__getattr__` and `__dir__`: a name of `exports` (name -> the module that
    defines it) is imported on first use and kept in `namespace` (the package's globals), so later lookups
    do not come here; a name of `submodules` imports `package.name`."""
    def __getattr__(name: str) -> Any:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")  # (the import sets the attribute)
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:  # the public names and submodules, not the module's own imports
        public = {name for name in namespace if not name.startswith("_") and name not in _PLUMBING}
        return sorted(public | set(namespace.get("__all__", ())) | set(submodules))

    return __getattr__, __dir__
