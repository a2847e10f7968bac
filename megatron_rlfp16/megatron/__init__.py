"""Megatron integration of the RL loss: forward step, loss function, train step, recompute, flags.

Importing this package imports no Megatron (every Megatron import is inside a function), so
``add_rl_args`` and the configs work on a machine without megatron-core.

- ``args.py``       ``add_rl_args`` (Megatron-LM ``extra_args_provider``), ``loss_config_from_args``
- ``batch.py``      the micro-batch dict: keys, shapes, defaults
- ``loss_func.py``  ``global_counts``, ``logprobs_head``, ``rl_loss_func``, ``make_forward_step``
- ``train.py``      ``wrap_ddp``, ``train_step``: one step's forward + backward over micro-batches
- ``recompute.py``  ``compute_logprobs``: forward-only log-probs on every rank
- ``critic.py``     PPO's critic: ``make_critic`` (a value head on a ``GPTModel``), ``compute_values``,
                    ``critic_train_step``, ``CriticConfig``
"""
from megatron_rlfp16.megatron.args import (
    GROUP_TITLE,
    RLConfig,
    add_rl_args,
    loss_config_from_args,
    rl_argv,
    rl_config_from_args,
)
from megatron_rlfp16.megatron.batch import check_micro_batches, split
from megatron_rlfp16.megatron.loss_func import (
    GlobalCounts,
    global_counts,
    logprobs_head,
    make_forward_step,
    rl_loss_func,
    token_logprobs,
)
from megatron_rlfp16.megatron.recompute import compute_logprobs
from megatron_rlfp16.megatron.train import reduce_metrics, train_step, wrap_ddp

__all__ = [
    "GROUP_TITLE", "GlobalCounts", "RLConfig", "add_rl_args", "check_micro_batches", "compute_logprobs",
    "global_counts", "logprobs_head", "loss_config_from_args", "make_forward_step", "reduce_metrics",
    "rl_argv", "rl_config_from_args", "rl_loss_func", "split", "token_logprobs", "train_step", "wrap_ddp",
]
