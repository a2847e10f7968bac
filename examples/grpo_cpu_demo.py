"""The embedded default: GRPO in FP16 on CPU, Megatron TP=2 training beside a colocated vLLM engine.

    torchrun --nproc_per_node=2 examples/grpo_cpu_demo.py --out runs/demo [--precision fp16|bf16]
                                                        [--model qwen3_moe --tp 1 --ep 2 --rollout-tp 1
                                                         --routing-replay r3] [--lora-rank 8]

1. A synthetic task ("reverse: 3 1 4 =" -> "4 1 3") and a SentencePiece tokenizer fitted to it.
2. A tiny random Llama-shaped model (or a Qwen3-MoE with ``--model qwen3_moe``) written as an HF
   checkpoint, loaded by Megatron (TP=2 by default) and vLLM.
3. A short supervised warm start so that sampling gets some answers right.
4. GRPO (PPO-clip, GRPO advantages, token-TIS correction) with the trainer and the rollout engine
   in the same precision; the weights go into vLLM through the bridge after every step.
   With ``--algo ppo`` the advantages are GAE's, from a critic (a value head on the same model,
   trained beside the policy with its own optimizer and loss scale).
   With ``--lora-rank R`` the model is first pretrained in full on another task (``copy``: "copy: 3 1 4 ="
   -> "3 1 4"), and that frozen base learns ``reverse`` through rank-R adapters: the warm start and
   GRPO train only the adapters, and only the adapters move into vLLM (docs/lora.md).
5. ``out/metrics.jsonl``, ``out/summary.json`` and ``out/curves.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlfp16.cli import (  # noqa: E402
    add_checkpoint_args, add_critic_args, add_lora_args, check_output_dir, critic_config_from_args,
    lora_config_from_args, non_negative_int, positive_float, positive_int, with_flag,
)
from megatron_rlfp16.precision.dtypes import Precision  # noqa: E402

WARM_START_STEPS = 60
"""Supervised steps of the whole model before GRPO (the reward then starts near 0.75 at T=1)."""
WARM_START_LR = 1e-3
LORA_WARM_START_LR = 3e-3
LORA_WARM_START_UNTIL_LOSS = 0.3
LORA_BASE_TASKS = ("copy", "sort", "reverse")
LORA_BASE_STEPS = 200
"""Supervised steps of the LoRA base's pretraining on ``--lora-base-task`` (whole model, no engine)."""
LORA_WARM_START_STEPS = 300


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--precision", default=Precision.FP16.value, choices=Precision.names(),
                   help="trainer and rollout precision (the same for both)")
    p.add_argument("--steps", type=positive_int, default=100, help="GRPO steps")
    p.add_argument("--warm-start-steps", type=non_negative_int, default=None,
                   help=f"supervised steps on the task before RL (default {WARM_START_STEPS}; with --lora-rank, "
                        f"of the adapters: {LORA_WARM_START_STEPS})")
    p.add_argument("--warm-start-lr", type=positive_float, default=None,
                   help=f"learning rate of the warm start (default {WARM_START_LR:g}; with --lora-rank {LORA_WARM_START_LR:g}: "
                        f"adapters take larger steps)")
    p.add_argument("--warm-start-until-loss", type=positive_float, default=None,
                   help="end the warm start early once a step's loss (mean NLL of the answer tokens) is at or below "
                        "this; --warm-start-steps is then the most it may take (default: none; with --lora-rank "
                        f"{LORA_WARM_START_UNTIL_LOSS:g})")
    p.add_argument("--lora-base-task", default=None, choices=LORA_BASE_TASKS,
                   help=f"with --lora-rank: the task the base model is pretrained on in full before the adapters "
                        f"learn the demo's (default {LORA_BASE_TASKS[0]}; 'reverse' adapts a base warm-started on the "
                        f"demo's own task)")
    p.add_argument("--lora-base-steps", type=positive_int, default=None,
                   help=f"with --lora-rank: supervised steps of that pretraining (default {LORA_BASE_STEPS})")
    p.add_argument("--prompts-per-step", type=positive_int, default=16)
    p.add_argument("--group-size", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=3e-4)
    p.add_argument("--updates-per-step", type=positive_int, default=2,
                   help="optimizer steps per rollout (PPO mini-batches; the clip matters from the 2nd on)")
    p.add_argument("--micro-batch-size", type=positive_int, default=32, help="sequences per forward/backward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="llama", choices=["llama", "qwen3_moe"],
                   help="the tiny model's family: dense Llama or a 4-expert top-2 Qwen3-MoE")
    p.add_argument("--tp", type=positive_int, default=2, help="training tensor parallelism")
    p.add_argument("--ep", type=positive_int, default=1, help="training expert parallelism (MoE)")
    p.add_argument("--rollout-tp", type=positive_int, default=None,
                   help="rollout engine tensor parallelism (default: --tp); other ranks run replicas")
    p.add_argument("--routing-replay", default="none", choices=["none", "r2", "r3"],
                   help="MoE routing replay: r3 replays the rollout engine's experts in every trainer "
                        "forward, r2 the trainer's own pi_old routing in the updates (docs/rollout.md)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="the trainer's state in host memory while the engine samples (default: on with a GPU)")
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="with --offload, master weights and Adam moments also stay in host memory outside each "
                        "optimizer step (default: on when offloading and the run fits the device only this way)")
    p.add_argument("--algo", default="grpo", choices=["grpo", "ppo"],
                   help="grpo: group-relative advantages; ppo: GAE advantages from a critic trained beside the "
                        "policy (the --critic-* flags)")
    p.add_argument("--gamma", type=float, default=1.0, help="GAE discount (--algo ppo)")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda (--algo ppo)")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="KL penalty to the reference (the embedded model before the warm start) in the loss")
    p.add_argument("--kl-in-reward", type=float, default=0.0,
                   help="KL penalty to the reference in the token rewards (--algo ppo)")
    add_critic_args(add_lora_args(add_checkpoint_args(p)))
    args = p.parse_args(argv)
    if not args.lora_rank:
        for flag in ("lora_base_task", "lora_base_steps"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} is for a LoRA run; valid: with --lora-rank R (R >= 1)")
    else:
        args.lora_base_task = args.lora_base_task or LORA_BASE_TASKS[0]
        args.lora_base_steps = args.lora_base_steps or LORA_BASE_STEPS
    if args.warm_start_steps is None:
        args.warm_start_steps = LORA_WARM_START_STEPS if args.lora_rank else WARM_START_STEPS
    if args.warm_start_until_loss is None and args.lora_rank:
        args.warm_start_until_loss = LORA_WARM_START_UNTIL_LOSS
    if args.warm_start_lr is None:
        args.warm_start_lr = LORA_WARM_START_LR if args.lora_rank else WARM_START_LR
    return args


