"""GRPO on your own Hugging Face checkpoint and JSONL prompts, trainer and rollout in one precision.

    torchrun --nproc_per_node=8 examples/grpo_train.py --hf-dir Qwen3-8B --data train.jsonl \
        --out runs/qwen3-8b --tp 2 --precision fp16 --rl-loss ppo_clip --rl-correction token_tis

Each JSONL line is ``{"prompt": ..., "answer": ...}``; responses are scored by the "math" reward
(final-answer equivalence). Megatron trains at TP x PP x EP (data parallel takes the rest of the
world) beside a colocated vLLM engine at ``--rollout-tp``. Recipes: examples/grpo_qwen3_*_fp16.sh.

``--dry-run`` needs no GPU, weights or vLLM: it validates the config, builds the Megatron
``TransformerConfig`` for the exact layout, and instantiates rank 0's shard of the model on the
``meta`` device (over a fake process group of tp*pp*ep ranks), then prints a summary whose
parameter count is checked against one computed from the HF config alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlfp16.megatron.args import add_rl_args, rl_config_from_args  # noqa: E402
from megatron_rlfp16.cli import (  # noqa: E402
    add_checkpoint_args, add_critic_args, check_output_dir, critic_config_from_args, fraction,
    lora_config_from_args, non_negative_int, positive_float, positive_int, with_flag,
)
from megatron_rlfp16.precision.dtypes import Precision  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json, tokenizer, safetensors)")
    p.add_argument("--data", help="JSONL prompts {\"prompt\", \"answer\"} (required unless --dry-run)")
    p.add_argument("--out", default="runs/grpo", help="output directory (metrics, checkpoints)")
    p.add_argument("--tp", type=positive_int, default=1, help="Megatron tensor-parallel size")
    p.add_argument("--pp", type=positive_int, default=1, help="Megatron pipeline-parallel size")
    p.add_argument("--ep", type=positive_int, default=1, help="Megatron expert-parallel size (MoE models)")
    p.add_argument("--rollout-tp", type=positive_int, default=None, help="vLLM tensor-parallel size (default: --tp)")
    p.add_argument("--rollout-gpu-memory-utilization", type=fraction, default=0.4,
                   help="share of GPU memory for vLLM's weights and KV cache (colocated with training)")
    p.add_argument("--rollout-sleep-level", type=int, default=2, choices=[1, 2],
                   help="vLLM sleep level while training: 2 discards its weights (the refit rewrites "
                        "them), 1 keeps a host copy")
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="shard master weights and Adam moments over data parallelism (default: on when dp > 1)")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                   help="activation recompute: selective (attention core) or full (every layer)")
    p.add_argument("--attention", choices=["auto", "fused", "unfused"], default="auto",
                   help="attention kernel the memory plan assumes (auto: fused with TransformerEngine)")
    p.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                   help="the trainer's state in host memory while the engine samples (default: on with a GPU)")
    p.add_argument("--offload-optimizer", action=argparse.BooleanOptionalAction, default=None,
                   help="with --offload, master weights and Adam moments also stay in host memory outside each "
                        "optimizer step (default: on when offloading and the run fits the device only this way)")
    p.add_argument("--device-memory-gib", type=positive_float, default=None,
                   help="memory of one GPU for the fit check (default: the GPU's own; none on CPU)")
    p.add_argument("--precision", default=Precision.FP16.value, choices=Precision.names(),
                   help="trainer and rollout precision (the same for both)")
    p.add_argument("--steps", type=positive_int, default=100, help="GRPO steps")
    p.add_argument("--prompts-per-step", type=positive_int, default=64)
    # An alias of --rl-group-size: SUPPRESS keeps it from overwriting that flag's default.
    p.add_argument("--group-size", dest="rl_group_size", type=positive_int, default=argparse.SUPPRESS,
                   help="responses per prompt (alias of --rl-group-size)")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024)
    p.add_argument("--micro-batch-size", type=positive_int, default=4)
    p.add_argument("--lr", type=positive_float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recompute-old-logprobs", action=argparse.BooleanOptionalAction, default=True,
                   help="compute π_old with the trainer before the updates; --no-recompute-old-logprobs is "
                        "bypass mode, π_old := the rollout engine's log-probs (verl's bypass_mode, slime's "
                        "--use-rollout-logprobs)")
    p.add_argument("--prompt-field", default="prompt", help="the JSONL field holding the prompt text")
    p.add_argument("--answer-field", default="answer", help="the JSONL field holding the reference answer")
    p.add_argument("--on-bad-prompt", choices=["error", "skip"], default="error",
                   help="a dataset line that cannot be used (invalid JSON, a missing or empty field, a prompt "
                        "longer than the engine takes): stop with its file and line (error), or leave it "
                        "out and count it (skip)")
    p.add_argument("--system-prompt", default=None, help="a system message put before every prompt")
    p.add_argument("--prompt-template", default=None,
                   help="wrap each text prompt, e.g. '{prompt} Put your final answer within \\boxed{{}}.' "
                        "(base models; applied before the chat template when both are used)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="encode prompts as plain text even if the tokenizer has a chat template")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="a stop string (repeatable), besides the checkpoint's end token ids")
    p.add_argument("--log-samples", type=non_negative_int, default=0, metavar="N",
                   help="every N steps write a few (prompt, response, reward) rows to samples.jsonl and "
                        "TensorBoard (0: never)")
    add_checkpoint_args(p)
    add_critic_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and build the model on the meta device; no GPU, weights or vLLM")
    return add_rl_args(p)


def build_config(args: argparse.Namespace):
    """The validated ``TrainerConfig`` of parsed flags (no GPU, no Megatron state). Each flag sets
    one config field: ``--tp/--pp/--ep`` → ``parallel``, ``--rollout-*`` → ``rollout``, ``--rl-*`` →
    ``rl``, ``--precision`` → ``precision.trainer``, the rest → ``run``."""
    from megatron_rlfp16.plan.memory import MemoryConfig
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.rollout import RolloutConfig
    from megatron_rlfp16.runtime import ParallelConfig
    from megatron_rlfp16.trainer import RunConfig, TrainerConfig

    rl = rl_config_from_args(args)
    lora = lora_config_from_args(args)
    run = RunConfig(
        steps=args.steps, prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
        micro_batch_size=args.micro_batch_size, lr=args.lr, seed=args.seed, log_samples=args.log_samples,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        recompute_old_logprobs=args.recompute_old_logprobs,
    )
    config = TrainerConfig(
        hf_dir=args.hf_dir, out_dir=args.out, parallel=ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep),
        rollout=RolloutConfig(tp=args.rollout_tp, gpu_memory_utilization=args.rollout_gpu_memory_utilization,
                              sleep_level=args.rollout_sleep_level),
        run=run, rl=rl, resume=not args.no_resume, precision=PrecisionConfig(trainer=args.precision),
        memory=MemoryConfig(distributed_optimizer=args.distributed_optimizer, recompute=args.recompute,
                            attention=args.attention, device_memory_gib=args.device_memory_gib,
                            offload=args.offload, offload_optimizer=args.offload_optimizer),
        allow_changed_settings=args.allow_changed_settings, lora=lora, critic=critic_config_from_args(args),
    )
    try:
        return config.validate()
    except ValueError as err:
        raise ValueError(with_flag(str(err))) from None


def prompt_config(args: argparse.Namespace):
    """The ``PromptConfig`` of the prompt flags, validated (errors name the flag)."""
    from megatron_rlfp16.prompts import PromptConfig

    config = PromptConfig(chat_template=not args.no_chat_template, system_prompt=args.system_prompt,
                          prompt_template=args.prompt_template, stop=tuple(args.stop))
    try:
        return config.validate()
    except ValueError as err:
        raise ValueError(with_flag(str(err))) from None


def analytic_param_count(arch) -> dict:
    """Parameters of the full HF model from its config alone (an independent check of the build)."""
    h, hd = arch.hidden_size, arch.head_dim
    attn = h * hd * (2 * arch.num_heads + 2 * arch.num_kv_heads) + (2 * hd if arch.qk_norm else 0)
    if arch.qkv_bias:
        attn += hd * (arch.num_heads + 2 * arch.num_kv_heads)
    norms = 2 * h
    if arch.is_moe:
        expert = 3 * h * arch.moe_ffn_hidden_size
        mlp, active_mlp = h * arch.num_experts + arch.num_experts * expert, h * arch.num_experts + arch.moe_topk * expert
    else:
        mlp = active_mlp = 3 * h * arch.ffn_hidden_size
    embed = arch.vocab_size * h * (1 if arch.tie_embeddings else 2) + h  # + final norm
    return dict(total=embed + arch.num_layers * (attn + norms + mlp),
                active=embed + arch.num_layers * (attn + norms + active_mlp))


def dry_run(config) -> dict:
    """Builds rank 0's shard of the model for ``config``'s layout on the meta device; returns a summary.

    A fake process group (``torch.testing``'s "fake" backend) stands in for the tp*pp*ep ranks so
    that Megatron's parallel state, and thus every sharded layer, is the one the real run gets.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_rlfp16.models import transformer_config
    from megatron_rlfp16.models.builder import block_spec
    from megatron_rlfp16.plan import resolve_plan

    p = config.parallel
    world = p.tp * p.pp * p.ep
    if config.memory.offload is None:  # planned as the GPU run resolves it: offload on
        config = dataclasses.replace(config, memory=dataclasses.replace(config.memory, offload=True))
    # The plan for the run's world (WORLD_SIZE, e.g. the recipe's NPROC); the meta model for one
    # model-parallel group of it.
    plan = resolve_plan(config, world_size=int(os.environ.get("WORLD_SIZE", world)))
    arch = plan.arch
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
            expert_model_parallel_size=p.ep, create_gloo_process_groups=False,
        )
        # CPU initialization keeps Megatron from allocating on a GPU explicitly; nothing is
        # initialized because meta tensors hold no data.
        overrides = dict(plan.transformer_overrides, use_cpu_initialization=True, perform_initialization=False)
        tcfg = transformer_config(arch, tp=p.tp, pp=p.pp, ep=p.ep, etp=plan.parallel.etp,
                                  params_dtype=plan.trainer_dtype, overrides=overrides)
        with torch.device("meta"):
            model = GPTModel(
                config=tcfg, transformer_layer_spec=block_spec(arch, tcfg, "local"),
                vocab_size=arch.padded_vocab_size(p.tp),
                max_sequence_length=arch.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                share_embeddings_and_output_weights=arch.tie_embeddings, position_embedding_type="rope",
                rotary_base=int(arch.rope_theta),
            )
        rank0 = sum(x.numel() for x in model.parameters())
        dtypes = sorted({Precision.parse(x.dtype).vllm_dtype for x in model.parameters()})
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    counts = analytic_param_count(arch)
    return dict(
        family=arch.family, layout=dict(tp=p.tp, pp=p.pp, ep=p.ep, world=world, rollout_tp=plan.rollout.tp),
        precision=config.precision.trainer.value, sequence_parallel=plan.sequence_parallel,
        params_b=round(counts["total"] / 1e9, 3), active_params_b=round(counts["active"] / 1e9, 3),
        rank0_params_b=round(rank0 / 1e9, 3), rank0_param_dtypes=dtypes, device="meta",
        loss=config.rl.loss.loss, correction=config.rl.loss.correction, group_size=config.rl.group_size,
        plan=plan.describe(),
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = build_config(args)
        prompt_config(args)  # refused here, before any rank or file is touched
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        from megatron_rlfp16.models import ConfigError
        from megatron_rlfp16.plan import MemoryPlanError

        try:
            summary = dry_run(config)
        except MemoryPlanError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except ConfigError as err:
            p = config.parallel
            print(f"error: layout tp={p.tp} pp={p.pp} ep={p.ep}: {err}", file=sys.stderr)
            return 2
        print("DRY-RUN " + json.dumps(summary, sort_keys=True), flush=True)
        return 0
    if not args.data:
        print("error: --data is required (or pass --dry-run)", file=sys.stderr)
        return 2

    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.prompts import load_tokenizer
    from megatron_rlfp16.rewards import get_reward, load_jsonl
    from megatron_rlfp16.runtime.stop import RunStopped
    from megatron_rlfp16.trainer import JsonlSource, Trainer

    try:
        check_output_dir(args.out, "--out")  # the target first
        # Sizes against the model (config.json) and this world, before the data or any weight is read.
        plan = resolve_plan(config)
        data = load_jsonl(args.data, prompt_field=args.prompt_field, answer_field=args.answer_field,
                          on_bad=args.on_bad_prompt)
        source = JsonlSource(data, load_tokenizer(args.hf_dir), get_reward("math"), seed=args.seed,
                             hf_dir=args.hf_dir, prompt_config=prompt_config(args), on_bad=args.on_bad_prompt)
        source.check_prompts(plan.rollout.max_model_len - 1)  # every prompt against the engine's limit
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {with_flag(str(err))}", file=sys.stderr)
        return 2
    trainer = Trainer(config, source)  # initializes torch.distributed and Megatron's parallel state
    try:
        trainer.fit()
    except RunStopped as stop:  # SIGTERM/SIGINT: the step finished and was saved
        print(f"[rank {trainer.rank}] {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
