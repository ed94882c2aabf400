"""Name → function registries for the research surface.

Advantage estimators, policy losses, KL estimators, reward functions and rollout engines are each
kept in a `Registry`. A researcher adds one with a decorator in any module that is imported before
the config is validated (name it in `run.imports`); the training loop only ever looks things up by
the name written in the config.

An entry declares what it needs beyond the rollout itself, and the run builds exactly that:

    @ADVANTAGES.register("my_gae", needs=("values",))      # the run gets a critic
    @POLICY_LOSSES.register("my_loss", needs=("ref_logprobs",))   # the run gets a reference model

The needs are the keys of `NEEDS`; each registry says which of them its entries may declare (a
policy loss cannot use a greedy baseline; a reward function receives text only, so it declares none).
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")

NEEDS: dict[str, str] = {
    "values": "the critic's V(s_t) of every response token at rollout time (the run builds a critic)",
    "ref_logprobs": "log π_ref of every response token (the run builds the frozen reference model)",
    "greedy_baseline": "the score of one greedy response per prompt, sampled each step with the "
                       "current policy (ReMax's baseline, arXiv 2310.10505)",
    "groups": "rollout.n ≥ 2 samples per prompt: a group-relative baseline of a one-member group is the "
              "sample itself, so every advantage would be 0 and nothing would be learned",
}
"""What a registry entry may declare it needs, and what the run then provides."""


class Registry(Generic[T]):
    """A named table of callables (or classes) of one kind.

    `kind` is the human name used in error messages, e.g. "advantage estimator"; `needs` lists the keys
    of `NEEDS` that its entries may declare (the inputs its callers can pass).
    """

    def __init__(self, kind: str, *, needs: Iterable[str] = ()):
        unknown = sorted(set(needs) - NEEDS.keys())
        if unknown:
            raise ValueError(f"unknown needs {unknown}; valid: {', '.join(NEEDS)}")
        self.kind = kind
        self.allowed_needs = tuple(needs)
        self._items: dict[str, T] = {}
        self._needs: dict[str, frozenset[str]] = {}

    def register(self, name: str, *, needs: Iterable[str] = ()) -> Callable[[T], T]:
        """Decorator: `@ADVANTAGES.register("grpo")`, or `register("gae", needs=("values",))` for an entry
        that reads inputs the run builds only on request (the keys of `NEEDS`). Registering a name
        twice, or a need this registry's callers cannot provide, is a ValueError."""
        wanted = frozenset([needs] if isinstance(needs, str) else needs)
        unknown = sorted(wanted - set(self.allowed_needs))
        if unknown:
            valid = ", ".join(self.allowed_needs) or "none"
            raise ValueError(f"{self.kind} {name!r} declares needs {unknown} that a {self.kind} cannot get; "
                             f"valid: {valid}")

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self._needs[name] = wanted
            return obj

        return add

    def needs(self, name: str) -> frozenset[str]:
        """What the entry `name` declared it needs (keys of `NEEDS`); unknown names raise like `get`."""
        self.get(name)
        return self._needs[name]

    def get(self, name: str) -> T:
        """The entry called `name`; an unknown name raises a ValueError listing the valid ones."""
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{hint}; valid names: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
