"""HF <-> Megatron checkpoint conversion, run on every rank (see ``tools/convert_checkpoint.py``).

``validate_*`` run once, before any rank starts, so that bad input fails fast with a clear message
and nothing is written. ``import_rank`` / ``export_rank`` are what each rank runs.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Optional

import torch

from megatron_rlfp16.checkpoint.hf_io import (
    AtomicDir, CheckpointError, SafetensorsReader, copy_side_files, write_safetensors_shards,
)
from megatron_rlfp16.checkpoint.megatron_ckpt import (
    check_shard_files, checkpoint_dtype, load_megatron_checkpoint, read_meta, save_megatron_checkpoint,
)
from megatron_rlfp16.models.hf_config import check_layout, parse_hf_config, read_config_json
from megatron_rlfp16.precision.dtypes import Precision, config_precision, dtype_name

DTYPES = Precision.long_names()
"""The ``--dtype`` spellings the tool offers (any ``Precision.parse`` spelling is accepted)."""


def parse_dtype(name: str) -> torch.dtype:
    try:
        return Precision.parse(name, field="--dtype").torch_dtype
    except ValueError:
        raise ValueError(f"--dtype {name!r} is not valid; valid: {list(DTYPES)}") from None


def config_dtype(cfg: Dict[str, Any]) -> str:
    """The dtype an HF config declares (``dtype`` in transformers 5, ``torch_dtype`` in 4.x), as its
    long name; FP32 when it declares none or one this project does not train in."""
    return config_precision(cfg).vllm_dtype


def validate_import(hf_dir: str, megatron_dir: str, *, tp: int, pp: int, ep: int, overwrite: bool):
    """Checks the HF directory against the bridge (every tensor present, right shape, readable)
    and the layout against the model, without loading any weights."""
    from megatron_rlfp16.bridge import Bridge
    from megatron_rlfp16.cli import check_output_dir

    check_output_dir(megatron_dir, "--megatron-dir", overwrite=overwrite)  # the target first
    cfg = read_config_json(hf_dir)
    arch = parse_hf_config(cfg)
    check_layout(arch, tp=tp, pp=pp, ep=ep)
    reader = SafetensorsReader(hf_dir)
    expected = Bridge(arch).hf_names()
    missing = [n for n in expected if n not in reader]
    if missing:
        raise CheckpointError(
            f"{hf_dir!r} lacks {len(missing)} tensor(s) the {arch.family!r} config needs, e.g. {missing[:3]}"
        )
    for name in expected:  # reads each tensor once: catches truncated files before any rank starts
        reader.get(name)
    return cfg, arch


def validate_export(megatron_dir: str, hf_dir: str, *, overwrite: bool):
    from megatron_rlfp16.cli import check_output_dir

    check_output_dir(hf_dir, "--hf-dir", overwrite=overwrite)  # the target first
    meta = read_meta(megatron_dir)
    parse_hf_config(meta["hf_config"])
    check_shard_files(megatron_dir)
    return meta


def import_rank(hf_dir: str, megatron_dir: str, *, tp: int, pp: int, ep: int, dtype: str,
                overwrite: bool) -> None:
    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.models import build_model
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=tp, pp=pp, ep=ep))
    cfg = read_config_json(hf_dir)
    model, arch = build_model(cfg, params_dtype=parse_dtype(dtype))
    _log(f"[import] loading {hf_dir} into {arch.family} at tp={tp} pp={pp} ep={ep} ({dtype})")
    load_hf_checkpoint(model, arch, hf_dir)
    cfg = dict(cfg, dtype=dtype_name(dtype))
    save_megatron_checkpoint(model, megatron_dir, hf_config=cfg, overwrite=overwrite, copy_files_from=hf_dir)
    _log(f"[import] wrote distributed checkpoint {megatron_dir}")


def export_rank(megatron_dir: str, hf_dir: str, *, tp: int, pp: int, ep: int, dtype: Optional[str],
                overwrite: bool, max_shard_bytes: int = 2 << 30, bucket_bytes: int = 256 << 20) -> None:
    import torch.distributed as dist

    from megatron_rlfp16.bridge import StagingBuffer, export_hf
    from megatron_rlfp16.models import build_model
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=tp, pp=pp, ep=ep))
    meta = read_meta(megatron_dir)
    cfg = meta["hf_config"]
    model, arch = build_model(cfg, params_dtype=checkpoint_dtype(meta))
    load_megatron_checkpoint(model, megatron_dir)
    out_dtype = parse_dtype(dtype) if dtype else checkpoint_dtype(meta)
    # The writer copies every tensor it receives, so one staging buffer serves all buckets.
    stream = export_hf(model, arch, dtype=out_dtype, bucket_bytes=bucket_bytes, receivers=0,
                       staging=StagingBuffer())
    if dist.get_rank() != 0:
        for _ in stream:  # collective: every rank drives the generator
            pass
        return
    total = len(_bridge_names(arch))
    start, done, nbytes = time.monotonic(), 0, 0

    def progress(name, n):
        nonlocal done, nbytes
        done, nbytes = done + 1, nbytes + n
        if done == total or done % max(1, total // 10) == 0:
            _log(f"[export] {done}/{total} tensors, {nbytes / 2**20:.1f} MiB, {time.monotonic() - start:.1f} s")

    with AtomicDir(hf_dir, overwrite=overwrite) as tmp:
        write_safetensors_shards(stream, tmp, max_shard_bytes=max_shard_bytes, progress=progress)
        name = dtype_name(out_dtype)
        cfg = dict(cfg, dtype=name, torch_dtype=name)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        copy_side_files(megatron_dir, tmp)
    _log(f"[export] wrote {hf_dir}")


def _bridge_names(arch):
    from megatron_rlfp16.bridge import Bridge

    return Bridge(arch).hf_names()


def _log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)
