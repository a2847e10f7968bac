"""Prompt sources: where a step's prompts come from, how they are tokenized, how responses score.

A source is deterministic in the step number (a resumed run draws the same prompts) and keeps any
other position in ``state_dict`` for checkpoints.
"""
from __future__ import annotations

from typing import List, Protocol, Sequence

from megatron_rlfp16.rewards import Example


class PromptSource(Protocol):
    eos_id: int

    def prompts(self, step: int, n: int) -> List[Example]: ...
    def encode_prompt(self, example: Example) -> List[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def reward(self, example: Example, response_text: str) -> float: ...
    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> List[float]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class TaskSource:
    """A synthetic task (``megatron_rlfp16.rewards.tasks``) with its run-time tokenizer."""

    def __init__(self, task, tokenizer, *, seed: int = 0):
        self.task = task
        self.tokenizer = tokenizer
        self.seed = seed
        self.eos_id = tokenizer.eos_id if hasattr(tokenizer, "eos_id") else 3

    def prompts(self, step: int, n: int) -> List[Example]:
        return self.task.dataset(n, seed=self.seed * 1_000_003 + step)

    def encode_prompt(self, example: Example) -> List[int]:
        return self.tokenizer.encode_prompt(example.prompt)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def reward(self, example: Example, response_text: str) -> float:
        return self.task.reward(response_text, example.meta)

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> List[float]:
        """Rewards of a batch of ``(example, response text)`` pairs, in order."""
        return [float(self.reward(e, r)) for e, r in zip(examples, responses)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class JsonlSource:
    """A JSONL dataset of ``{"prompt" | "messages", "answer"}`` with a reward such as "math" and an HF
    tokenizer. Prompts go through ``megatron_rlfp16.prompts`` (the chat template by default);
    generation stops at every end id of the checkpoint (``hf_dir``'s ``generation_config.json``
    and the tokenizer).

    Before the first step the trainer calls :meth:`check_prompts` with the engine's limit: every
    prompt is tokenized once (and kept), and one that is empty or too long either stops the run
    naming its file and line (``on_bad="error"``) or is left out and counted (``"skip"``)."""

    def __init__(self, dataset, tokenizer, reward, *, seed: int = 0, prompt_config=None, hf_dir=None,
                 on_bad: str = "error"):
        from megatron_rlfp16.prompts import PromptBuilder, stop_token_ids
        from megatron_rlfp16.rewards.dataset import check_bad_line_policy

        self.on_bad = check_bad_line_policy(on_bad, "JsonlSource.on_bad")
        self.dataset = dataset
        self.seed = seed
        self.tokenizer = tokenizer
        self.reward_fn = reward
        self.builder = PromptBuilder(tokenizer, prompt_config)
        self.stop_ids = stop_token_ids(hf_dir, tokenizer)
        self.stop_strings = self.builder.config.stop
        self.eos_id = self.stop_ids[0] if self.stop_ids else tokenizer.eos_token_id
        self.skipped: List[tuple] = list(getattr(dataset, "skipped", []))
        """``(where, reason)`` of every example left out, by the reader or by :meth:`check_prompts`."""
        self._encoded: dict = {}
        self._use(list(range(len(dataset))))

    def _use(self, indices: List[int]) -> None:
        from megatron_rlfp16.rewards import ShuffledIterator

        self.indices = indices
        self.iterator = ShuffledIterator([self.dataset[i] for i in indices], seed=self.seed)

    def _where(self, i: int) -> str:
        return self.dataset.where(i) if hasattr(self.dataset, "where") else f"example {i}"

    def check_prompts(self, max_tokens: int) -> int:
        """Tokenizes every prompt; an empty one or one over ``max_tokens`` tokens is an error naming
        its file and line, or (``on_bad="skip"``) is left out. Returns the number of usable prompts.
        A second call with the same limit returns at once."""
        if getattr(self, "_checked_limit", None) == max_tokens:
            return len(self.indices)
        keep = []
        for i in self.indices:
            example = self.dataset[i]
            try:
                ids = self.builder.encode(example.prompt, example.meta.get("messages"))
            except ValueError as err:
                problem = str(err)
            else:
                self._encoded[id(example)] = ids
                problem = ("the prompt is empty after tokenization" if not ids else
                           f"the prompt has {len(ids)} tokens, over the engine's limit of {max_tokens} "
                           "(the rollout's max_model_len less 1)" if len(ids) > max_tokens else None)
            if problem is None:
                keep.append(i)
            elif self.on_bad == "error":
                raise ValueError(f"{self._where(i)}: {problem}; fix the line or pass --on-bad-prompt skip")
            else:
                self.skipped.append((self._where(i), problem))
        if not keep:
            raise ValueError(f"no usable prompt left in the dataset ({len(self.skipped)} left out, e.g. "
                             f"{self.skipped[0][0]}: {self.skipped[0][1]})")
        if len(keep) != len(self.indices):
            self._use(keep)
        self._checked_limit = max_tokens
        return len(keep)

    def prompts(self, step: int, n: int) -> List[Example]:
        return self.iterator.take(n)

    def encode_prompt(self, example: Example) -> List[int]:
        ids = self._encoded.get(id(example))
        return list(ids) if ids is not None else self.builder.encode(example.prompt, example.meta.get("messages"))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def reward(self, example: Example, response_text: str) -> float:
        return float(self.reward_fn(example.prompt, response_text, example.meta))

    def score(self, examples: Sequence[Example], responses: Sequence[str]) -> List[float]:
        """The reward's batched interface (``RewardFn.score``): one call for the whole step."""
        from megatron_rlfp16.rewards.base import RewardInput

        batch = [RewardInput(e.prompt, r, e.meta) for e, r in zip(examples, responses)]
        if hasattr(self.reward_fn, "score"):
            return [float(x) for x in self.reward_fn.score(batch)]
        return [float(self.reward_fn(*item)) for item in batch]

    def state_dict(self) -> dict:
        return self.iterator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.iterator.load_state_dict(state)
