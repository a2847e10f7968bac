"""What the demo's LoRA base leaves for training to learn, and which parameters can learn it.

Until 2026-12-02 the LoRA demo adapted the embedded model after the demo's own supervised warm start
on ``reverse`` (now ``examples/grpo_cpu_demo.sh --lora-rank 8 --lora-base-task reverse
--lora-base-steps 60 --warm-start-steps 0``), and its reward stayed near that base's. This bench takes
that base (the same warm start, a world of one, FP16) and measures why:

- **reward by sampling temperature** (vLLM, FP32): greedy decoding and a few temperatures against the
  RL run's temperature 1. What RL can gain from a base that is already right at greedy is making the
  sampled distribution sharper.
- **supervised loss after N steps** on the task's answers from the same base (the warm start's own
  objective and batches), for: full fine-tuning; full fine-tuning with the embedding, the LM head and
  every norm frozen (their gradients zeroed before each step, no weight decay); and rank-8 and
  rank-64 LoRA on all seven linear modules. If the frozen run and the adapters stop at the same
  loss while full fine-tuning goes on, what is left needs the parameters LoRA does not train.

    python bench/lora_capacity.py                     # prints the table
    python bench/lora_capacity.py --json out.json     # also writes the numbers
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Dict, List

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))

TEMPERATURES = (1.0, 0.7, 0.5, 0.0)
# name: (LoRA rank, the Megatron parameter names frozen in a full fine-tuning)
VARIANTS = {
    "full": (0, ()),
    "full, embedding + LM head frozen": (0, ("embedding", "output_layer")),
    "full, embedding + LM head + norms frozen": (0, ("embedding", "output_layer", "norm")),
    "LoRA rank 8": (8, ()),
    "LoRA rank 64": (64, ()),
}


def _config(out: str, hf_dir: str, lora_rank: int):
    import dataclasses

    import grpo_cpu_demo as demo

    argv = ["--out", out, "--tp", "1"] + (["--lora-rank", str(lora_rank)] if lora_rank else [])
    return dataclasses.replace(demo.build_config(demo.parse_args(argv), hf_dir), hf_dir=hf_dir)


def _setup(out: str):
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.trainer import TaskSource
    from megatron_rlfp16.trainer.embedded import embedded_setup

    init_runtime(ParallelConfig(), seed=0)
    task, tokenizer, hf_dir = embedded_setup(out)
    return task, tokenizer, hf_dir, TaskSource(task, tokenizer, seed=0)


def base_job(out: str, warm_steps: int) -> str:
    """The LoRA demo's base: the embedded model after ``warm_steps`` supervised steps (full model)."""
    from megatron_rlfp16.trainer import warm_start_base

    _, _, hf_dir, source = _setup(out)
    base = os.path.join(out, f"base_warm{warm_steps}")
    warm_start_base(_config(out, hf_dir, 8), source, base, steps=warm_steps, batch_size=64, lr=1e-3, seed=0)
    return base


def temperature_job(out: str, base: str, prompts: int) -> Dict[str, float]:
    import random

    from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine

    task, tokenizer, _, _ = _setup(out)
    rng = random.Random(123)
    examples = [task.sample(rng) for _ in range(prompts)]
    ids = [tokenizer.encode_prompt(e.prompt) for e in examples]
    from megatron_rlfp16.precision import Precision, PrecisionConfig

    engine = RolloutEngine(base, RolloutConfig(max_model_len=64),
                           engine_kwargs=PrecisionConfig(trainer=Precision.FP32).vllm_kwargs())
    rewards = {}
    for t in TEMPERATURES:
        n = 4 if t else 1
        batch = engine.generate(ids, n=n, temperature=t, max_tokens=8, seed=1)
        scores = [task.reward(tokenizer.decode(r), examples[i // n].meta) for i, r in enumerate(batch.responses)]
        rewards["greedy" if t == 0 else f"T={t:g}"] = sum(scores) / len(scores)
    engine.close()
    return rewards


def sft_job(out: str, base: str, lora_rank: int, frozen_keys, steps: int, lr: float) -> List[float]:
    """Supervised loss at steps 1, 11, 21, ... and the last, from ``base``; ``frozen_keys``: parameters
    whose names contain one of them keep their values (gradients zeroed before each step)."""
    from megatron_rlfp16.plan import build_run, resolve_plan
    from megatron_rlfp16.trainer.warm_start import _supervised_steps

    _, _, _, source = _setup(out)
    plan = resolve_plan(_config(out, base, lora_rank))
    run = build_run(plan, seed=0, engine=False)
    if frozen_keys:
        model = run.model[0] if isinstance(run.model, (list, tuple)) else run.model
        frozen = [p for n, p in model.named_parameters() if any(k in n for k in frozen_keys)]
        step = run.stepper.step

        def step_without_frozen():
            for p in frozen:
                p.main_grad.zero_()
            return step()

        run.stepper.step = step_without_frozen
    history = _supervised_steps(run.model, run.optimizer, run.stepper, source, arch=plan.arch,
                                seq_multiple=plan.seq_multiple, steps=steps, batch_size=64, lr=lr, seed=0)
    losses = [h["loss"] for h in history]
    return losses[::10] + [losses[-1]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warm-start-steps", type=int, default=60, help="the demo's warm start (its default: 60)")
    p.add_argument("--steps", type=int, default=60, help="supervised steps per variant")
    p.add_argument("--lr", type=float, default=1e-3, help="supervised learning rate (the warm start's)")
    p.add_argument("--prompts", type=int, default=200, help="prompts for the temperature sweep")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)

    from megatron_rlfp16.testing.distributed import run_on_ranks

    out = tempfile.mkdtemp(prefix="lora_capacity_")
    print(f"[lora_capacity] warm start ({args.warm_start_steps} steps) in {out}", file=sys.stderr, flush=True)
    base = run_on_ranks(base_job, 1, out, args.warm_start_steps, timeout=900)[0]
    rewards = run_on_ranks(temperature_job, 1, out, base, args.prompts, timeout=900)[0]
    losses = {}
    for name, (rank, frozen_keys) in VARIANTS.items():
        print(f"[lora_capacity] {name}", file=sys.stderr, flush=True)
        losses[name] = run_on_ranks(sft_job, 1, out, base, rank, frozen_keys, args.steps, args.lr, timeout=900)[0]
    print("| base sampled at | " + " | ".join(rewards) + " |")
    print("| --- |" + " --- |" * len(rewards))
    print("| reward | " + " | ".join(f"{v:.3f}" for v in rewards.values()) + " |")
    print()
    steps = [1 + 10 * i for i in range(len(next(iter(losses.values()))) - 1)] + [args.steps]
    print("| supervised loss at step | " + " | ".join(map(str, steps)) + " |")
    print("| --- |" + " --- |" * len(steps))
    for name, values in losses.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    if args.json:
        with open(args.json + ".tmp", "w", encoding="utf-8") as f:
            json.dump(dict(args=vars(args), rewards=rewards, losses=losses, steps=steps), f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
