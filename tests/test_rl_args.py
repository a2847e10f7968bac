"""``add_rl_args`` as a Megatron-LM ``extra_args_provider``: defaults, round trips, clear errors."""
import argparse
import math
import subprocess
import sys

import pytest

from megatron_rlfp16.losses import PolicyLossConfig
from megatron_rlfp16.megatron import (
    GROUP_TITLE,
    RLConfig,
    add_rl_args,
    loss_config_from_args,
    rl_argv,
    rl_config_from_args,
)

FLAGS = [
    "--rl-loss", "--rl-clip-low", "--rl-clip-high", "--rl-dual-clip", "--rl-correction",
    "--rl-correction-cap", "--rl-correction-floor", "--rl-correction-veto", "--rl-rejection",
    "--rl-rejection-mode", "--rl-correction-normalize", "--rl-agg", "--rl-norm-length", "--rl-kl-coef",
    "--rl-kl-estimator", "--rl-entropy-coef", "--rl-advantage-estimator", "--rl-group-size", "--rl-gamma", "--rl-lam", "--rl-kl-in-reward",
    "--rl-temperature", "--rl-routing-replay", "--rl-overlong-buffer", "--rl-overlong-penalty",
    "--rl-dynamic-sampling", "--rl-dynamic-sampling-rounds", "--rl-mask-truncated",
]


def megatron_like_parser() -> argparse.ArgumentParser:
    """What Megatron-LM's parse_args hands to an extra_args_provider: its own flags already added."""
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    returned = add_rl_args(parser)
    assert returned is parser
    return parser


def parse(argv):
    return megatron_like_parser().parse_args(argv)


def test_group_and_flags_exist():
    parser = megatron_like_parser()
    groups = {g.title: g for g in parser._action_groups}
    assert GROUP_TITLE == "RL (megatron-rlfp16)" and GROUP_TITLE in groups
    assert sorted(o for a in groups[GROUP_TITLE]._group_actions for o in a.option_strings) == sorted(FLAGS)


def test_defaults_equal_policy_loss_config():
    args = parse(["--lr", "1e-6"])
    assert loss_config_from_args(args) == PolicyLossConfig()
    assert rl_config_from_args(args) == RLConfig()
    assert args.lr == 1e-6  # Megatron's own flags are untouched


def test_explicit_command_line():
    args = parse([
        "--rl-loss", "pg", "--rl-correction", "seq_tis", "--rl-correction-cap", "inf",
        "--rl-agg", "seq-mean-token-sum-norm", "--rl-norm-length", "4096", "--rl-dual-clip", "3",
        "--rl-kl-coef", "0.04", "--rl-kl-estimator", "k2", "--rl-entropy-coef", "0.001",
        "--rl-clip-low", "0.1", "--rl-clip-high", "0.28", "--rl-advantage-estimator", "rloo",
        "--rl-group-size", "16", "--rl-temperature", "0.7",
    ])
    cfg = rl_config_from_args(args)
    assert cfg.loss == PolicyLossConfig(
        loss="pg", correction="seq_tis", correction_cap=math.inf, agg="seq-mean-token-sum-norm",
        norm_length=4096.0, dual_clip=3.0, kl_coef=0.04, kl_estimator="k2", entropy_coef=0.001,
        clip_low=0.1, clip_high=0.28,
    )
    assert (cfg.advantage_estimator, cfg.group_size, cfg.temperature) == ("rloo", 16, 0.7)


def test_rejection_flags_take_verls_spelling():
    """verl's rollout_rs=token_k1,seq_mean_k3 with rollout_rs_threshold=0.5_2.0,0.005 in one flag."""
    args = parse(["--rl-correction", "token_tis", "--rl-rejection", "token_k1=0.5_2.0, seq_mean_k3=0.005",
                  "--rl-rejection-mode", "remove", "--rl-correction-normalize", "true"])
    cfg = loss_config_from_args(args)
    assert cfg.rejection == {"token_k1": (0.5, 2.0), "seq_mean_k3": 0.005}
    assert (cfg.rejection_mode, cfg.correction_normalize) == ("remove", True)
    assert cfg.band() == (0.0, 2.0) and cfg.correction_cap is None
    assert loss_config_from_args(parse(["--rl-correction", "icepop"])).band() == (0.5, 5.0)


@pytest.mark.parametrize("value, words", [
    ("token_k1", "is not CRITERION=BOUND"),
    ("token_k1=a_b", "'a_b' in 'token_k1=a_b' is not a number or LOWER_UPPER"),
    ("token_k1=1_2_3", "is not a number or LOWER_UPPER"),
])
def test_bad_rejection_flag(value, words, capsys):
    with pytest.raises(SystemExit):
        parse(["--rl-rejection", value])
    assert words in capsys.readouterr().err


def test_bad_rejection_bound_names_the_flag():
    with pytest.raises(ValueError, match=r"--rl-rejection: PolicyLossConfig.rejection\['token_k2'\]=-1.0"):
        loss_config_from_args(parse(["--rl-rejection", "token_k2=-1"]))


