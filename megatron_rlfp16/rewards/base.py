"""The reward interface: one score per (prompt, response) pair, and a name table of reward functions.

A reward sees text, never token ids: the tokenizer that produced the response decodes it first, so
one reward serves every model and tokenizer. ``meta`` carries whatever the prompt's source knows
about the right answer (``meta["answer"]`` for every built-in source); it must stay JSON-serializable
so rollouts can be logged and replayed.

Registering a name twice raises instead of replacing the first entry: a silent overwrite would let
an import-order accident change what the policy is rewarded for.
"""
from __future__ import annotations

import abc

from typing import Any, Callable, Iterable, NamedTuple, Union

from megatron_rlfp16.registry import Registry  # noqa: F401  (re-exported for tasks.py)


class Example(NamedTuple):
    """One prompt with its reference answer; unpacks as ``prompt, answer, meta``."""

    prompt: str
    answer: str
    meta: dict
    """JSON-serializable facts the reward needs; always holds ``"answer"``."""


class RewardInput(NamedTuple):
    """One scored item of a batch; a plain ``(prompt, response, meta)`` tuple works as well."""

    prompt: str
    response: str
    meta: dict


class RewardFn(abc.ABC):
    """Base class of rewards: ``reward(prompt_text, response_text, meta) -> float``.

    Subclasses implement ``__call__``; ``score`` loops over a batch and may be overridden by a
    reward that is cheaper batched (a reward model, say).
    """

    name: str = ""
    """Set by ``register_reward``; empty for an unregistered reward."""

    @abc.abstractmethod
    def __call__(self, prompt_text: str, response_text: str, meta: dict) -> float:
        """The reward of one response."""

    def score(self, batch: Iterable[Union[RewardInput, tuple]]) -> list[float]:
        """One float per ``(prompt, response, meta)`` item, in order."""
        return [float(self(prompt, response, meta)) for prompt, response, meta in batch]


class FunctionReward(RewardFn):
    """Wraps a plain ``fn(prompt_text, response_text, meta) -> float`` as a ``RewardFn``."""

    def __init__(self, fn: Callable[[str, str, dict], float], name: str = ""):
        self.fn = fn
        self.name = name

    def __call__(self, prompt_text: str, response_text: str, meta: dict) -> float:
        return float(self.fn(prompt_text, response_text, meta))

    def __repr__(self) -> str:
        return f"FunctionReward({self.name or getattr(self.fn, '__qualname__', self.fn)!r})"


REWARDS = Registry("reward")


def register_reward(name: str) -> Callable:
    """Registers a ``RewardFn`` subclass, or a plain ``fn(prompt_text, response_text, meta) -> float``,
    under ``name``; returns it unchanged so it stays usable directly."""

    def register(obj: Callable) -> Callable:
        if not (isinstance(obj, type) and issubclass(obj, RewardFn)) and not callable(obj):
            raise TypeError(f"register_reward({name!r}): expected a RewardFn subclass or a function, "
                            f"got {obj!r}")
        REWARDS.add(name, obj)
        return obj

    return register


def get_reward(name: str, **kwargs: Any) -> RewardFn:
    """A ready ``RewardFn`` for ``name``: a registered class is built with ``kwargs``, a registered
    function is wrapped (and takes no ``kwargs``)."""
    entry = REWARDS.get(name)
    if isinstance(entry, type):
        reward = entry(**kwargs)
        reward.name = name
        return reward
    if kwargs:
        raise TypeError(f"reward {name!r} is a plain function and takes no options; got {sorted(kwargs)}")
    return FunctionReward(entry, name)


def reward_names() -> tuple[str, ...]:
    return REWARDS.names()