def build_config(args, hf_dir: str):
    """The run's ``TrainerConfig`` from the flags (nothing built, no torch.distributed)."""
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron.args import RLConfig
    from megatron_rlfp16.plan.memory import MemoryConfig
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.rollout import RolloutConfig
    from megatron_rlfp16.runtime import ParallelConfig
    from megatron_rlfp16.trainer import RunConfig, TrainerConfig

    return TrainerConfig(
        hf_dir=hf_dir, out_dir=args.out, parallel=ParallelConfig(tp=args.tp, ep=args.ep),
        rollout=RolloutConfig(tp=args.rollout_tp), resume=not args.no_resume,
        run=RunConfig(steps=args.steps, prompts_per_step=args.prompts_per_step, max_new_tokens=6,
                      micro_batch_size=args.micro_batch_size, updates_per_step=args.updates_per_step, lr=args.lr,
                      seed=args.seed, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints),
        rl=RLConfig(loss=PolicyLossConfig(loss="ppo_clip", correction="token_tis", correction_cap=2.0,
                                          kl_coef=args.kl_coef), kl_in_reward=args.kl_in_reward,
                    group_size=args.group_size, routing_replay=args.routing_replay,
                    advantage_estimator="gae" if args.algo == "ppo" else "grpo", gamma=args.gamma, lam=args.lam),
        precision=PrecisionConfig(trainer=args.precision), allow_changed_settings=args.allow_changed_settings,
        memory=MemoryConfig(offload=args.offload, offload_optimizer=args.offload_optimizer), lora=lora_config_from_args(args),
        critic=critic_config_from_args(args),
    )


