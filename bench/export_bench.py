"""What the streaming HF export costs: peak extra memory per bucket size, and throughput vs a copy.

A random llama-shaped Megatron model (hidden 1024, 8 layers, vocabulary 32000: 156 M parameters,
297 MiB in bfloat16) is built in one process (a world of one) and exported with ``export_hf`` at a
few bucket sizes. No HF weights are needed: the export does not care what the numbers are.

Throughput is bytes yielded per second, against two plain copies of the same parameters in the same
dtype, timed in the same rounds (interleaved, so that load from other processes hits all alike):

- ``copy``         ``copy_`` of every parameter into one preallocated (already touched) flat buffer:
                   the target, ratio export/copy >= 0.5;
- ``bucket copy``  the same copies into buffers freshly allocated per bucket, as the export does:
                   separates the cost of allocating (and page-faulting) buckets from the rest.

Each is timed twice, in CPU time of this process (user + system over all its threads: page faults
included) and in wall time; the best of the rounds is the estimate (noise only ever adds time) and
the JSON holds medians too. The target is judged in CPU time: the machines this runs on are shared,
and under load the wall time of a 0.5 s export mostly measures the scheduler. Torch runs one thread
by default, so on a quiet machine the two clocks agree.

Peak extra memory is counted two ways. ``peak extra``: the peak of live bytes allocated through
torch during the export, from every allocation and free the torch profiler records: exact, and
blind to how the C allocator recycles memory. ``(resident)``: the kernel's high-water mark of
resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident size right
before; glibc is told to give every large buffer its own mapping and to release free heap chunks
first, but heap chunks freed and reused within one export still blur it (either way): it is the
operating system's view, not the export's.

Two consumers are measured: ``drop`` deletes each tensor before asking for the next; ``hold`` is a
plain ``for`` loop, whose loop variable keeps the last tensor alive while the next bucket is packed
(as vLLM's ``load_weights`` loop does). The target is peak extra <= bucket + largest tensor.
``1 bucket`` / ``2 buckets`` are the largest bucket buffer and the largest sum of two consecutive
ones: at a world of one nothing is gathered, so the contract in ``bridge/core.py`` (one bucket plus
one gathered tensor) predicts a peak of ``1 bucket``.

    python bench/export_bench.py                  # prints the tables
    python bench/export_bench.py --json out.json  # also writes the numbers
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megatron_rlfp16.precision.dtypes import Precision  # noqa: E402

MiB = 1 << 20
Stream = Callable[[int], Iterator[Tuple[str, torch.Tensor]]]


def llama_config(hidden: int, layers: int, vocab: int) -> dict:
    return {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64, "num_key_value_heads": max(1, hidden // 256),
        "intermediate_size": int(hidden * 2.75), "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }


# --- memory ----------------------------------------------------------------------------------------

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


class _Glibc:
    """Makes resident memory follow large allocations: each gets its own mmap, unmapped on free, and
    free heap chunks left from before are released (else a bucket carved from one never shows)."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self, threshold: int = 128 << 10):
        self.libc = ctypes.CDLL("libc.so.6")
        if not (self.libc.mallopt(self.M_MMAP_THRESHOLD, threshold)
                and self.libc.mallopt(self.M_TRIM_THRESHOLD, threshold)):
            raise RuntimeError("mallopt failed: resident memory would not track allocations")

    def trim(self) -> None:
        self.libc.malloc_trim(0)


