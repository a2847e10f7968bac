"""Synthetic tasks with exactly checkable answers, for RL runs that fit on a laptop CPU.

Every prompt and answer is a line of space-separated symbols, so a word-level tokenizer
(``tokenizer.py``) gives one token per symbol and answers stay a handful of tokens long:

    copy:    "copy: 3 1 4 ="      -> "3 1 4"
    reverse: "reverse: 3 1 4 ="   -> "4 1 3"
    sort:    "sort: 3 1 4 ="      -> "1 3 4"
    add:     "add: 2 7 + 1 5 ="   -> "4 2"      (numbers written digit by digit, most significant first)

Difficulty knobs (``TaskConfig``): the digit-string length range (``min_len``..``max_len``), the
alphabet size (``num_symbols``: digits 0..num_symbols-1) and, for ``add``, digits per operand.

Learnability, measured with a plain-torch stand-in for the demo (2 layers, hidden 128, 4 heads,
vocab 64, word tokenizer; SFT batch 64 at lr 1e-3 on answer tokens; then on-policy group-normalized
REINFORCE, 16 prompts x 8 samples at temperature 1, lr 1e-3; reward at temperature 1 on 200 held-out
prompts; 2 loaded CPU cores):

    reverse, len 3-4:  SFT 50 steps -> 0.56;  RL 20 / 30 / 40 steps -> 0.79 / 0.93 / 0.99
                       (another init seed: SFT 50 -> 0.78; RL 20 / 30 / 40 -> 0.82 / 0.96 / 0.97)
    reverse, len 3-5:  SFT 50 steps -> 0.38;  RL 10 steps -> 0.66 (still rising)
    sort,    len 3-4:  SFT 50 steps -> 0.71;  RL 40 steps -> ~0.7 (no gain at this lr)
    add,     1 digit:  SFT 100 steps -> 0.75; RL unstable at this lr (0.3-0.7)
    reverse, len 3-4:  SFT 100 steps -> 0.98 (too much warm start leaves RL nothing to do)

So ``reverse`` with length 3-4 is the demo task, and RL lifts it past 0.9 in a few dozen steps. The
SFT length sets the starting reward but varies with the seed (50 steps gave 0.56 or 0.78): stop the
warm start on the measured temperature-1 reward (say once it passes 0.4) rather than at a fixed step. ``copy`` (not measured) should be
easier still; ``sort`` and ``add`` did not improve under RL at that step size (other settings
untried) and are there for variety, not for the demo.

The reward reads only ``meta``, never the config, so it can be computed away from where the prompt
was drawn (and replayed from logged rollouts).
"""
from __future__ import annotations

import abc
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from megatron_rlfp16.rewards.base import Example, Registry, RewardFn, register_reward

EOS_TEXT = ("</s>", "<eos>", "<|endoftext|>")
"""End-of-sequence markers a decoder may leave in the text; ``exact_match`` strips them."""


def normalize_response(text: str) -> str:
    """Strips surrounding whitespace and trailing end-of-sequence markers (text after one is not part
    of the response, so everything from the first marker on is dropped)."""
    for marker in EOS_TEXT:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text.strip()


def exact_match(response_text: str, answer: str) -> float:
    """1.0 when the response, stripped of whitespace and end-of-sequence markers, equals the answer."""
    return 1.0 if normalize_response(response_text) == answer.strip() else 0.0


@dataclass(kw_only=True)
class TaskConfig:
    """Which synthetic task(s) to draw prompts from, and how hard they are."""

    names: tuple[str, ...] = ("reverse",)
    """Tasks to mix (each example picks one uniformly): "copy", "reverse", "sort", "add", or a name
    added with ``register_task``."""

    min_len: int = 3
    """Shortest digit string of copy / reverse / sort. At least 1."""

    max_len: int = 4
    """Longest digit string of copy / reverse / sort. At least ``min_len``, at most 32."""

    num_symbols: int = 10
    """Alphabet of copy / reverse / sort: the digits 0..num_symbols-1. In [2, 10]."""

    add_digits: int = 1
    """Digits per operand of add (operands are uniform in [0, 10**add_digits)). In [1, 8]."""

    def validate(self) -> "TaskConfig":
        """Checks every field; raises ValueError naming the field, its value and what is valid."""
        if isinstance(self.names, str) or not isinstance(self.names, (tuple, list)) or not self.names:
            raise ValueError(f"TaskConfig.names={self.names!r} is invalid; valid: a non-empty tuple of "
                             f"task names from {TASKS.names()}")
        for name in self.names:
            if name not in TASKS:
                raise ValueError(f"TaskConfig.names contains unknown task {name!r}; valid: {TASKS.names()}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"TaskConfig.names={self.names!r} repeats a task; list each task once")
        _check_int("min_len", self.min_len, 1, 32)
        _check_int("max_len", self.max_len, self.min_len, 32)
        _check_int("num_symbols", self.num_symbols, 2, 10)
        _check_int("add_digits", self.add_digits, 1, 8)
        return self


def _check_int(field: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"TaskConfig.{field}={value!r} is invalid; valid: an integer in [{low}, {high}]")


class Task(abc.ABC):
    """A source of prompts with exactly checkable answers."""

    name: str = ""
    """Set by ``register_task``."""

    def __init__(self, config: TaskConfig):
        self.config = config

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """One ``(prompt_text, answer_text, meta)``; ``meta`` holds "task" and "answer"."""

    @abc.abstractmethod
    def symbols(self) -> tuple[str, ...]:
        """Every whitespace-separated word a prompt or answer of this task can contain."""

    def reward(self, response_text: str, meta: dict) -> float:
        """Exact match against ``meta["answer"]``; reads nothing but ``meta``."""
        return exact_match(response_text, meta["answer"])

    def dataset(self, n: int, seed: int) -> list[Example]:
        """``n`` examples, the same ones for the same ``seed`` (examples may repeat)."""
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]


