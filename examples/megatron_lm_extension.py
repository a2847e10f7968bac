"""Using megatron-rlfp16 from an existing Megatron-LM training script (documentation you can run).

Four pieces plug into Megatron-LM's ``pretrain``-style loop; nothing else in the script changes:

1. Flags: ``extra_args_provider=add_rl_args`` adds the "RL (megatron-rlfp16)" group (``--rl-loss``,
   ``--rl-correction``, ...); ``loss_config_from_args`` turns them into a validated ``PolicyLossConfig``.
2. Precision: one ``PrecisionConfig`` yields the ``TransformerConfig`` overrides, the DDP settings and
   the ``OptimizerConfig`` (FP16 with dynamic loss scaling and FP32 islands) and vLLM's engine kwargs,
   so trainer and rollout cannot silently disagree.
3. Loss: ``make_forward_step(loss_config, global_counts(...))`` is a ``forward_step_func`` for
   ``forward_backward_func``; the denominators are counted over the whole step and all DP ranks
   *before* the first micro-batch, so the loss does not depend on how the step is split.
4. Weights out: ``export_hf(model, arch)`` streams full HF tensors (collective; every rank iterates)
   into a vLLM engine (``RolloutEngine.update_weights``), or
   ``tools/convert_checkpoint.py export`` writes a Megatron checkpoint as HF safetensors.

    python examples/megatron_lm_extension.py --help                 # the flags a user script gains
    python examples/megatron_lm_extension.py --rl-loss ppo_clip --rl-correction token_tis --show
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlfp16.megatron.args import add_rl_args, loss_config_from_args  # noqa: E402
from megatron_rlfp16.precision import Precision, PrecisionConfig  # noqa: E402


def precision_settings(precision: str) -> dict:
    """What a Megatron-LM script takes from ``PrecisionConfig`` (CPU-safe: builds config objects only)."""
    pc = PrecisionConfig(trainer=precision)
    return dict(
        transformer=pc.transformer_overrides(),     # -> TransformerConfig(**..., **overrides)
        ddp=pc.ddp_kwargs(),                          # -> DistributedDataParallelConfig(**...)
        optimizer=pc.optimizer_config(lr=1e-6),       # -> get_megatron_optimizer(config, model)
        vllm=pc.vllm_kwargs(),                        # -> vllm.LLM(model=hf_dir, **...)
    )


def train_step_sketch(model, arch, micro_batches, args, forward_backward_func, optimizer, engine=None):
    """One RL optimizer step in a Megatron-LM loop (not run here: it needs a built model).

    ``micro_batches`` are this rank's dicts from ``megatron_rlfp16.megatron.batch`` (input_ids,
    loss_mask, advantages, old/rollout log-probs). Megatron-LM's default loss convention
    (``--calculate-per-token-loss`` off) is the one the loss function returns, ``(M·D·loss, metrics)``.
    """
    from megatron.core import parallel_state as ps

    from megatron_rlfp16.bridge import export_hf
    from megatron_rlfp16.megatron.loss_func import global_counts, make_forward_step

    loss_config = loss_config_from_args(args)
    counts = global_counts(micro_batches, dp_group=ps.get_data_parallel_group())  # before any forward
    forward_step = make_forward_step(loss_config, counts, vocab_size=arch.vocab_size,
                                     temperature=args.rl_temperature)
    forward_backward_func(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=micro_batches[0]["input_ids"].shape[1],
        micro_batch_size=micro_batches[0]["input_ids"].shape[0], forward_only=False,
    )
    update_ok, grad_norm, _ = optimizer.step()  # FP16: an overflowing step is skipped, scale backs off
    if engine is not None:  # refit the colocated rollout engine (megatron_rlfp16.rollout.RolloutEngine)
        engine.update_weights(export_hf(model, arch, dtype=Precision.parse(args.precision).torch_dtype))
    return update_ok, grad_norm


def main(argv=None) -> int:
    # Megatron-LM: pretrain(..., extra_args_provider=add_rl_args) calls exactly this on its parser.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default=Precision.FP16.value, choices=Precision.names())
    parser.add_argument("--show", action="store_true", help="print the loss and precision settings")
    args = add_rl_args(parser).parse_args(argv)
    loss_config = loss_config_from_args(args)  # raises ValueError naming the bad --rl-* flag
    if args.show:
        print("PolicyLossConfig:", loss_config)
        for name, value in precision_settings(args.precision).items():
            print(f"{name}:", value)
        print("convert: python tools/convert_checkpoint.py export --megatron-dir CKPT --hf-dir OUT "
              "--dtype float16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