def _torch_peak(prof) -> int:
    """Peak of live CPU bytes allocated through torch while ``prof`` recorded (every alloc and free)."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_extra(stream: Stream, bucket: int, consumer: str, glibc: _Glibc) -> Dict[str, int]:
    """Peak extra memory of one export (torch allocations and resident memory), with the sizes of
    what it yielded.

    ``one_bucket`` is the largest bucket buffer, ``two_buckets`` the largest sum of two consecutive
    ones: a peak near the latter means a bucket is still alive while the next one is packed.
    """
    from torch.profiler import ProfilerActivity, profile

    largest, sizes, last = 0, [], None

    def seen(t: torch.Tensor) -> None:
        nonlocal largest, last
        largest = max(largest, t.numel() * t.element_size())
        storage = t.untyped_storage()
        if storage.data_ptr() != last:  # the first tensor of a new bucket buffer
            sizes.append(storage.nbytes())
            last = storage.data_ptr()

    glibc.trim()
    _reset_peak_rss()
    base = _status("VmRSS")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if consumer == "drop":
            for _, t in stream(bucket):
                seen(t)
                del t
        elif consumer == "hold":
            for _, t in stream(bucket):
                seen(t)
            del t
        else:
            raise ValueError(f"consumer={consumer!r}; valid: 'drop', 'hold'")
    rss = _status("VmHWM") - base
    pairs = [a + b for a, b in zip(sizes, sizes[1:])] or sizes
    return {"peak_extra": _torch_peak(prof), "peak_extra_rss": rss, "largest_tensor": largest,
            "buckets": len(sizes), "one_bucket": max(sizes), "two_buckets": max(pairs)}


# --- throughput ------------------------------------------------------------------------------------

def export_all(stream: Stream, bucket: int) -> int:
    nbytes = 0
    for _, t in stream(bucket):
        nbytes += t.numel() * t.element_size()
        del t
    return nbytes


def flat_copy(params: List[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        flat[offset: offset + p.numel()].view(p.shape).copy_(p)
        offset += p.numel()


def bucket_copy(params: List[torch.Tensor], bucket: int) -> None:
    """Copies into buffers allocated per bucket (greedy packing, a tensor larger than a bucket alone)."""
    buf, used = None, 0
    for p in params:
        n = p.numel() * p.element_size()
        if buf is None or used + n > buf.numel():
            buf, used = torch.empty(max(bucket, n), dtype=torch.uint8), 0
        buf[used: used + n].view(p.dtype).view(p.shape).copy_(p)
        used += n


def _timed(fn, *args) -> Tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process over all its threads, fn's result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def throughput(stream: Stream, staged: Stream, params: List[torch.Tensor], buckets: List[int],
               rounds: int) -> List[dict]:
    flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype)
    flat_copy(params, flat)  # touch the flat buffer: the target copy pays no page faults
    kinds = ("export", "staged", "copy", "bucket_copy")
    times = {(b, k, clock): [] for b in buckets for k in kinds for clock in ("wall", "cpu")}
    nbytes = 0
    for r in range(rounds + 1):  # round 0 warms up and is dropped
        for b in (buckets if r % 2 == 0 else buckets[::-1]):
            wall, cpu, nbytes = _timed(export_all, stream, b)
            samples = {"export": (wall, cpu), "staged": _timed(export_all, staged, b)[:2],
                       "copy": _timed(flat_copy, params, flat)[:2],
                       "bucket_copy": _timed(bucket_copy, params, b)[:2]}
            if r > 0:
                for k, (wall, cpu) in samples.items():
                    times[b, k, "wall"].append(wall)
                    times[b, k, "cpu"].append(cpu)
    copy_bytes = sum(p.numel() * p.element_size() for p in params)
    if copy_bytes != nbytes:
        raise RuntimeError(f"export yielded {nbytes} bytes, the parameters hold {copy_bytes}")
    rows = []
    for b in buckets:
        row = {"bucket": b, "bytes": nbytes}
        for k in kinds:
            for clock in ("wall", "cpu"):
                row[f"{k}_{clock}_gbps"] = nbytes / min(times[b, k, clock]) / 1e9
                row[f"{k}_{clock}_gbps_median"] = nbytes / statistics.median(times[b, k, clock]) / 1e9
        for clock in ("wall", "cpu"):
            row[f"ratio_{clock}"] = row[f"export_{clock}_gbps"] / row[f"copy_{clock}_gbps"]
            row[f"staged_ratio_{clock}"] = row[f"staged_{clock}_gbps"] / row[f"copy_{clock}_gbps"]
        # The target is for the file-export path: one staging buffer reused across exports.
        row["ok"] = row["staged_ratio_cpu"] >= 0.5
        rows.append(row)
    return rows


def memory(stream: Stream, buckets: List[int]) -> List[dict]:
    glibc = _Glibc()
    rows = []
    for b in buckets:
        for consumer in ("drop", "hold"):
            peak_extra(stream, b, consumer, glibc)  # warm-up: one-time allocations stay out of the peak
            row = dict(bucket=b, consumer=consumer, **peak_extra(stream, b, consumer, glibc))
            row["bound"] = b + row["largest_tensor"]
            row["ok"] = row["peak_extra"] <= row["bound"]
            rows.append(row)
    return rows


# --- main ------------------------------------------------------------------------------------------

def build(args) -> Tuple[object, object]:
    from megatron_rlfp16.models import build_model
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig())
    torch.manual_seed(0)
    return build_model(llama_config(args.hidden, args.layers, args.vocab),
                       params_dtype=getattr(torch, args.dtype))


def run(args) -> dict:
    from megatron_rlfp16.bridge import StagingBuffer, export_hf
    from megatron_rlfp16.runtime import shutdown_runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, arch = build(args)
    built_s = time.perf_counter() - start
    params = [p.detach() for p in model.parameters()]

    def stream(bucket: int):
        return export_hf(model, arch, bucket_bytes=bucket)

    staging = {}

    def staged(bucket: int):  # the file writer's mode: it copies each tensor, so one buffer serves all
        return export_hf(model, arch, bucket_bytes=bucket, staging=staging.setdefault(bucket, StagingBuffer()))

    buckets = [mib * MiB for mib in args.buckets]
    try:
        # Throughput first: the memory phase changes glibc's allocation policy for the rest of the run.
        speed = throughput(stream, staged, params, buckets, args.rounds)
        mem = memory(stream, buckets)
    finally:
        shutdown_runtime()
    return {
        "model": dict(hidden=args.hidden, layers=args.layers, vocab=args.vocab, dtype=args.dtype,
                      params=sum(p.numel() for p in params), build_s=round(built_s, 2)),
        "machine": dict(python=platform.python_version(), torch=torch.__version__,
                        threads=torch.get_num_threads(), cpus=os.cpu_count(),
                        loadavg=[round(x, 2) for x in os.getloadavg()]),
        "throughput": speed,
        "memory": mem,
        "ok": all(r["ok"] for r in speed) and all(r["ok"] for r in mem if r["consumer"] == "drop"),
    }


def print_tables(res: dict) -> None:
    m = res["model"]
    print(f"model: llama-shaped, hidden {m['hidden']}, {m['layers']} layers, vocab {m['vocab']}, "
          f"{m['params'] / 1e6:.1f} M params in {m['dtype']} (built in {m['build_s']} s); "
          f"load average {res['machine']['loadavg']}")
    print("\nthroughput, GB/s of CPU time [of wall time] (best of rounds); target staged/copy >= 0.5 "
          "in CPU time")
    print("export: a fresh buffer per bucket (the vLLM refit); staged: one staging buffer reused "
          "(file export)")
    print(f"{'bucket MiB':>10} {'export':>13} {'staged':>13} {'copy':>13} {'bucket copy':>13} "
          f"{'export/copy':>12} {'staged/copy':>12} ok")
    for r in res["throughput"]:
        cells = [f"{r[k + '_cpu_gbps']:.2f} [{r[k + '_wall_gbps']:.2f}]"
                 for k in ("export", "staged", "copy", "bucket_copy")]
        print(f"{r['bucket'] // MiB:>10} {cells[0]:>13} {cells[1]:>13} {cells[2]:>13} {cells[3]:>13} "
              f"{r['ratio_cpu']:>12.2f} {r['staged_ratio_cpu']:>12.2f} {'yes' if r['ok'] else 'NO'}")
    print("\npeak extra memory, MiB: live torch allocations (and resident memory); "
          "target peak extra <= bucket + largest tensor")
    print(f"{'bucket':>6} {'consumer':>8} {'largest tensor':>14} {'1 bucket':>8} {'2 buckets':>9} "
          f"{'peak extra':>10} {'(resident)':>10} {'bound':>7} ok")
    for r in res["memory"]:
        mib = [r[k] / MiB for k in ("largest_tensor", "one_bucket", "two_buckets", "peak_extra",
                                    "peak_extra_rss", "bound")]
        print(f"{r['bucket'] // MiB:>6} {r['consumer']:>8} {mib[0]:>14.1f} {mib[1]:>8.1f} {mib[2]:>9.1f} "
              f"{mib[3]:>10.1f} {mib[4]:>10.1f} {mib[5]:>7.1f} {'yes' if r['ok'] else 'NO'}")
    speed_ok = all(r["ok"] for r in res["throughput"])
    mem_ok = all(r["ok"] for r in res["memory"] if r["consumer"] == "drop")
    print(f"\ntargets met: throughput {'yes' if speed_ok else 'NO'}, memory {'yes' if mem_ok else 'NO'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=tuple(x.vllm_dtype for x in Precision), default=Precision.BF16.vllm_dtype,
                   help="parameter dtype; the export keeps it")
    p.add_argument("--buckets", type=int, nargs="+", default=[16, 64, 256], help="bucket sizes in MiB")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds per bucket size")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: CPU time then equals the uncontended wall time)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    res = run(args)
    print_tables(res)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
