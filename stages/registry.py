"""Names to what they stand for: the networks ``--model`` names, the datasets ``--dataset``
names and the local losses ``LocalNet(loss=...)`` names. Adding one is one file and one
registration (timm's ``@register_model``); validation, ``--help`` and the runners find it here.

Each registry knows the modules that register its built-in entries and imports them on its
first lookup, so asking for a name never depends on what happened to be imported before.
"""
from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str, builtins: tuple[str, ...]) -> None:
        """``what`` names an entry in messages; ``builtins``: the modules registering them."""
        self.what, self._builtins, self._entries = what, builtins, {}
        self._loaded = False

    def register(self, *names: str, entry: T | None = None):
        """Register ``entry`` under ``names``, or, as a decorator, what it decorates."""
        def add(value: T) -> T:
            for name in names:
                if name in self._entries and self._entries[name] is not value:
                    raise ValueError(f"{self.what} {name!r} is registered already")
                self._entries[name] = value
            return value
        return add if entry is None else add(entry)

    def _load(self) -> dict[str, T]:
        if not self._loaded:
            self._loaded = True
            for module in self._builtins:
                importlib.import_module(module)
        return self._entries

    def __getitem__(self, name: str) -> T:
        entries = self._load()
        if name not in entries:
            raise KeyError(f"unknown {self.what} {name!r}; choose from {', '.join(entries)}")
        return entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._load()))

    def names(self) -> tuple[str, ...]:
        return tuple(self._load())


# a network's planner: (config, input shape, classes) -> its units' specs, in forward order
MODELS: Registry[Callable] = Registry("model", ("localpipe.stages.models",
                                                "localpipe.stages.residual",
                                                "localpipe.stages.vit"))
# a dataset: its DatasetInfo and loader (pipeline/data.py)
DATASETS: Registry = Registry("dataset", ("localpipe.pipeline.data",))
# a LocalNet loss: (block output, labels, head, beta) -> (loss, records)
LOSSES: Registry[Callable] = Registry("local loss", ("localpipe.stages.localnet",))

register_model = MODELS.register
register_dataset = DATASETS.register
register_loss = LOSSES.register