TASKS = Registry("task")


def register_task(name: str) -> Callable[[type], type]:
    """Registers a ``Task`` subclass under ``name`` (which becomes a valid ``TaskConfig.names`` entry)."""

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"register_task({name!r}): expected a Task subclass, got {cls!r}")
        TASKS.add(name, cls)
        cls.name = name
        return cls

    return register


def get_task(name: str, config: TaskConfig | None = None) -> Task:
    """The task ``name`` at the difficulty of ``config`` (defaults when None)."""
    return TASKS.get(name)(config if config is not None else TaskConfig(names=(name,)))


def task_names() -> tuple[str, ...]:
    return TASKS.names()


def build_task(config: TaskConfig) -> Task:
    """The configured task, or a uniform mixture when ``config.names`` lists several."""
    config.validate()
    tasks = [get_task(name, config) for name in config.names]
    return tasks[0] if len(tasks) == 1 else TaskMixture(tasks, config)


class TaskMixture(Task):
    """Draws each example from one of several tasks, uniformly; rewards by ``meta["task"]``."""

    def __init__(self, tasks: Sequence[Task], config: TaskConfig):
        super().__init__(config)
        self.tasks = {task.name: task for task in tasks}
        self.name = "+".join(self.tasks)

    def sample(self, rng: random.Random) -> Example:
        return list(self.tasks.values())[rng.randrange(len(self.tasks))].sample(rng)

    def symbols(self) -> tuple[str, ...]:
        return tuple(sorted({s for task in self.tasks.values() for s in task.symbols()}))

    def reward(self, response_text: str, meta: dict) -> float:
        name = meta.get("task")
        if name not in self.tasks:
            raise ValueError(f"meta['task']={name!r} is not part of this mixture; valid: {tuple(self.tasks)}")
        return self.tasks[name].reward(response_text, meta)


class _DigitStringTask(Task):
    """Prompt ``"<name>: d1 d2 ... ="``, answer ``transform(digits)`` written the same way."""

    @abc.abstractmethod
    def transform(self, digits: list[int]) -> list[int]:
        """The answer's digits for the prompt's digits."""

    def sample(self, rng: random.Random) -> Example:
        c = self.config
        digits = [rng.randrange(c.num_symbols) for _ in range(rng.randint(c.min_len, c.max_len))]
        given = " ".join(map(str, digits))
        answer = " ".join(map(str, self.transform(digits)))
        return Example(f"{self.name}: {given} =", answer, {"task": self.name, "answer": answer, "input": given})

    def symbols(self) -> tuple[str, ...]:
        return (f"{self.name}:", "=", *map(str, range(self.config.num_symbols)))


@register_task("copy")
class CopyTask(_DigitStringTask):
    def transform(self, digits: list[int]) -> list[int]:
        return list(digits)


@register_task("reverse")
class ReverseTask(_DigitStringTask):
    def transform(self, digits: list[int]) -> list[int]:
        return digits[::-1]


@register_task("sort")
class SortTask(_DigitStringTask):
    def transform(self, digits: list[int]) -> list[int]:
        return sorted(digits)


@register_task("add")
class AddTask(Task):
    """``"add: 2 7 + 1 5 ="`` -> ``"4 2"``: base-10 operands, digit by digit, no leading zeros."""

    def sample(self, rng: random.Random) -> Example:
        a, b = (rng.randrange(10 ** self.config.add_digits) for _ in range(2))
        answer = _spell(a + b)
        return Example(f"add: {_spell(a)} + {_spell(b)} =", answer, {"task": "add", "answer": answer, "a": a, "b": b})

    def symbols(self) -> tuple[str, ...]:
        return ("add:", "+", "=", *map(str, range(10)))


def _spell(number: int) -> str:
    """27 -> "2 7": one word per digit, so the tokenizer gives one token per digit."""
    return " ".join(str(number))


@register_reward("exact_match")
def exact_match_reward(prompt_text: str, response_text: str, meta: dict) -> float:
    """1.0 when the response equals ``meta["answer"]`` up to surrounding whitespace and EOS markers."""
    return exact_match(response_text, meta["answer"])


@register_reward("task")
class TaskReward(RewardFn):
    """Scores a response with the reward of the task named in ``meta["task"]``."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def __call__(self, prompt_text: str, response_text: str, meta: dict) -> float:
        name = meta.get("task")
        if name not in self._tasks:
            if name not in TASKS:
                raise ValueError(f"meta['task']={name!r} is not a registered task; valid: {TASKS.names()}")
            self._tasks[name] = get_task(name)
        return self._tasks[name].reward(response_text, meta)
