#!/usr/bin/env python
"""Convert checkpoints between Hugging Face safetensors and Megatron-Core distributed checkpoints.

    python tools/convert_checkpoint.py import --hf-dir HF --megatron-dir M --tp 2 --pp 1 --ep 1 [--dtype D]
    python tools/convert_checkpoint.py export --megatron-dir M --hf-dir OUT [--dtype float16] [--overwrite]
    python tools/convert_checkpoint.py export --megatron-dir RUN/checkpoint [--hf-dir MERGED] [--peft-dir ADAPTER]

Run with plain ``python`` it starts tp*pp*ep local ranks itself (gloo on CPU, nccl on GPU); under
``torchrun`` it uses the world it is given. The Megatron side is layout-independent: a checkpoint
imported at one TP/PP/EP layout exports (or trains) at another. Nothing is written unless the whole
conversion succeeds. A LoRA run's checkpoint (adapters only) exports as the merged model (``--hf-dir``)
and/or as a PEFT adapter directory (``--peft-dir``) that ``peft`` and vLLM load. See docs/conversion.md.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Only torch-free modules before the arguments are parsed: --help and usage errors answer at once.
from megatron_rlfp16.cli import positive_float, positive_int  # noqa: E402
from megatron_rlfp16.precision.dtypes import Precision  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("import", "HF safetensors -> Megatron distributed checkpoint"),
                            ("export", "Megatron distributed checkpoint -> HF safetensors")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--hf-dir", required=name == "import",
                       help="HF model directory (read by import, written by export; for a LoRA checkpoint "
                            "the base merged with the adapters)")
        s.add_argument("--megatron-dir", required=True,
                       help="Megatron checkpoint directory (written by import, read by export)")
        s.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size of the ranks doing the work")
        s.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size")
        s.add_argument("--ep", type=positive_int, default=1, help="expert-parallel size (MoE models)")
        s.add_argument("--dtype", choices=Precision.long_names(), default=None,
                       help="import: parameter dtype (default: the HF config's); "
                            "export: tensor dtype written (default: the checkpoint's)")
        s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        s.add_argument("--verbose", action="store_true", help="print full tracebacks of failing ranks")
        if name == "export":
            s.add_argument("--peft-dir", default=None,
                           help="LoRA checkpoint: write the adapters here as a PEFT directory "
                                "(adapter_config.json + adapter_model.safetensors)")
            s.add_argument("--base-hf-dir", default=None,
                           help="LoRA checkpoint: the base model (default: the one the checkpoint recorded)")
            s.add_argument("--max-shard-size", type=positive_float, default=2.0,
                           help="largest safetensors file in GiB (default 2)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_rlfp16.checkpoint import convert
    from megatron_rlfp16.runtime.launch import RankFailure, run_on_ranks

    try:
        if args.hf_dir and os.path.realpath(args.hf_dir) == os.path.realpath(args.megatron_dir):
            raise ValueError(f"--hf-dir and --megatron-dir are the same directory {args.hf_dir!r}; the "
                             "conversion would replace its own source: give the output its own directory")
        if args.command == "import":
            cfg, _ = convert.validate_import(args.hf_dir, args.megatron_dir, tp=args.tp, pp=args.pp,
                                             ep=args.ep, overwrite=args.overwrite)
            fn = convert.import_rank
            kwargs = dict(tp=args.tp, pp=args.pp, ep=args.ep, overwrite=args.overwrite,
                          dtype=args.dtype or convert.config_dtype(cfg))
            paths = (args.hf_dir, args.megatron_dir)
        else:
            convert.validate_export(args.megatron_dir, args.hf_dir, overwrite=args.overwrite,
                                    peft_dir=args.peft_dir, base_hf_dir=args.base_hf_dir)
            fn = convert.export_rank
            kwargs = dict(tp=args.tp, pp=args.pp, ep=args.ep, overwrite=args.overwrite, dtype=args.dtype,
                          max_shard_bytes=int(args.max_shard_size * 2**30), peft_dir=args.peft_dir,
                          base_hf_dir=args.base_hf_dir)
            paths = (args.megatron_dir, args.hf_dir)
        if "RANK" in os.environ:  # under torchrun: this process is one rank of the given world
            fn(*paths, **kwargs)
        else:
            run_on_ranks(fn, args.tp * args.pp * args.ep, *paths, timeout=24 * 3600, **kwargs)
    except RankFailure as e:
        print(f"error: {e if args.verbose else e.summary()}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