def pretrain_base(args, config, tokenizer) -> str:
    """The base model of a LoRA run: the embedded model after ``--lora-base-steps`` supervised steps
    on ``--lora-base-task`` (full fine-tuning, no engine; what pretraining is to a real LoRA run),
    written once as an HF checkpoint under ``--out`` and reused on resume."""
    import torch.distributed as dist

    from megatron_rlfp16.trainer import TaskSource, warm_start_base
    from megatron_rlfp16.trainer.embedded import embedded_task

    base = os.path.join(args.out, f"hf_base_{args.model}_{args.precision}_seed{args.seed}_"
                                  f"{args.lora_base_task}{args.lora_base_steps}")
    if not os.path.isdir(base):
        source = TaskSource(embedded_task(args.lora_base_task), tokenizer, seed=args.seed)
        sft = warm_start_base(config, source, base, steps=args.lora_base_steps, batch_size=64, lr=1e-3,
                              seed=args.seed)
        if dist.get_rank() == 0:
            print(f"[demo] LoRA base: {len(sft)} supervised steps of the whole model on {args.lora_base_task!r}, "
                  f"final loss {sft[-1]['loss']:.3f}; written to {base}", file=sys.stderr, flush=True)
    dist.barrier()
    return base


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.trainer.embedded import embedded_hf_config, embedded_model_dir

    hf_dir = embedded_model_dir(args.out, args.model)
    try:  # every size against the embedded model and this world, before any rank initializes
        config = build_config(args, hf_dir)
        check_output_dir(args.out, "--out")
        resolve_plan(config, hf_config=embedded_hf_config(args.model))
    except ValueError as err:
        print(f"error: {with_flag(str(err))}", file=sys.stderr)
        return 2

    import torch.distributed as dist

    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.runtime.stop import RunStopped
    from megatron_rlfp16.trainer import TaskSource, Trainer, warm_start
    from megatron_rlfp16.trainer.embedded import embedded_setup
    from megatron_rlfp16.trainer.report import write_summary

    init_runtime(ParallelConfig(tp=args.tp, ep=args.ep), seed=args.seed)
    rank = dist.get_rank()
    task, tokenizer, _ = embedded_setup(args.out, seed=args.seed, family=args.model,
                                        also_task=args.lora_base_task if config.lora.enabled else None)

    source = TaskSource(task, tokenizer, seed=args.seed)
    start = time.monotonic()
    if config.lora.enabled:  # LoRA adapts a trained base: pretrain it, in full, first
        config = dataclasses.replace(config, hf_dir=pretrain_base(args, config, tokenizer))
    trainer = Trainer(config, source)
    if trainer.step == 0:  # the trainer's trainable parameters: the adapters of a LoRA run
        sft = warm_start(trainer, steps=args.warm_start_steps, batch_size=64, lr=args.warm_start_lr, seed=args.seed,
                         until_loss=args.warm_start_until_loss)
        if rank == 0 and sft:
            print(f"[demo] warm start{' of the adapters' if config.lora.enabled else ''}: {len(sft)} supervised "
                  f"steps, final loss {sft[-1]['loss']:.3f}, "
                  f"skipped {sft[-1]['skipped_steps']:.0f}, loss scale {sft[-1]['loss_scale']:.0f}",
                  file=sys.stderr, flush=True)
            if args.warm_start_until_loss is not None and sft[-1]["loss"] > args.warm_start_until_loss:
                print(f"[demo] warning: the warm start used all {len(sft)} steps (--warm-start-steps) without "
                      f"reaching --warm-start-until-loss {args.warm_start_until_loss:g}; GRPO starts from a "
                      f"model that rarely answers right", file=sys.stderr, flush=True)
    try:
        trainer.fit()
    except RunStopped as stop:  # SIGTERM/SIGINT: the step finished and was saved
        if rank == 0:
            print(f"[demo] {stop}", file=sys.stderr, flush=True)
        trainer.close()
        return stop.exit_code
    if rank == 0:
        summary = write_summary(args.out, precision=args.precision, seconds=time.monotonic() - start)
        print(json.dumps(summary, indent=2))
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
