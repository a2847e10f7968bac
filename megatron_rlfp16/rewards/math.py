"""Math answer reward: is the response's final answer mathematically equal to the reference?

Built on Hugging Face's ``math-verify`` (https://github.com/huggingface/Math-Verify): both answers
are parsed to SymPy and compared symbolically and numerically, so ``\\frac{1}{2}``, ``0.5`` and
``1/2`` all match.

The final answer is taken, in order of preference, from the last ``\\boxed{...}``, else from whichever
of the last ``$...$`` / ``\\(...\\)`` / ``\\[...\\]`` span or the last bare expression ends later in the
text. A bare expression is a space-free run holding a digit or a LaTeX command, such as ``12,345``,
``1/2`` or ``\\frac{1}{2}``; ``x^2 + 1`` written with spaces yields just ``1``, so ask for ``\\boxed{}``.
Anything that fails to parse or to compare scores 0 and never raises: a policy can emit any
string, and one pathological sample must not kill a training step.

Timeouts: math-verify bounds parsing and comparison with ``signal.alarm``, which only works in the
main thread; elsewhere ``math_reward`` runs without a timeout (math-verify's own advice). An alarm
that was already pending (pytest-timeout's, say) is re-armed afterwards instead of being lost.
"""
from __future__ import annotations

import re
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Optional

from megatron_rlfp16.rewards.base import RewardFn, register_reward

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
# A run of characters that can make up a bare expression ("12,345", "-0.5", "1/2", "x^2+1",
# "\frac{1}{2}"); it counts as an answer only if it holds a digit or a LaTeX command.
_EXPR_RUN = re.compile(r"[0-9A-Za-z\\{}^_.,+\-*/()]+")
_ANSWERISH = re.compile(r"\d|\\[A-Za-z]")


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` with balanced braces; None if there is none (or it is
    never closed)."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def extract_final_answer(text: str) -> Optional[str]:
    """The final answer of a response as a LaTeX-ish string, or None when there is none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    candidates = []  # (end position, answer)
    spans = list(_MATH_SPAN.finditer(text))
    if spans:
        last = spans[-1]
        candidates.append((last.end(), next(g for g in last.groups() if g is not None)))
    # Numbers inside a math span belong to it: blank the spans out before looking for bare ones.
    masked = _MATH_SPAN.sub(lambda m: " " * (m.end() - m.start()), text)
    runs = [m for m in _EXPR_RUN.finditer(masked) if _ANSWERISH.search(m.group())]
    if runs:
        candidates.append((runs[-1].end(), runs[-1].group().rstrip(".,")))
    return max(candidates)[1].strip() if candidates else None


def _gold_text(gold_answer: str) -> str:
    boxed = _last_boxed(gold_answer)
    return boxed if boxed is not None else gold_answer.strip().strip("$")


@contextmanager
def _keep_outer_alarm():
    """math-verify cancels any pending SIGALRM when it finishes; re-arm the one we found."""
    left = signal.alarm(0)
    started = time.monotonic()
    try:
        yield
    finally:
        if left:
            signal.alarm(max(1, round(left - (time.monotonic() - started))))


def math_reward(response_text: str, gold_answer: str, *, timeout_seconds: int = 5) -> float:
    """1.0 if the response's final answer equals ``gold_answer`` per ``math_verify.verify``, else 0.0.

    ``gold_answer`` is a bare expression (``"0.5"``, ``"\\frac{1}{2}"``) or holds a ``\\boxed{}``.
    ``timeout_seconds`` bounds each parse and comparison (main thread only; see the module doc).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    answer = extract_final_answer(response_text)
    gold = _gold_text(gold_answer)
    if answer is None or not gold:
        return 0.0
    in_main = threading.current_thread() is threading.main_thread()
    limit = timeout_seconds if in_main and timeout_seconds > 0 else None
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    try:
        with _keep_outer_alarm() if in_main else nullcontext():
            gold_parsed = parse(f"${gold}$", extraction_config=configs, parsing_timeout=limit)
            pred_parsed = parse(f"${answer}$", extraction_config=configs, parsing_timeout=limit)
            if not gold_parsed or not pred_parsed:
                return 0.0
            return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=limit) else 0.0
    except (Exception, TimeoutException):
        return 0.0


@register_reward("math")
class MathReward(RewardFn):
    """``math_reward(response, meta["answer"])``; see the module docstring."""

    def __init__(self, *, timeout_seconds: int = 5):
        if not isinstance(timeout_seconds, int) or isinstance(timeout_seconds, bool) or timeout_seconds < 0:
            raise ValueError(f"MathReward.timeout_seconds={timeout_seconds!r} is invalid; valid: an "
                             f"integer >= 0 (0 disables the timeout)")
        self.timeout_seconds = timeout_seconds

    def __call__(self, prompt_text: str, response_text: str, meta: dict) -> float:
        return math_reward(response_text, str(meta["answer"]), timeout_seconds=self.timeout_seconds)
