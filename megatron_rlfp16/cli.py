"""Argument types shared by the command-line entry points (torch-free: parsing comes first).

A size given on the command line is checked when it is parsed, so that ``--tp 0`` or
``--prompts-per-step -4`` is a usage error naming the flag before any rank starts or file is read:
argparse prints ``argument --tp: 0 is invalid; valid: an integer >= 1`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Optional


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (a parallel size, a count of steps, prompts or tokens)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; valid: an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (an interval where 0 means "never")."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is invalid; valid: an integer >= 0")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a temperature, a size in GiB)."""
    value = _number(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text} is invalid; valid: a finite number > 0")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1] (a share of GPU memory)."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} is invalid; valid: a number in (0, 1]")
    return value


def with_flag(message: str) -> str:
    """Prefixes a config error with the flag that sets the field it names, where the entry points
    map one flag to one field: ``RunConfig.micro_batch_size=5 ...`` becomes
    ``--micro-batch-size: RunConfig.micro_batch_size=5 ...`` (``RolloutConfig.x`` ↔ ``--rollout-x``)."""
    m = re.match(r"(RolloutConfig|RunConfig|TrainerConfig\.parallel|ParallelConfig|PromptConfig|MemoryConfig|"
                 r"LoraConfig|CriticConfig)\.(\w+)[=:]", message)
    if not m:
        return message
    prefix = {"RolloutConfig": "--rollout-", "LoraConfig": "--lora-", "CriticConfig": "--critic-"}.get(m.group(1), "--")
    return f"{prefix}{m.group(2).replace('_', '-')}: {message}"


def check_output_dir(path: str, flag: str, *, overwrite: Optional[bool] = None) -> None:
    """An output directory, checked before any work: it must not be an existing file, must be
    creatable or writable, and (when ``overwrite`` is given) may exist only with ``--overwrite``.
    Raises ValueError / FileExistsError naming ``flag`` and the path."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} exists and is not a directory; give a directory")
    if overwrite is False and os.path.exists(path):
        raise FileExistsError(f"{flag} {path!r} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    target = path if os.path.isdir(path) else parent
    if not os.access(target, os.W_OK):
        raise ValueError(f"{flag} {path!r}: {target!r} is not writable")


def module_list(text: str) -> tuple:
    """A comma-separated list of HF module names (``q_proj,v_proj``)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no module; valid: a comma-separated list such as q_proj,v_proj")
    return names


def dropout_fraction(text: str) -> float:
    """A number in [0, 1) (a dropout probability)."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is invalid; valid: a number in [0, 1)")
    return value


def add_lora_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The LoRA flags (``lora.LoraConfig``; docs/lora.md); ``lora_config_from_args`` reads them back."""
    g = parser.add_argument_group(title="LoRA (megatron-rlfp16)",
                                  description="low-rank adapters instead of full fine-tuning (docs/lora.md)")
    g.add_argument("--lora-rank", type=non_negative_int, default=0, metavar="R",
                   help="adapter rank; 0 (default): full fine-tuning")
    g.add_argument("--lora-alpha", type=positive_float, default=None, metavar="A",
                   help="the update is (alpha / rank) * B * A (default: 2 x rank)")
    g.add_argument("--lora-dropout", type=dropout_fraction, default=0.0, metavar="P",
                   help="dropout on the adapters' input (default 0; needs --tp 1)")
    g.add_argument("--lora-target-modules", type=module_list, default=None, metavar="M,M",
                   help="HF modules to adapt, of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
                        "(default: all the model supports; attention only for MoE)")
    g.add_argument("--lora-sync", choices=["adapter", "merged"], default=None,
                   help="how the engine gets the weights: adapter (only the adapters move; default where vLLM "
                        "serves LoRA for the family) or merged (W + scale*B*A through the full refit)")
    return parser


def lora_config_from_args(args: argparse.Namespace):
    """The validated ``LoraConfig`` of parsed ``--lora-*`` flags; a bad value raises ValueError naming
    the flag (checks that need the model, such as MoE experts, come with the run plan)."""
    from megatron_rlfp16.lora.config import LoraConfig

    config = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules, sync=args.lora_sync)
    try:
        return config.validate()
    except ValueError as err:
        raise ValueError(with_flag(str(err))) from None


def add_critic_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The PPO critic's flags (``megatron.critic.CriticConfig``; used with ``--rl-advantage-estimator
    gae``); ``critic_config_from_args`` reads them back."""
    g = parser.add_argument_group(title="PPO critic (megatron-rlfp16)",
                                  description="the value model trained with --rl-advantage-estimator gae "
                                              "(docs/losses.md)")
    g.add_argument("--critic-hf-dir", default=None, metavar="DIR",
                   help="HF checkpoint the critic starts from (default: the policy's)")
    g.add_argument("--critic-lr", type=positive_float, default=None, help="critic learning rate (default: --lr)")
    g.add_argument("--critic-value-clip", type=positive_float, default=0.2, metavar="C",
                   help="clip of the value loss (default 0.2)")
    g.add_argument("--critic-warmup-steps", type=non_negative_int, default=0, metavar="N",
                   help="first N steps train only the critic (default 0)")
    return parser


def critic_config_from_args(args: argparse.Namespace):
    """The validated ``CriticConfig`` of parsed ``--critic-*`` flags."""
    from megatron_rlfp16.megatron.critic import CriticConfig

    config = CriticConfig(hf_dir=args.critic_hf_dir, lr=args.critic_lr, value_clip=args.critic_value_clip,
                          warmup_steps=args.critic_warmup_steps)
    try:
        return config.validate()
    except ValueError as err:
        raise ValueError(with_flag(str(err))) from None


def add_checkpoint_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The checkpoint and resume flags every training entry point takes (``RunConfig.save_every``,
    ``RunConfig.keep_checkpoints``, ``TrainerConfig.allow_changed_settings``, ``resume``)."""
    parser.add_argument("--save-every", type=non_negative_int, default=None, metavar="N",
                        help="checkpoint every N steps (0: only at the end; default: a tenth of --steps)")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=1, metavar="K",
                        help="checkpoints kept: the latest as out/checkpoint, K-1 older as checkpoint.step-N")
    parser.add_argument("--allow-changed-settings", action="store_true",
                        help="resume a checkpoint saved with another precision, model, loss or layout "
                             "(a deliberate ablation; recorded in metrics.jsonl)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if out/checkpoint exists")
    return parser
