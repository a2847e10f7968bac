#!/usr/bin/env python
"""Measure the training-inference mismatch of a checkpoint in FP16, BF16 and FP32.

    python tools/measure_mismatch.py --hf-dir D --dtypes float16,bfloat16,float32 --out DIR

For each dtype the checkpoint is loaded into Megatron (through the bridge, as the trainer sees it)
and into vLLM (as the rollout sees it); vLLM samples, Megatron re-scores the same tokens, and the
mismatch metrics are written to DIR/mismatch.json with plots (DIR/token_probs.png,
DIR/seq_log_ratio.png) and printed as a table. See docs/fp16.md, "Reading the mismatch report".
For MoE checkpoints the table adds router agreement, and ``--routing-replay`` adds a DTYPE+r3 column:
the same samples re-scored with the engine's routes replayed (docs/rollout.md, "Routing replay").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Only torch-free modules before the arguments are parsed: --help and usage errors answer at once.
from megatron_rlfp16.cli import check_output_dir, positive_float, positive_int  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--dtypes", default="float16,bfloat16,float32",
                   help="comma-separated: float16, bfloat16, float32 (default: all three)")
    p.add_argument("--out", required=True, help="output directory for mismatch.json and the plots")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size of trainer and engine")
    p.add_argument("--num-prompts", type=positive_int, default=16, help="prompts sampled (default 16)")
    p.add_argument("--prompt-len", type=positive_int, default=16, help="longest random prompt in tokens")
    p.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help="sample from these prompts (one JSON object per line, with --prompt-field or a "
                        "'messages' chat list; the first --num-prompts rows), tokenized with the checkpoint's "
                        "own tokenizer and chat template; default: random token prompts")
    p.add_argument("--prompt-field", default="prompt", help="the JSONL field holding the prompt text")
    p.add_argument("--no-chat-template", action="store_true",
                   help="with --prompts: encode the text as it is, without the tokenizer's chat template")
    p.add_argument("--max-tokens", type=positive_int, default=48, help="tokens sampled per prompt (default 48)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--routing-replay", action="store_true",
                   help="MoE checkpoints: re-score the same samples replaying the engine's routes (R3) and "
                        "report both, as columns DTYPE and DTYPE+r3 (router agreement is reported for MoE "
                        "checkpoints either way)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlfp16.diagnostics import mismatch_report as report
    from megatron_rlfp16.models import check_layout, parse_hf_config, read_config_json
    from megatron_rlfp16.runtime.launch import RankFailure, run_on_ranks

    try:
        check_output_dir(args.out, "--out")  # the target first: before the measurement, not after it
        dtypes = report.parse_dtypes(args.dtypes)
        arch = parse_hf_config(read_config_json(args.hf_dir))
        check_layout(arch, tp=args.tp, pp=1, ep=1)  # before any rank starts
        if args.routing_replay and not arch.is_moe:
            raise ValueError(f"--routing-replay: {args.hf_dir} is a dense model ({arch.family}), it has "
                             "no router to replay; valid with Qwen3-MoE and Mixtral checkpoints")
        prompts = {}
        if args.prompts:  # tokenized once, here: every dtype samples from the same ids
            # The engine holds a prompt and its response within the model's positions.
            limit = arch.max_position_embeddings - args.max_tokens - 1
            read = report.read_prompts(args.prompts, args.hf_dir, num_prompts=args.num_prompts,
                                       prompt_field=args.prompt_field, chat_template=not args.no_chat_template,
                                       max_prompt_tokens=limit)
            prompts = dict(prompt_ids=read["ids"], stop_ids=read["stop_ids"])
            if read["skipped"]:
                shown = ", ".join(f"line {line} ({n} tokens)" for line, n in read["skipped"][:5])
                print(f"[mismatch] {len(read['skipped'])} prompts longer than the engine takes ({limit} tokens "
                      f"besides --max-tokens) left out: {shown}" + (", ..." if len(read["skipped"]) > 5 else ""),
                      file=sys.stderr, flush=True)
            print(f"[mismatch] {len(read['ids'])} prompts from {args.prompts} (lines {read['lines'][0]}-"
                  f"{read['lines'][-1]}; chat template: {'yes' if read['chat_template'] else 'no'}; "
                  f"{sum(map(len, read['ids'])) / len(read['ids']):.1f} tokens on average)", file=sys.stderr, flush=True)
        results = {}
        for dtype in dtypes:
            start = time.monotonic()
            print(f"[mismatch] {dtype}: loading Megatron and vLLM, sampling "
                  f"{len(prompts['prompt_ids']) if prompts else args.num_prompts} prompts",
                  file=sys.stderr, flush=True)
            per_rank = run_on_ranks(
                report.measure_rank, args.tp, args.hf_dir, dtype, tp=args.tp,
                num_prompts=args.num_prompts, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                temperature=args.temperature, seed=args.seed, routing_replay=args.routing_replay, timeout=3600,
                **prompts,
            )
            replayed = per_rank[0].pop("r3", None)
            if args.prompts:
                per_rank[0]["metrics"]["prompts_skipped"] = len(read["skipped"])
            results[dtype] = per_rank[0]
            if replayed is not None:
                results[f"{dtype}+r3"] = replayed
            print(f"[mismatch] {dtype}: {per_rank[0]['tokens']} tokens in {time.monotonic() - start:.0f} s",
                  file=sys.stderr, flush=True)
        table = report.write_report(results, args.out, title=os.path.basename(os.path.abspath(args.hf_dir)))
    except RankFailure as e:
        print(f"error: {e.summary()}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {os.path.join(args.out, 'mismatch.json')} and plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
