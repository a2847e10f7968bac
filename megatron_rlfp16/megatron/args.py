"""Command-line flags for Megatron-LM: ``add_rl_args`` is an ``extra_args_provider``.

``pretrain(..., extra_args_provider=add_rl_args)`` adds the group "RL (megatron-rlfp16)" to
Megatron-LM's parser; ``loss_config_from_args(args)`` turns the parsed namespace into a validated
``PolicyLossConfig`` and ``rl_config_from_args(args)`` adds the rollout-side settings (advantage
estimator, group size, sampling temperature). Defaults are read from ``PolicyLossConfig`` itself and
choices from the loss registries at the time ``add_rl_args`` is called, so a loss registered before
that is a valid ``--rl-loss``. Imports no Megatron.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from typing import List, Optional, Union

from megatron_rlfp16.cli import add_lora_args, non_negative_int, positive_int
from megatron_rlfp16.losses import PolicyLossConfig
from megatron_rlfp16.losses.registry import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    CORRECTIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
)

GROUP_TITLE = "RL (megatron-rlfp16)"
NONE = "none"


@dataclasses.dataclass(kw_only=True)
class RLConfig:
    """The policy loss plus the settings the rollout and advantage stages share with it."""

    loss: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    """The policy loss."""
    advantage_estimator: str = "grpo"
    """Group-relative advantage estimator: "grpo", "drgrpo", "rloo" or a registered name; "gae"
    is PPO: per-token advantages from a critic the trainer trains (``TrainerConfig.critic``)."""
    gamma: float = 1.0
    """GAE's discount γ ("gae" only)."""
    lam: float = 1.0
    """GAE's λ ("gae" only)."""
    kl_in_reward: float = 0.0
    """β of the KL penalty in the token rewards ("gae" only): r_t −= β·(log π_old − log π_ref)_t
    on every response token (verl's ``use_kl_in_reward``; the KL in the loss is
    ``PolicyLossConfig.kl_coef``). π_ref is the checkpoint the run starts from. 0: off."""
    group_size: int = 8
    """Responses sampled per prompt (the group the advantage baseline is taken over)."""
    temperature: float = 1.0
    """Sampling temperature of the rollout; the trainer scores log-probs at the same temperature
    (softmax(logits / T)) so that every ratio compares the same distribution."""
    routing_replay: str = "none"
    """MoE routing replay (``megatron_rlfp16.routing``): "none" (the trainer routes itself), "r2"
    (the updates replay the experts the trainer's π_old pass chose), "r3" (every trainer forward
    replays the experts the rollout engine chose). Dense models: "none" only."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: responses longer than ``max_new_tokens - overlong_buffer``
    lose reward linearly, up to ``overlong_penalty`` at ``max_new_tokens`` (``losses.shaping``). 0: off."""
    overlong_penalty: float = 1.0
    """The punishment's scale: the reward a response of ``max_new_tokens`` tokens loses."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: groups whose rewards are all equal (no gradient under a group-relative
    estimator) are dropped and more prompts are drawn and sampled until the batch is full, for at
    most ``dynamic_sampling_rounds`` extra rollouts; after those, dropped groups fill what is left."""
    dynamic_sampling_rounds: int = 3
    """Extra rollouts per step that dynamic sampling may run."""
    mask_truncated: bool = False
    """Keep responses the rollout cut at ``max_new_tokens`` (no end token) out of the loss (DAPO's
    overlong filtering): their tokens leave the mask and the global denominators."""

    def validate(self) -> "RLConfig":
        self.loss.validate()
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(
                f"RLConfig.advantage_estimator={self.advantage_estimator!r} is invalid; valid: "
                f"{ADVANTAGE_ESTIMATORS.names()}"
            )
        for name in ("gamma", "lam"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
                raise ValueError(f"RLConfig.{name}={value!r} is invalid; valid: a number in [0, 1]")
        if not (self.kl_in_reward >= 0 and math.isfinite(self.kl_in_reward)):
            raise ValueError(f"RLConfig.kl_in_reward={self.kl_in_reward!r} is invalid; valid: a finite number >= 0")
        if self.kl_in_reward and self.advantage_estimator != "gae":
            raise ValueError(f"RLConfig.kl_in_reward={self.kl_in_reward!r} puts the KL into token rewards, which only "
                             f"the 'gae' estimator uses (this run: {self.advantage_estimator!r}); valid: 0, or "
                             "advantage_estimator='gae'; with group estimators use PolicyLossConfig.kl_coef")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"RLConfig.group_size={self.group_size!r} is invalid; valid: an int >= 1")
        from megatron_rlfp16.routing import check_replay_mode

        check_replay_mode(self.routing_replay, field="RLConfig.routing_replay")
        if isinstance(self.overlong_buffer, bool) or not isinstance(self.overlong_buffer, int) or self.overlong_buffer < 0:
            raise ValueError(f"RLConfig.overlong_buffer={self.overlong_buffer!r} is invalid; valid: an int >= 0 "
                             "(0: off)")
        if not (self.overlong_penalty >= 0 and math.isfinite(self.overlong_penalty)):
            raise ValueError(f"RLConfig.overlong_penalty={self.overlong_penalty!r} is invalid; valid: a finite "
                             "number >= 0")
        if self.dynamic_sampling not in (True, False):
            raise ValueError(f"RLConfig.dynamic_sampling={self.dynamic_sampling!r} is invalid; valid: True, False")
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError(f"RLConfig.dynamic_sampling needs groups to compare: group_size={self.group_size}; "
                             "valid: group_size >= 2")
        if (isinstance(self.dynamic_sampling_rounds, bool) or not isinstance(self.dynamic_sampling_rounds, int)
                or self.dynamic_sampling_rounds < 0):
            raise ValueError(f"RLConfig.dynamic_sampling_rounds={self.dynamic_sampling_rounds!r} is invalid; "
                             "valid: an int >= 0")
        if self.mask_truncated not in (True, False):
            raise ValueError(f"RLConfig.mask_truncated={self.mask_truncated!r} is invalid; valid: True, False")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(
                f"RLConfig.temperature={self.temperature!r} is invalid; valid: a finite number > 0"
            )
        return self


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; valid: true, false")


