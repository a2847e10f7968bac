"""Log-prob memory and RL-step overhead benchmark (single process, CPU).

(a) Memory: chunked ``vocab_parallel_logprobs`` vs the naive FP32 path (upcast the whole logits
    tensor to FP32, ``log_softmax``, gather) on 4,096 tokens of BF16 logits at V = 32k and 152k,
    forward only (recompute of π_old) and forward + backward (training). Each method runs in a fresh
    single-threaded subprocess that allocates its inputs, resets the kernel's peak-RSS counter
    (``echo 5 > /proc/self/clear_refs``), runs once and reads ``VmHWM`` from /proc/self/status: the
    reported number is the peak resident memory the method needed *beyond its inputs* (outputs and
    gradients included), as the OS saw it, allocator caching and all. tracemalloc cannot see torch's
    allocations, hence the subprocesses. Results of the two methods are compared (max |Δ|); times
    are CPU seconds of the single thread.
(b) Overhead: one RL training step (Megatron ``forward_backward_func``, the RL loss function with
    ``policy_loss``, Megatron DDP) vs the same step with Megatron's built-in cross-entropy (the model
    computes ``vocab_parallel_cross_entropy`` from labels) on the same model and data; single rank,
    TP = 1, one torch thread, interleaved repetitions after a warm-up. The headline ratio uses the
    process's CPU time (``time.process_time``; with one thread it is the time the step actually ran,
    so other load on a shared machine inflates it far less than wall time) and the minimum over the
    repetitions; medians and wall-clock times are printed too.

    python bench/logprob_bench.py [--json PATH] [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_rlfp16.precision.dtypes import Precision  # noqa: E402

DTYPES = {p.value: p.torch_dtype for p in (Precision.BF16, Precision.FP16)}


# ---------------------------------------------------------------- (a) memory, in a child process
def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _naive(logits, target, temperature, backward):
    x = logits.detach().requires_grad_(backward)
    lp = torch.log_softmax(x.float() / temperature, dim=-1).gather(-1, target[:, None]).squeeze(-1)
    if backward:
        lp.sum().backward()
        return lp.detach(), x.grad
    return lp, None


def _chunked(logits, target, temperature, backward):
    from megatron_rlfp16.logprobs import vocab_parallel_logprobs

    x = logits.detach().requires_grad_(backward)
    lp = vocab_parallel_logprobs(x, target, vocab_size=x.shape[-1], temperature=temperature)
    if backward:
        lp.sum().backward()
        return lp.detach(), x.grad
    return lp, None


def memory_child(method: str, vocab: int, tokens: int, dtype: str, backward: bool, out: str) -> None:
    torch.set_num_threads(1)  # as in (b): times comparable on a shared machine; memory is unaffected
    torch.manual_seed(0)
    logits = (torch.randn(tokens, vocab, dtype=DTYPES[dtype]) * 3)
    target = torch.randint(0, vocab, (tokens,))
    fn = {"naive": _naive, "chunked": _chunked}[method]
    if method == "chunked":  # import outside the measured region
        import megatron_rlfp16.logprobs  # noqa: F401
    with torch.no_grad():
        _ = logits[:1].float()  # warm the kernels on one row, not the full tensor
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mib("VmRSS")
    t0 = time.process_time()
    with torch.set_grad_enabled(backward):
        lp, grad = fn(logits, target, 0.8, backward)
    seconds = time.process_time() - t0
    peak = _status_mib("VmHWM") - base
    torch.save({"lp": lp, "grad": grad, "peak_mib": peak, "seconds": seconds,
                "input_mib": logits.numel() * logits.element_size() / 2**20}, out)


def run_memory_case(vocab: int, tokens: int, dtype: str, backward: bool, tmp: str) -> dict:
    results = {}
    for method in ("naive", "chunked"):
        out = os.path.join(tmp, f"{method}.pt")
        subprocess.run(
            [sys.executable, __file__, "--child", method, str(vocab), str(tokens), dtype,
             str(int(backward)), out],
            check=True, cwd=ROOT,
        )
        results[method] = torch.load(out)
        os.remove(out)
    naive, chunked = results["naive"], results["chunked"]
    row = dict(
        vocab=vocab, tokens=tokens, dtype=dtype, mode="fwd+bwd" if backward else "fwd",
        input_mib=naive["input_mib"], naive_peak_mib=naive["peak_mib"], chunked_peak_mib=chunked["peak_mib"],
        ratio=chunked["peak_mib"] / naive["peak_mib"], naive_s=naive["seconds"], chunked_s=chunked["seconds"],
        max_abs_diff_logprobs=(naive["lp"] - chunked["lp"]).abs().max().item(),
    )
    if backward:
        row["max_abs_diff_grad"] = (naive["grad"].float() - chunked["grad"].float()).abs().max().item()
    return row


# ---------------------------------------------------------------- (b) RL step vs cross-entropy step
def step_overhead(repeats: int, seq_len: int, micro_batch: int, num_micro: int, vocab: int, hidden: int,
                  layers: int, threads: int) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron import train_step, wrap_ddp
    from megatron_rlfp16.megatron.batch import model_inputs
    from megatron_rlfp16.models import ModelArch, build_model
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    torch.set_num_threads(threads)
    init_runtime(ParallelConfig())
    arch = ModelArch(family="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                     num_heads=hidden // 64, num_kv_heads=hidden // 128, head_dim=64,
                     ffn_hidden_size=hidden * 11 // 4, norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=seq_len, tie_embeddings=False)
    model, _ = build_model(arch)
    ddp = wrap_ddp(model)
    g = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(num_micro):
        ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=g)
        mask = torch.zeros(micro_batch, seq_len - 1, dtype=torch.bool)
        for b in range(micro_batch):
            length = int(torch.randint(seq_len // 2, seq_len * 3 // 4, (1,), generator=g))  # ragged
            mask[b, seq_len // 4: seq_len // 4 + length] = True
        lp = -10.0 + 0.3 * torch.randn(micro_batch, seq_len - 1, generator=g)
        micro.append(dict(input_ids=ids, loss_mask=mask, old_logprobs=lp, rollout_logprobs=lp + 0.01,
                          advantages=torch.randn(micro_batch, generator=g)))
    config = PolicyLossConfig(loss="ppo_clip", correction="token_tis", agg="token-mean")

    def rl():
        train_step(ddp, micro, config, vocab_size=vocab)

    def ce_forward_step(data_iterator, model):
        mb = next(data_iterator)
        ids, pos, attn = model_inputs(mb, torch.device("cpu"))
        labels = torch.nn.functional.pad(ids[:, 1:], (0, 1))
        per_token = model(ids, pos, attention_mask=attn, labels=labels)  # [B, S], Megatron's CE
        mask = torch.nn.functional.pad(mb["loss_mask"], (0, 1)).float()

        def loss_func(output):
            n = mask.sum().to(torch.int)
            total = (output * mask).sum()
            return total, n, {"lm loss": torch.stack([total.detach(), n.float()])}

        return per_token, loss_func

    def ce():
        ddp.zero_grad_buffer()
        get_forward_backward_func()(
            forward_step_func=ce_forward_step, data_iterator=iter(micro), model=[ddp],
            num_microbatches=num_micro, seq_length=seq_len, micro_batch_size=micro_batch, forward_only=False,
        )

    cpu = {"rl": [], "ce": []}
    wall = {"rl": [], "ce": []}
    for fn in (rl, ce):  # warm-up
        fn()
    for _ in range(repeats):  # interleaved, so drift hits both alike
        for name, fn in (("rl", rl), ("ce", ce)):
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    # Vocabulary entries per forward matmul FLOP per token: how much of a step is the log-prob's
    # elementwise work (same formula: Qwen2.5-0.5B 1.5e-4, Llama-3-8B 8.5e-6).
    kv = arch.num_kv_heads * arch.head_dim
    flops = 2 * layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * arch.ffn_hidden_size)
    flops += 2 * hidden * vocab
    out = dict(tokens_per_step=num_micro * micro_batch * seq_len, vocab=vocab, hidden=hidden, layers=layers,
               threads=threads, repeats=repeats, vocab_entries_per_flop=vocab / flops)
    for clock, times in (("cpu", cpu), ("wall", wall)):
        for stat, fn in (("min", min), ("median", statistics.median)):
            rl_s, ce_s = fn(times["rl"]), fn(times["ce"])
            out[f"{clock}_{stat}"] = dict(rl_step_s=rl_s, ce_step_s=ce_s, overhead=rl_s / ce_s - 1.0)
    out["overhead"] = out["cpu_min"]["overhead"]
    return out


def step_child(out: str, **kwargs) -> None:
    torch.save(step_overhead(**kwargs), out)


# ---------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes (a smoke run, not for the record)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the step comparison (default 1: on a shared 2-core machine "
                             "a single thread is the least disturbed by other load; both sides use it)")
    args = parser.parse_args()

    tokens = 512 if args.quick else 4096
    vocabs = (32_000,) if args.quick else (32_000, 152_064)
    memory = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in vocabs:
            for backward in (False, True):
                memory.append(run_memory_case(vocab, tokens, Precision.BF16.value, backward, tmp))
        out = os.path.join(tmp, "step.pt")
        step_kwargs = dict(repeats=2 if args.quick else 5, seq_len=256, micro_batch=2,
                           num_micro=1 if args.quick else 2, vocab=32_000, hidden=256 if args.quick else 512,
                           layers=4 if args.quick else 8, threads=args.threads)
        subprocess.run([sys.executable, __file__, "--step-child", out, json.dumps(step_kwargs)],
                       check=True, cwd=ROOT)
        step = torch.load(out)

    print(f"\n(a) log-probs of {tokens} tokens from bf16 logits, T = 0.8: peak RSS beyond the inputs, MiB")
    print(f"{'V':>8} {'mode':>8} {'input':>8} {'naive':>9} {'chunked':>9} {'ratio':>7} "
          f"{'naive s':>8} {'chunk s':>8} {'max|Δlp|':>10} {'max|Δgrad|':>11}  (s: CPU seconds, 1 thread)")
    for r in memory:
        print(f"{r['vocab']:>8} {r['mode']:>8} {r['input_mib']:>8.0f} {r['naive_peak_mib']:>9.0f} "
              f"{r['chunked_peak_mib']:>9.0f} {r['ratio']:>7.3f} {r['naive_s']:>8.2f} {r['chunked_s']:>8.2f} "
              f"{r['max_abs_diff_logprobs']:>10.2e} {r.get('max_abs_diff_grad', float('nan')):>11.2e}")
    print(f"\n(b) one training step, {step['tokens_per_step']} tokens, llama h={step['hidden']} "
          f"L={step['layers']} V={step['vocab']} ({step['vocab_entries_per_flop']:.1e} vocabulary "
          f"entries per matmul FLOP), fp32, {step['threads']} thread(s), {step['repeats']} interleaved "
          "repeats")
    print(f"{'':>12} {'RL step s':>10} {'CE step s':>10} {'overhead':>9}")
    for key in ("cpu_min", "cpu_median", "wall_min", "wall_median"):
        r = step[key]
        print(f"{key.replace('_', ' '):>12} {r['rl_step_s']:>10.3f} {r['ce_step_s']:>10.3f} "
              f"{100 * r['overhead']:>8.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"memory": memory, "step": step}, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, method, vocab, tokens, dtype, backward, out = sys.argv
        memory_child(method, int(vocab), int(tokens), dtype, bool(int(backward)), out)
    elif len(sys.argv) > 1 and sys.argv[1] == "--step-child":
        step_child(sys.argv[2], **json.loads(sys.argv[3]))
    else:
        main()