def test_none_is_accepted_for_optional_fields():
    args = parse(["--rl-correction", "none", "--rl-dual-clip", "none", "--rl-norm-length", "None"])
    cfg = loss_config_from_args(args)
    assert cfg.correction is None and cfg.dual_clip is None and cfg.norm_length is None


@pytest.mark.parametrize("config", [
    PolicyLossConfig(),
    PolicyLossConfig(loss="gspo", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean"),
    PolicyLossConfig(loss="pg", correction="seq_tis", correction_cap=float("inf")),
    PolicyLossConfig(loss="ppo_clip", dual_clip=3.0, correction="icepop", correction_cap=2.0,
                     correction_floor=0.5, kl_coef=0.04, entropy_coef=1e-3, agg="seq-mean-token-sum-norm",
                     norm_length=1024.0),
    PolicyLossConfig(correction="token_tis", rejection={"token_k1": (0.5, 2.0), "seq_mean_k3": 0.005},
                     rejection_mode="remove", correction_normalize=True),
    PolicyLossConfig(correction="icepop", rejection={"seq_max_k2": 2.5}),
    RLConfig(loss=PolicyLossConfig(loss="cispo", clip_low=0.99, clip_high=1.0), advantage_estimator="drgrpo",
             group_size=4, temperature=0.6),
])
def test_round_trip(config):
    args = parse(rl_argv(config))
    got = rl_config_from_args(args) if isinstance(config, RLConfig) else loss_config_from_args(args)
    assert got == config


@pytest.mark.parametrize("argv,flag,valid", [
    (["--rl-loss", "ppo"], "--rl-loss", "ppo_clip"),
    (["--rl-agg", "mean"], "--rl-agg", "token-mean"),
    (["--rl-correction", "tis"], "--rl-correction", "token_tis"),
    (["--rl-kl-estimator", "k4"], "--rl-kl-estimator", "k3"),
    (["--rl-advantage-estimator", "ppo"], "--rl-advantage-estimator", "grpo"),
    (["--rl-clip-low", "abc"], "--rl-clip-low", "float"),
    (["--rl-dual-clip", "big"], "--rl-dual-clip", "none"),
])
def test_unparseable_values_exit_naming_flag_and_choices(argv, flag, valid, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    err = capsys.readouterr().err
    assert flag in err and valid in err, err


@pytest.mark.parametrize("argv,flag,value", [
    (["--rl-clip-low", "1.5"], "--rl-clip-low", "1.5"),
    (["--rl-clip-high", "-0.1"], "--rl-clip-high", "-0.1"),
    (["--rl-dual-clip", "0.5"], "--rl-dual-clip", "0.5"),
    (["--rl-correction-cap", "0"], "--rl-correction-cap", "0"),
    (["--rl-correction-floor", "3", "--rl-correction-cap", "2"], "--rl-correction-floor", "3"),
    (["--rl-norm-length", "-1"], "--rl-norm-length", "-1"),
    (["--rl-kl-coef", "nan"], "--rl-kl-coef", "nan"),
])
def test_invalid_loss_values_name_the_flag(argv, flag, value):
    with pytest.raises(ValueError) as info:
        loss_config_from_args(parse(argv))
    message = str(info.value)
    assert message.startswith(flag) and value in message and "valid" in message, message


@pytest.mark.parametrize("argv,flag", [
    (["--rl-temperature", "0"], "--rl-temperature"),
    (["--rl-temperature", "inf"], "--rl-temperature"),
])
def test_invalid_rollout_values_name_the_flag(argv, flag):
    with pytest.raises(ValueError, match=f"^{flag}: .*valid"):
        rl_config_from_args(parse(argv))


def test_a_group_size_below_one_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse(["--rl-group-size", "0"])
    assert info.value.code == 2
    assert "argument --rl-group-size: 0 is invalid; valid: an integer >= 1" in capsys.readouterr().err


def test_namespace_without_rl_flags_is_reported():
    with pytest.raises(ValueError, match="add_rl_args"):
        loss_config_from_args(argparse.Namespace(lr=1.0))


def test_package_import_does_not_import_megatron():
    code = (
        "import argparse, sys\n"
        "import megatron_rlfp16.megatron as m\n"
        "m.loss_config_from_args(m.add_rl_args(argparse.ArgumentParser()).parse_args([]))\n"
        "loaded = sorted(k for k in sys.modules if k == 'megatron' or k.startswith('megatron.'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_routing_replay_flag_and_its_errors():
    assert rl_config_from_args(parse([])).routing_replay == "none"
    assert rl_config_from_args(parse(["--rl-routing-replay", "r3"])).routing_replay == "r3"
    with pytest.raises(SystemExit):
        parse(["--rl-routing-replay", "r4"])
    with pytest.raises(ValueError, match=r"RLConfig.routing_replay='R3'; valid: none, r2, r3"):
        RLConfig(routing_replay="R3").validate()