def _optional_float(text: str) -> Optional[float]:
    if text.strip().lower() == NONE:
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor {NONE!r}") from None


def _rejection(text: str):
    """``--rl-rejection``: "none" or ``CRITERION=BOUND[,CRITERION=BOUND...]``, BOUND a number or, for
    k1 criteria, LOWER_UPPER (verl's ``rollout_rs`` / ``rollout_rs_threshold`` spelling)."""
    if text.strip().lower() == NONE:
        return None
    spec = {}
    for item in text.split(","):
        name, sep, bound = item.strip().partition("=")
        if not sep or not name or not bound:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not CRITERION=BOUND (e.g. seq_mean_k3=0.005 or token_k1=0.5_2.0)")
        try:
            parts = [float(b) for b in bound.split("_")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{bound!r} in {item.strip()!r} is not a number or LOWER_UPPER") from None
        if len(parts) > 2:
            raise argparse.ArgumentTypeError(f"{bound!r} in {item.strip()!r} is not a number or LOWER_UPPER")
        spec[name.strip()] = parts[0] if len(parts) == 1 else tuple(parts)
    return spec


def _rejection_text(spec) -> str:
    if spec is None:
        return NONE
    return ",".join(f"{name}={'_'.join(map(repr, b)) if isinstance(b, (tuple, list)) else repr(float(b))}"
                    for name, b in spec.items())


# PolicyLossConfig field -> flag; the order is the order of --help.
_LOSS_FLAGS = {
    "loss": "--rl-loss",
    "clip_low": "--rl-clip-low",
    "clip_high": "--rl-clip-high",
    "dual_clip": "--rl-dual-clip",
    "correction": "--rl-correction",
    "correction_cap": "--rl-correction-cap",
    "correction_floor": "--rl-correction-floor",
    "correction_veto": "--rl-correction-veto",
    "rejection": "--rl-rejection",
    "rejection_mode": "--rl-rejection-mode",
    "correction_normalize": "--rl-correction-normalize",
    "agg": "--rl-agg",
    "norm_length": "--rl-norm-length",
    "kl_coef": "--rl-kl-coef",
    "kl_estimator": "--rl-kl-estimator",
    "entropy_coef": "--rl-entropy-coef",
}
_RL_FLAGS = {
    "advantage_estimator": "--rl-advantage-estimator",
    "group_size": "--rl-group-size",
    "gamma": "--rl-gamma",
    "lam": "--rl-lam",
    "kl_in_reward": "--rl-kl-in-reward",
    "temperature": "--rl-temperature",
    "routing_replay": "--rl-routing-replay",
    "overlong_buffer": "--rl-overlong-buffer",
    "overlong_penalty": "--rl-overlong-penalty",
    "mask_truncated": "--rl-mask-truncated",
    "dynamic_sampling": "--rl-dynamic-sampling",
    "dynamic_sampling_rounds": "--rl-dynamic-sampling-rounds",
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_rl_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the "RL (megatron-rlfp16)" flags to ``parser`` and returns it (Megatron-LM's
    ``extra_args_provider`` contract), with the "LoRA (megatron-rlfp16)" group (``--lora-*``,
    ``cli.lora_config_from_args``)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PolicyLossConfig)}
    defaults.update({f.name: f.default for f in dataclasses.fields(RLConfig) if f.name != "loss"})
    g = parser.add_argument_group(
        title=GROUP_TITLE,
        description="RL policy loss and rollout settings (PolicyLossConfig / RLConfig; see docs/losses.md).",
    )

    def add(flag, field, text, **kwargs):
        shown = NONE if defaults[field] is None else defaults[field]
        g.add_argument(flag, dest=_dest(flag), default=defaults[field], help=f"{text} (default: {shown})",
                       **kwargs)

    add("--rl-loss", "loss", "per-token policy objective", choices=POLICY_LOSSES.names())
    add("--rl-clip-low", "clip_low", "lower ratio clip: ratios below 1 - clip_low are clipped", type=float)
    add("--rl-clip-high", "clip_high", "upper ratio clip: ratios above 1 + clip_high are clipped", type=float)
    add("--rl-dual-clip", "dual_clip", "dual-clip constant c > 1 for ppo_clip, or none",
        type=_optional_float, metavar="C|none")
    add("--rl-correction", "correction", "rollout (training-inference mismatch) correction",
        choices=(NONE,) + CORRECTIONS.names())
    add("--rl-correction-cap", "correction_cap", "cap C on the importance weight (inf = uncapped), or none "
        "for the correction's default (icepop: 5, others: 2)", type=_optional_float, metavar="C|none")
    add("--rl-correction-floor", "correction_floor", "lower bound F of the masks (token_mis, seq_mis, "
        "geo_seq_mis, icepop): weights below it are dropped too; none: the correction's default (icepop: "
        "0.5, others: 0)", type=_optional_float, metavar="F|none")
    add("--rl-correction-veto", "correction_veto", "veto threshold: a sequence with any token ratio below it "
        "gets weight 0, or none", type=_optional_float, metavar="T|none")
    add("--rl-rejection", "rejection", "divergence rejection: CRITERION=BOUND[,...] with criteria token_k1.."
        "seq_max_k3 (e.g. seq_mean_k3=0.005, token_k1=0.5_2.0), or none", type=_rejection,
        metavar="SPEC|none")
    add("--rl-rejection-mode", "rejection_mode", "zero: rejected tokens get weight 0 and stay in the "
        "denominators; remove: they leave the loss mask and the denominators", choices=("zero", "remove"))
    add("--rl-correction-normalize", "correction_normalize", "divide the importance weights by their batch "
        "mean (true/false)", type=_boolean, metavar="true|false")
    add("--rl-agg", "agg", "aggregation of per-token losses (global denominators)",
        choices=AGGREGATIONS.names())
    add("--rl-norm-length", "norm_length",
        "constant length L for seq-mean-token-sum-norm, or none (padded T)",
        type=_optional_float, metavar="L|none")
    add("--rl-kl-coef", "kl_coef", "weight of the KL penalty to the reference policy", type=float)
    add("--rl-kl-estimator", "kl_estimator", "per-token KL estimator", choices=KL_ESTIMATORS.names())
    add("--rl-entropy-coef", "entropy_coef", "weight of the entropy bonus", type=float)
    add("--rl-advantage-estimator", "advantage_estimator", "advantage estimator: group-relative (grpo, "
        "drgrpo, rloo) or gae (PPO: the trainer trains a critic)",
        choices=ADVANTAGE_ESTIMATORS.names())
    add("--rl-group-size", "group_size", "responses sampled per prompt", type=positive_int)
    add("--rl-gamma", "gamma", "GAE discount (advantage estimator gae)", type=float)
    add("--rl-lam", "lam", "GAE lambda (advantage estimator gae)", type=float)
    add("--rl-kl-in-reward", "kl_in_reward", "beta of the KL to the reference in the token rewards (advantage "
        "estimator gae)", type=float)
    add("--rl-temperature", "temperature", "sampling temperature; log-probs are scored at the same T",
        type=float)
    add("--rl-routing-replay", "routing_replay", "MoE routing replay: none, r2 (updates replay the "
        "trainer's pi_old routing), r3 (every trainer forward replays the rollout engine's routing)",
        choices=("none", "r2", "r3"))
    add("--rl-overlong-buffer", "overlong_buffer", "DAPO soft overlong punishment: the last N tokens before "
        "--max-new-tokens cost reward linearly (0: off)", type=non_negative_int)
    add("--rl-overlong-penalty", "overlong_penalty", "the reward a response of --max-new-tokens tokens loses",
        type=float)
    add("--rl-dynamic-sampling", "dynamic_sampling", "DAPO dynamic sampling: drop groups whose rewards are all "
        "equal and sample more prompts to fill the batch (true/false)", type=_boolean, metavar="true|false")
    add("--rl-dynamic-sampling-rounds", "dynamic_sampling_rounds", "extra rollouts per step dynamic sampling "
        "may run", type=non_negative_int)
    add("--rl-mask-truncated", "mask_truncated", "keep responses cut at --max-new-tokens out of the loss "
        "(true/false)", type=_boolean, metavar="true|false")
    return add_lora_args(parser)


