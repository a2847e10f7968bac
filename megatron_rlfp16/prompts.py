"""Prompt construction in one place: text or chat messages -> the token ids the engine is given,
and the token ids generation stops at. Used by the trainer's JSONL source, the warm start and the
mismatch tool.

Why one place: an instruct model given a bare question answers with its end-of-turn token at once
(an empty response, reward 0, no RL signal); RL recipes for instruct and reasoning models (Qwen3,
R1-Distill) always go through the checkpoint's chat template, base-model recipes through a prompt
template ("... put your final answer within \\boxed{}"). The ids are exactly what the tokenizer's own
``apply_chat_template(..., add_generation_prompt=True)`` returns, so the policy sees in RL what it
saw in instruction tuning.

Stop tokens: every id in the checkpoint's ``generation_config.json`` ``eos_token_id`` (one id or a
list: many checkpoints end a turn with one token and a document with another), plus the
tokenizer's ``eos_token_id``; ``stop`` strings are handed to the engine as they are.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

__all__ = ["PromptBuilder", "PromptConfig", "load_tokenizer", "stop_token_ids"]

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(kw_only=True)
class PromptConfig:
    """How a dataset row becomes the prompt's token ids."""

    chat_template: bool = True
    """Apply the tokenizer's chat template when it has one (``--no-chat-template`` turns it off)."""
    system_prompt: Optional[str] = None
    """A system message put before each prompt (``--system-prompt``); a row's own system message wins."""
    prompt_template: Optional[str] = None
    """Text with one ``{prompt}`` placeholder wrapped around each text prompt (``--prompt-template``),
    for base models, e.g. "{prompt}\\nPut your final answer within \\\\boxed{{}}."; applied before the
    chat template when both are used."""
    stop: Tuple[str, ...] = ()
    """Extra stop strings for the engine (``--stop``), beside the stop token ids."""

    def validate(self) -> "PromptConfig":
        if self.prompt_template is not None:
            if not isinstance(self.prompt_template, str) or "{prompt}" not in self.prompt_template:
                raise ValueError(f"PromptConfig.prompt_template={self.prompt_template!r} is invalid; valid: "
                                 "a string with one '{prompt}' placeholder (write literal braces as '{{' '}}')")
            try:
                self.prompt_template.format(prompt="")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"PromptConfig.prompt_template={self.prompt_template!r} does not format "
                                 f"({err!r}); valid: only '{{prompt}}', literal braces doubled") from None
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"PromptConfig.system_prompt={self.system_prompt!r} is invalid; valid: a string")
        stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"PromptConfig.stop={self.stop!r} is invalid; valid: non-empty strings")
        self.stop = stop
        return self


def check_messages(messages: Any, where: str = "messages") -> List[dict]:
    """A chat list ``[{"role": ..., "content": ...}]``, checked; errors name ``where``."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"{where}[{i}]={m!r}: expected {{'role': one of {list(ROLES)}, 'content': a string}}")
    return [dict(m) for m in messages]


class PromptBuilder:
    """Turns an example (text prompt, or ``meta["messages"]``) into token ids with ``tokenizer`` (a
    transformers tokenizer) as ``config`` says."""

    def __init__(self, tokenizer, config: Optional[PromptConfig] = None):
        self.tokenizer = tokenizer
        self.config = (config or PromptConfig()).validate()

    @property
    def uses_chat_template(self) -> bool:
        return self.config.chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def messages(self, prompt: str, messages: Optional[Sequence[Mapping]] = None) -> List[dict]:
        """The chat list of a row: its own ``messages``, or one user message holding the (templated)
        prompt; the configured system prompt first unless the row has a system message."""
        if messages is None:
            text = prompt if self.config.prompt_template is None else self.config.prompt_template.format(prompt=prompt)
            out = [{"role": "user", "content": text}]
        else:
            out = check_messages(list(messages))
        if self.config.system_prompt is not None and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": self.config.system_prompt})
        return out

    def encode(self, prompt: str, messages: Optional[Sequence[Mapping]] = None) -> List[int]:
        """The prompt's token ids: ``apply_chat_template(messages, add_generation_prompt=True)``, or
        without a chat template the system prompt and the (templated) text, encoded as plain text."""
        chat = self.messages(prompt, messages)
        if self.uses_chat_template:
            out = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, Mapping) else out
            return [int(i) for i in ids]
        if messages is not None and any(m["role"] != "user" for m in chat if m["role"] != "system"):
            raise ValueError("a row with a multi-turn 'messages' list needs a tokenizer with a chat template "
                             "(this one has none, or --no-chat-template was given)")
        text = "\n\n".join(m["content"] for m in chat)
        return [int(i) for i in self.tokenizer.encode(text)]


def stop_token_ids(hf_dir: Optional[str], tokenizer=None) -> List[int]:
    """Every end id of the checkpoint: ``generation_config.json``'s ``eos_token_id`` (an int or a
    list) and the tokenizer's ``eos_token_id``, in that order, without duplicates."""
    ids: List[int] = []
    path = os.path.join(hf_dir, "generation_config.json") if hf_dir else None
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get("eos_token_id")
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        ids += value if isinstance(value, list) else [] if value is None else [value]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.append(eos)
    out: List[int] = []
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ValueError(f"{path or 'tokenizer'}: eos_token_id {i!r} is not a token id")
        if i not in out:
            out.append(i)
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
"""A checkpoint directory with none of these has no tokenizer of its own."""


def load_tokenizer(hf_dir: str):
    """The checkpoint's own Hugging Face tokenizer, or an error naming the directory and what is
    missing (transformers' own message for a directory without one is about sentencepiece)."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"--hf-dir {hf_dir!r} is not a directory")
    if not any(os.path.isfile(os.path.join(hf_dir, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{hf_dir!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer "
            "files of the model it was made from into it (an export copies them from the checkpoint it "
            "reads when they are there)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except Exception as err:  # transformers raises many types for a damaged tokenizer
        raise ValueError(f"{hf_dir!r}: the tokenizer cannot be loaded ({type(err).__name__}: {err})") from None
