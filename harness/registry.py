"""One generic typed registry with "did you mean" errors (style of lm-eval's registry)."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from harness.errors import DiffbenchError

T = TypeVar("T")


class UnknownNameError(DiffbenchError, KeyError):
    """A name that is not registered; the message suggests the closest registered names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Name -> object map. `register` is a decorator and the only place a name is defined."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader
        self._loaded = loader is None

    def register(self, name: str) -> Callable[[T], T]:
        if not name or name != name.strip().lower() or " " in name:
            raise ValueError(f"{self.kind} name must be lower-case without spaces: {name!r}")

        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._loader()

    def get(self, name: str) -> T:
        self._ensure_loaded()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        names = self.names()
        close = (difflib.get_close_matches(name, names, n=3, cutoff=0.5)
                 or difflib.get_close_matches(name, names, n=1, cutoff=0.0))  # else the nearest
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} '{name}'{hint} (known: {', '.join(self.names())})"

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self._items[name]

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items

    def __len__(self) -> int:
        return len(self.names())


def plugin_loader(package: str) -> Callable[[], None]:
    """A registry loader that imports every module of `package` (by name: a contract names the
    plug-in package its registry discovers and never imports it statically)."""

    def load() -> None:
        root = importlib.import_module(package)
        for info in pkgutil.iter_modules(root.__path__):
            importlib.import_module(f"{package}.{info.name}")

    return load