def _reraise_with_flag(err: ValueError, flags: dict, prefix: str) -> ValueError:
    match = re.match(rf"{prefix}\.(\w+)\b", str(err))
    flag = flags.get(match.group(1)) if match else None
    return ValueError(f"{flag}: {err}" if flag else str(err))


def loss_config_from_args(args: argparse.Namespace) -> PolicyLossConfig:
    """The validated ``PolicyLossConfig`` of parsed ``--rl-*`` flags; a bad value raises ValueError
    naming the flag, the value and what is valid."""
    missing = [flag for flag in _LOSS_FLAGS.values() if not hasattr(args, _dest(flag))]
    if missing:
        raise ValueError(f"args lacks {missing}: was the parser built with add_rl_args?")
    try:
        values = {field: getattr(args, _dest(flag)) for field, flag in _LOSS_FLAGS.items()}
        if values["correction"] == NONE:
            values["correction"] = None
        return PolicyLossConfig(**values)
    except ValueError as err:
        raise _reraise_with_flag(err, _LOSS_FLAGS, "PolicyLossConfig") from None


def rl_config_from_args(args: argparse.Namespace) -> RLConfig:
    """``RLConfig`` (loss config plus advantage estimator, group size, temperature) of parsed flags."""
    loss = loss_config_from_args(args)
    try:
        return RLConfig(loss=loss, **{field: getattr(args, _dest(flag)) for field, flag in _RL_FLAGS.items()}
                        ).validate()
    except ValueError as err:
        raise _reraise_with_flag(err, _RL_FLAGS, "RLConfig") from None


def rl_argv(config: Union[PolicyLossConfig, RLConfig]) -> List[str]:
    """The ``--rl-*`` command line that parses back to ``config`` (e.g. to launch a Megatron-LM job)."""
    argv: List[str] = []
    loss = config.loss if isinstance(config, RLConfig) else config
    for field, flag in _LOSS_FLAGS.items():
        value = getattr(loss, field)
        if field == "rejection":
            argv += [flag, _rejection_text(value)]
            continue
        argv += [flag, NONE if value is None else repr(value) if isinstance(value, float) else str(value)]
    if isinstance(config, RLConfig):
        for field, flag in _RL_FLAGS.items():
            value = getattr(config, field)
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv
