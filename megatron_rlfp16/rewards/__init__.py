"""Rewards and the prompts they score: the "reward" stage of rollout -> reward -> advantages -> loss.

- ``base.py``       ``RewardFn`` interface, ``Example``, the ``register_reward`` / ``get_reward`` table
- ``tasks.py``      synthetic tasks with exact answers (copy, reverse, sort, add), ``TaskConfig``;
                    rewards "task" and "exact_match"
- ``tokenizer.py``  a SentencePiece tokenizer fitted at run time on a task's text (``TaskTokenizer``)
- ``math.py``       reward "math": final-answer equivalence via ``math-verify``
- ``dataset.py``    JSONL prompt files and a seeded, resumable ``ShuffledIterator``

Rewards see decoded text, never token ids. Importing this package registers the built-in rewards and
tasks; it imports neither Megatron nor vLLM, and ``math-verify`` / ``sentencepiece`` only when used.
"""
from megatron_rlfp16.rewards.base import (
    Example,
    FunctionReward,
    RewardFn,
    RewardInput,
    get_reward,
    register_reward,
    reward_names,
)
from megatron_rlfp16.rewards.dataset import JsonlDataset, JsonlReader, ShuffledIterator, load_jsonl
from megatron_rlfp16.rewards.math import MathReward, extract_final_answer, math_reward
from megatron_rlfp16.rewards.tasks import (
    Task,
    TaskConfig,
    TaskMixture,
    TaskReward,
    build_task,
    exact_match,
    get_task,
    register_task,
    task_names,
)
from megatron_rlfp16.rewards.tokenizer import TaskTokenizer, TokenizerConfig, train_tokenizer

__all__ = [
    "Example",
    "FunctionReward",
    "JsonlDataset",
    "JsonlReader",
    "MathReward",
    "RewardFn",
    "RewardInput",
    "ShuffledIterator",
    "Task",
    "TaskConfig",
    "TaskMixture",
    "TaskReward",
    "TaskTokenizer",
    "TokenizerConfig",
    "build_task",
    "exact_match",
    "extract_final_answer",
    "get_reward",
    "get_task",
    "load_jsonl",
    "math_reward",
    "register_reward",
    "register_task",
    "reward_names",
    "task_names",
    "train_tokenizer",
]
