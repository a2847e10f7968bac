"""LoRA against full fine-tuning: what a weight sync costs, and the trainer's gradient + optimizer memory.

For the demo model (the embedded Llama: hidden 128, 2 layers, vocabulary 64) and a larger Llama-shaped
one (hidden 1024, 8 layers, vocabulary 32000: 156 M parameters), in FP16, rank-8 adapters on all seven
linear modules, a world of one:

- **sync**: in the same rounds, interleaved, (a) the full refit full fine-tuning runs after every step
  (``engine.update_weights(export_hf(...))``, every weight), (b) the trainer's adapter-only sync
  (gather the adapters, hand them to the engine in memory, ``engine.set_adapter_tensors``) and (c)
  the same through a PEFT directory (write it, ``engine.set_adapter(path)``). vLLM loads a new
  adapter when the next generation starts, so each is timed together with one short generation, and
  the same generation right after it (same adapter state) is subtracted, round by round. Figures are
  the median over the rounds; ``adapter/full`` is the headline ratio (issue target ≤ 0.1).
- **memory**: the bytes of Megatron DDP's gradient buffers and of the optimizer's state (FP32 master
  copies and Adam's two moments) after one optimizer step, for the model with adapters and the same
  model fully trained; ``lora/full`` is the ratio. The run plan's prediction (``plan.memory``) is
  printed beside the measurement.

After the rounds the engine's log-probs with the adapter equal the trainer's (FP16 tolerance): the timed
syncs delivered the adapter they claim to. This plugin's part of the adapter sync (gathering and
splitting the adapters, their FP16 copy, the adapter config) is also timed apart, the mean of 200; the
rest of the adapter sync is vLLM's.

    python bench/lora_bench.py                   # prints the tables
    python bench/lora_bench.py --json out.json   # also writes the numbers
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megatron_rlfp16.precision import Precision, PrecisionConfig  # noqa: E402

FP16 = Precision.FP16.torch_dtype
RANK = 8
PART_REPEATS = 200
MiB = 1 << 20
SHAPES = {
    "demo": None,  # the embedded demo model
    "llama-156m": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=64, intermediate_size=2816, max_position_embeddings=2048),
}


def _hf_dir(name: str, root: str) -> str:
    from megatron_rlfp16.testing.tiny import make_tiny_model
    from megatron_rlfp16.trainer.embedded import embedded_config

    if SHAPES[name] is None:
        cfg = embedded_config().to_dict()
        keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "max_position_embeddings", "tie_word_embeddings")
        return make_tiny_model("llama", os.path.join(root, name), seed=0, dtype=FP16, **{k: cfg[k] for k in keep})
    return make_tiny_model("llama", os.path.join(root, name), seed=0, dtype=FP16, **SHAPES[name])


def _state_bytes(ddp, optimizer) -> Dict[str, int]:
    """Gradient buffers of DDP and the optimizer's FP32 masters and moments, in bytes."""
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    state = 0
    seen = set()
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    for sub in subs:
        for group in getattr(sub, "fp32_from_float16_groups", []):
            for p in group:
                state += p.numel() * p.element_size()
        inner = getattr(sub, "optimizer", sub)
        for values in inner.state.values():
            for v in values.values():
                if torch.is_tensor(v) and v.numel() > 1 and id(v) not in seen:
                    seen.add(id(v))
                    state += v.numel() * v.element_size()
    return dict(gradients=grads, optimizer_state=state)


def _build(hf_dir: str, lora: bool):
    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.lora import LoraConfig, apply_lora
    from megatron_rlfp16.megatron import wrap_ddp
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.precision import OptimizerStep

    precision = PrecisionConfig(trainer=Precision.FP16).validate()
    model, arch = build_model(read_config_json(hf_dir), params_dtype=FP16,
                              config_overrides=precision.transformer_overrides())
    load_hf_checkpoint(model, arch, hf_dir)
    precision.prepare_model(model)
    if lora:
        apply_lora(model, arch, LoraConfig(rank=RANK))
    ddp = wrap_ddp(model, **precision.ddp_kwargs())
    optimizer = precision.build_optimizer([ddp], lr=1e-4, weight_decay=0.0)
    return model, arch, ddp, optimizer, OptimizerStep(optimizer, precision, model=ddp)


