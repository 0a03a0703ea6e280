"""Named task loaders: one registry per kind of task (classification, source -> target pairs, completions)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from layergeo.errors import LayergeoError

T = TypeVar("T")


class Registry(Generic[T]):
    """No-argument loaders by canonical name and aliases; names are matched case- and space-insensitively."""

    def __init__(self, kind: str):
        self.kind = kind  # "task", "pair task", ...: how errors name what is registered
        self._loaders: dict[str, Callable[[], T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *aliases: str):
        """Decorator: register ``loader`` (returning the full, uncapped task) under ``name`` and ``aliases``."""

        def decorate(loader: Callable[[], T]) -> Callable[[], T]:
            for key in (name, *aliases):
                if key in self._loaders or key in self._aliases:
                    raise LayergeoError(f"{self.kind} name {key!r} is registered twice; pick another name")
            self._loaders[name] = loader
            self._aliases.update({alias: name for alias in aliases})
            return loader

        return decorate

    def names(self) -> list[str]:
        """The canonical names (aliases not included)."""
        return sorted(self._loaders)

    def find(self, name: str) -> Callable[[], T] | None:
        """The loader registered as ``name`` (or as an alias of it); None when there is none."""
        key = name.strip().lower()
        return self._loaders.get(self._aliases.get(key, key))

    def known(self) -> str:
        """Every name for an error message: "a, b, b2 (= b)"."""
        return ", ".join(self.names() + [f"{a} (= {c})" for a, c in sorted(self._aliases.items())])
