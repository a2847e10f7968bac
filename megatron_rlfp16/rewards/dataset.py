"""Prompt datasets from JSONL files, and a shuffled, resumable walk over any list of examples.

A JSONL file holds one JSON object per line with a prompt field and an answer field (names
configurable); every other field is kept in ``meta`` for the reward. The file is read line by line,
so a malformed line is reported by file and line number before training starts, not mid-run.

``ShuffledIterator`` walks the examples in a fresh seeded permutation per epoch and forever (an RL
trainer pulls batches by step, not by epoch). Its position is two integers, ``(epoch, index)``, so a
checkpoint restores exactly where the data stream was: the order of an epoch depends only on the
seed and the epoch number, never on how many items were drawn before.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Generic, Iterator, Sequence, TypeVar

from megatron_rlfp16.rewards.base import Example

T = TypeVar("T")

BAD_LINE_POLICIES = ("error", "skip")
"""What a reader does with a line it cannot use: raise naming file and line, or leave it out."""


def check_bad_line_policy(value: str, field: str = "on_bad") -> str:
    """``value`` if it is one of :data:`BAD_LINE_POLICIES`, else a ValueError naming ``field``."""
    if value not in BAD_LINE_POLICIES:
        raise ValueError(f"{field}={value!r}; valid: {list(BAD_LINE_POLICIES)}")
    return value


@dataclass
class JsonlDataset:
    """Examples read from one JSONL file."""

    path: str
    examples: list[Example] = field(default_factory=list)
    num_blank: int = 0
    """Blank (or whitespace-only) lines that were skipped."""
    lines: list[int] = field(default_factory=list)
    """The line number of each example."""
    skipped: list[tuple[int, str]] = field(default_factory=list)
    """``(line, reason)`` of each line left out under ``on_bad="skip"``."""

    def where(self, i: int) -> str:
        """``file:line`` of example ``i``."""
        return f"{self.path}:{self.lines[i]}" if i < len(self.lines) else f"{self.path} (example {i})"

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class JsonlReader:
    """Streams ``Example``s from a JSONL file, one per non-blank line, counting skipped blank lines.

    ``meta`` holds every field but the prompt, with the answer (as a string) under ``"answer"``.
    Bad input raises ValueError naming the file and line number.
    """

    def __init__(self, path: str, *, prompt_field: str = "prompt", answer_field: str = "answer",
                 on_bad: str = "error"):
        self.on_bad = check_bad_line_policy(on_bad)
        self.path = path
        self.prompt_field = prompt_field
        self.answer_field = answer_field
        self.num_blank = 0
        """Blank (or whitespace-only) lines skipped so far."""
        self.skipped: list[tuple[int, str]] = []
        """``(line, reason)`` of each bad line left out (``on_bad="skip"``)."""
        self.lineno = 0
        """The line of the example last yielded."""

    def __iter__(self) -> Iterator[Example]:
        self.num_blank, self.skipped = 0, []
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"--data {self.path!r} is not a file")
        # utf-8-sig: a byte-order mark (what some editors and Windows tools write) is not part of line 1.
        with open(self.path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    self.num_blank += 1
                    continue
                try:
                    example = self._example(line, f"{self.path}:{lineno}")
                except ValueError as err:
                    if self.on_bad == "error":
                        raise
                    self.skipped.append((lineno, str(err).split(": ", 1)[-1]))
                    continue
                self.lineno = lineno
                yield example

    def _example(self, line: str, where: str) -> Example:
        try:
            record = json.loads(line.strip())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if self.prompt_field not in record and "messages" in record:
            return self._chat_example(record, where)
        for name in (self.prompt_field, self.answer_field):
            if name not in record:
                raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(record)}); "
                                 f"choose the fields with --prompt-field / --answer-field (load_jsonl(prompt_field=..., "
                                 f"answer_field=...)), or give a 'messages' chat list instead of a prompt")
        prompt, answer = record[self.prompt_field], record[self.answer_field]
        if not isinstance(prompt, str):
            raise ValueError(f"{where}: field {self.prompt_field!r} must be a string, got "
                             f"{type(prompt).__name__}")
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise ValueError(f"{where}: field {self.answer_field!r} must be a string or a number, got "
                             f"{type(answer).__name__}")
        if not prompt.strip():
            raise ValueError(f"{where}: field {self.prompt_field!r} is empty")
        meta = {k: v for k, v in record.items() if k not in (self.prompt_field, self.answer_field)}
        meta["answer"] = str(answer)
        return Example(prompt, str(answer), meta)


    def _chat_example(self, record: dict, where: str) -> Example:
        """A row with ``messages`` (a chat list) instead of a prompt: the chat goes to ``meta`` for
        the prompt builder, the last user message is the prompt text the reward sees."""
        from megatron_rlfp16.prompts import check_messages

        messages = check_messages(record["messages"], f"{where}: field 'messages'")
        if self.answer_field not in record:
            raise ValueError(f"{where}: missing field {self.answer_field!r} (fields present: {sorted(record)})")
        answer = record[self.answer_field]
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise ValueError(f"{where}: field {self.answer_field!r} must be a string or a number, got "
                             f"{type(answer).__name__}")
        users = [m["content"] for m in messages if m["role"] == "user"]
        meta = {k: v for k, v in record.items() if k != self.answer_field}
        meta["messages"], meta["answer"] = messages, str(answer)
        return Example(users[-1] if users else messages[-1]["content"], str(answer), meta)


def load_jsonl(path: str, *, prompt_field: str = "prompt", answer_field: str = "answer",
               on_bad: str = "error") -> JsonlDataset:
    """Reads the whole file (line by line) into a ``JsonlDataset``; a file without usable records is
    an error. ``on_bad`` is the policy for a line that cannot be used (invalid JSON, a missing, mistyped
    or empty field): ``"error"`` raises naming the file and line, ``"skip"`` leaves it out and lists it
    in ``JsonlDataset.skipped``."""
    reader = JsonlReader(path, prompt_field=prompt_field, answer_field=answer_field, on_bad=on_bad)
    examples, lines = [], []
    for example in reader:
        examples.append(example)
        lines.append(reader.lineno)
    if not examples:
        raise ValueError(f"{path}: no usable records ({reader.num_blank} blank lines, "
                         f"{len(reader.skipped)} left out{_first_reasons(reader.skipped)})")
    return JsonlDataset(path=path, examples=examples, num_blank=reader.num_blank, lines=lines,
                        skipped=reader.skipped)


def _first_reasons(skipped, limit: int = 3) -> str:
    if not skipped:
        return ""
    return ": " + "; ".join(f"line {line}: {reason}" for line, reason in skipped[:limit]) + (
        "; ..." if len(skipped) > limit else "")


def describe_skipped(path: str, skipped, limit: int = 5) -> str:
    """One line for the log: how many lines of ``path`` were left out, and the first few."""
    return f"{path}: {len(skipped)} line(s) left out (--on-bad-prompt skip){_first_reasons(skipped, limit)}"


class ShuffledIterator(Generic[T]):
    """Endless walk over ``items``: epoch ``e`` visits them in the permutation seeded by
    ``(seed, e)`` (in file order when ``shuffle`` is False)."""

    def __init__(self, items: Sequence[T], *, seed: int = 0, shuffle: bool = True):
        if len(items) == 0:
            raise ValueError("ShuffledIterator needs at least one item")
        self.items = items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        """Epochs completed before the current one."""
        self.index = 0
        """Items of the current epoch already returned."""
        self._order: list[int] = []
        self._order_epoch = -1

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            order = list(range(len(self.items)))
            if self.shuffle:
                # A str seed is hashed with SHA-512: stable across processes and Python versions.
                random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
            self._order, self._order_epoch = order, self.epoch
        return self._order

    def __iter__(self) -> "ShuffledIterator[T]":
        return self

    def __next__(self) -> T:
        if self.index >= len(self.items):
            self.epoch, self.index = self.epoch + 1, 0
        item = self.items[self._epoch_order()[self.index]]
        self.index += 1
        return item

    def take(self, n: int) -> list[T]:
        """The next ``n`` items (crossing epoch boundaries as needed)."""
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
                "num_items": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        """Resumes at a saved position; the items, seed and shuffle flag must be those it was saved with."""
        missing = {"epoch", "index", "seed", "shuffle", "num_items"} - set(state)
        if missing:
            raise ValueError(f"ShuffledIterator state is missing {sorted(missing)}; got keys {sorted(state)}")
        for key, mine in (("num_items", len(self.items)), ("seed", self.seed), ("shuffle", self.shuffle)):
            if state[key] != mine:
                raise ValueError(f"ShuffledIterator state has {key}={state[key]!r} but this iterator has "
                                 f"{key}={mine!r}; resume with the same data and settings")
        if not 0 <= state["index"] <= len(self.items) or state["epoch"] < 0:
            raise ValueError(f"ShuffledIterator state has epoch={state['epoch']!r}, index={state['index']!r}; "
                             f"valid: epoch >= 0 and 0 <= index <= {len(self.items)}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