def _one_step(ddp, arch, stepper) -> None:
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron import train_step

    ids = (torch.arange(2 * 16).reshape(2, 16) * 7 + 3) % arch.vocab_size
    mask = torch.ones(2, 15)
    lp = torch.zeros(2, 15)
    train_step(ddp, [dict(input_ids=ids, loss_mask=mask, advantages=torch.tensor([1.0, -1.0]), old_logprobs=lp,
                          rollout_logprobs=lp)], PolicyLossConfig(loss="pg"), vocab_size=arch.vocab_size)
    stepper.step()


def family_job(name: str, rounds: int, threads: int) -> Dict:
    """One model in its own process (a vLLM engine's teardown ends the process group)."""
    from megatron_rlfp16.bridge import export_hf
    from megatron_rlfp16.lora import gather_adapters, load_lora_state_dict, sync_adapters, write_peft_dir
    from megatron_rlfp16.megatron.recompute import compute_logprobs
    from megatron_rlfp16.plan.memory import lora_params_per_rank, params_per_rank
    from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine
    from megatron_rlfp16.rollout.engine import engine_lora_rank
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.testing.lora import random_adapter_tensors

    torch.set_num_threads(threads)
    init_runtime(ParallelConfig())
    tmp = tempfile.mkdtemp(prefix="lora_bench_")
    hf_dir = _hf_dir(name, tmp)
    memory = {}
    for kind in ("full", "lora"):
        model, arch, ddp, optimizer, stepper = _build(hf_dir, lora=kind == "lora")
        _one_step(ddp, arch, stepper)
        memory[kind] = _state_bytes(ddp, optimizer)
    # The plan's prediction of the same (a world of one: nothing sharded).
    total = params_per_rank(arch, tp=1, pp=1).total
    adapters = lora_params_per_rank(arch, rank=RANK, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"), tp=1, pp=1)
    planned = dict(full=total * (4 + 4 + 8), lora=adapters * (4 + 4 + 8))  # FP32 grads, masters, moments
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    load_lora_state_dict(model, arch, random_adapter_tensors(hf_dir, targets, rank=RANK, alpha=2 * RANK, seed=1,
                                                             std=0.05))
    from megatron_rlfp16.lora import LoraConfig

    engine = RolloutEngine(hf_dir, RolloutConfig(tp=1, max_model_len=64, max_lora_rank=engine_lora_rank(RANK)),
                           engine_kwargs=PrecisionConfig(trainer=Precision.FP16).vllm_kwargs())
    probe = [[1, 5, 9, 4, 7]]

    def generate():
        return engine.generate(probe, n=1, temperature=0.0, max_tokens=2, seed=0)

    def full_sync():  # what full fine-tuning syncs: every weight (the base here, the adapter set aside)
        engine.set_adapter(None)
        return engine.update_weights(export_hf(model, arch, dtype=FP16))["bytes"]

    version = [0]

    def adapter_sync():  # the trainer's: the adapters handed to the engine in memory
        return sync_adapters(model, arch, engine, LoraConfig(rank=RANK), FP16)["bytes"]

    def directory_sync():  # through a PEFT directory (what an engine in another process would need)
        version[0] += 1
        tensors = gather_adapters(model, arch)
        path = os.path.join(tmp, "adapters", f"v{version[0]:06d}")
        write_peft_dir(tensors, LoraConfig(rank=RANK), path, dtype=FP16)
        engine.set_adapter(path, rank=RANK)
        return sum(t.numel() * 2 for t in tensors.values())

    syncs = dict(full=full_sync, adapter=adapter_sync, directory=directory_sync)
    times = {k: [] for kind in syncs for k in (kind, kind + "_gen")}
    moved = {}
    generate()
    for _ in range(rounds):
        for kind, sync_fn in syncs.items():
            t = time.perf_counter()
            moved[kind] = sync_fn()
            generate()
            times[kind].append(time.perf_counter() - t)
            t = time.perf_counter()
            generate()
            times[kind + "_gen"].append(time.perf_counter() - t)
    # Each round's sync + generation less the generation right after it (paired: drifts cancel).
    sync = {kind: statistics.median(a - b for a, b in zip(times[kind], times[kind + "_gen"])) for kind in syncs}
    # This plugin's part of the adapter sync, timed apart: gather + split, the copy in FP16, the config.
    from megatron_rlfp16.compat.megatron import cpu_stand_ins_paused
    from megatron_rlfp16.lora.peft_dir import adapter_config, adapted_config

    parts = {"gather": 0.0, "cast": 0.0, "config": 0.0}
    for _ in range(PART_REPEATS):
        with cpu_stand_ins_paused():
            t0 = time.perf_counter()
            tensors = gather_adapters(model, arch, copy=False)
            t1 = time.perf_counter()
            tensors = {k: v.detach().to(dtype=FP16, copy=True) for k, v in tensors.items()}
            t2 = time.perf_counter()
            adapter_config(adapted_config(tensors, LoraConfig(rank=RANK)))
            t3 = time.perf_counter()
        for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[key] += seconds / PART_REPEATS
    # The adapter the engine now serves is the trainer's: compare the log-probs of a sample.
    batch = engine.generate([list(range(3, 15))], n=2, temperature=1.0, max_tokens=6, seed=3)
    tokens, mask, engine_lp = batch.to_tensors(pad_id=0)
    mine = compute_logprobs(ddp, [dict(input_ids=tokens)], vocab_size=arch.vocab_size)
    m = mask.bool()
    check = float((engine_lp[m] - mine[m]).abs().max())
    engine.close()
    return dict(model=name, params=total, adapter_params=adapters, rounds=rounds, sync_seconds=sync,
                sync_ratio=sync["adapter"] / sync["full"], directory_ratio=sync["directory"] / sync["full"],
                bytes_moved=moved,
                bytes_ratio=moved["adapter"] / moved["full"], memory=memory,
                memory_ratio=sum(memory["lora"].values()) / sum(memory["full"].values()), planned=planned,
                planned_ratio=planned["lora"] / planned["full"], engine_vs_trainer_max_abs_logprob=check,
                plugin_part_seconds=parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    from megatron_rlfp16.testing.distributed import run_on_ranks

    results = []
    for name in args.models.split(","):
        if name not in SHAPES:
            print(f"error: --models: unknown {name!r}; valid: {', '.join(SHAPES)}", file=sys.stderr)
            return 2
        results.append(run_on_ranks(family_job, 1, name, args.rounds, args.threads, timeout=3600)[0])
    print(f"LoRA rank {RANK} on all linear modules, FP16, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, median of {args.rounds} rounds")
    print(f"{'model':12} {'params':>8} {'adapter':>8} {'full sync':>10} {'adapter sync':>13} {'adapter/full':>13} "
          f"{'via dir/full':>13} {'bytes ratio':>12} {'grad+opt lora/full':>19} {'planned':>8} {'engine vs trainer':>18}")
    for r in results:
        print(f"{r['model']:12} {r['params'] / 1e6:7.2f}M {r['adapter_params'] / 1e6:7.3f}M "
              f"{r['sync_seconds']['full'] * 1e3:8.1f}ms {r['sync_seconds']['adapter'] * 1e3:11.1f}ms "
              f"{r['sync_ratio']:13.3f} {r['directory_ratio']:13.3f} {r['bytes_ratio']:12.4f} {r['memory_ratio']:19.4f} "
              f"{r['planned_ratio']:8.4f} {r['engine_vs_trainer_max_abs_logprob']:18.2e}")
    for r in results:
        part = r["plugin_part_seconds"]
        print(f"{r['model']}: this plugin's part of the adapter sync {sum(part.values()) * 1e3:.2f} ms ("
              + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in part.items()) + f"; mean of {PART_REPEATS})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
