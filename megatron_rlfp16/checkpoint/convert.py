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


def validate_export(megatron_dir: str, hf_dir: Optional[str], *, overwrite: bool, peft_dir: Optional[str] = None,
                    base_hf_dir: Optional[str] = None):
    """Checks the outputs, the checkpoint and, for LoRA adapters, their base model before any rank
    starts. ``hf_dir`` gets the model (merged with the adapters for a LoRA checkpoint), ``peft_dir``
    the adapters as a PEFT directory; at least one is needed."""
    from megatron_rlfp16.cli import check_output_dir

    if not hf_dir and not peft_dir:
        raise ValueError("export needs --hf-dir (the model; merged with the adapters for a LoRA checkpoint) "
                         "and/or --peft-dir (the LoRA adapters as a PEFT directory)")
    for path, flag in ((hf_dir, "--hf-dir"), (peft_dir, "--peft-dir")):  # the targets first
        if path:
            check_output_dir(path, flag, overwrite=overwrite)
    meta = read_meta(megatron_dir)
    parse_hf_config(meta["hf_config"])
    check_shard_files(megatron_dir)
    lora = meta.get("lora")
    if peft_dir and not lora:
        raise ValueError(f"--peft-dir: {megatron_dir!r} holds a full model without LoRA adapters; "
                         "export it with --hf-dir")
    if base_hf_dir and not lora:
        raise ValueError(f"--base-hf-dir: {megatron_dir!r} holds a full model, it needs no base model")
    if lora:
        base = lora_base_dir(meta, base_hf_dir, megatron_dir)
        cfg = read_config_json(base)
        if parse_hf_config(cfg) != parse_hf_config(meta["hf_config"]):
            raise ValueError(f"--base-hf-dir {base!r}: its config.json is not the model the adapters in "
                             f"{megatron_dir!r} were trained on")
    return meta


def lora_base_dir(meta: Dict[str, Any], given: Optional[str], megatron_dir: str) -> str:
    """The HF checkpoint a LoRA checkpoint's adapters adapt: ``given`` (``--base-hf-dir``), else
    the one the checkpoint recorded; it must exist and, when recorded, have the same weight files."""
    from megatron_rlfp16.checkpoint.megatron_ckpt import base_fingerprint

    lora = meta["lora"]
    base = given or lora.get("base_hf_dir")
    if not base or not os.path.isdir(base):
        raise FileNotFoundError(f"{megatron_dir!r} holds LoRA adapters whose base model {base!r} is not a "
                                "directory here; pass it with --base-hf-dir")
    recorded = lora.get("base_fingerprint")
    if recorded and recorded != base_fingerprint(base):
        raise ValueError(f"--base-hf-dir {base!r}: its weight files ({base_fingerprint(base)}) are not the ones "
                         f"the adapters were trained on ({recorded})")
    return base


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


def export_rank(megatron_dir: str, hf_dir: Optional[str], *, tp: int, pp: int, ep: int, dtype: Optional[str],
                overwrite: bool, max_shard_bytes: int = 2 << 30, bucket_bytes: int = 256 << 20,
                peft_dir: Optional[str] = None, base_hf_dir: Optional[str] = None) -> None:
    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.models import build_model
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=tp, pp=pp, ep=ep))
    meta = read_meta(megatron_dir)
    cfg = meta["hf_config"]
    model, arch = build_model(cfg, params_dtype=checkpoint_dtype(meta))
    lora = meta.get("lora")
    side_files = megatron_dir
    if lora:  # the frozen base from its HF checkpoint, then the trained adapters
        from megatron_rlfp16.lora import LoraConfig, apply_lora

        side_files = lora_base_dir(meta, base_hf_dir, megatron_dir)
        load_hf_checkpoint(model, arch, side_files)
        apply_lora(model, arch, LoraConfig(rank=int(lora["rank"]), alpha=float(lora["alpha"]),
                                           target_modules=tuple(lora["target_modules"])))
        _log(f"[export] LoRA adapters (rank {lora['rank']}) on the base {side_files}")
    load_megatron_checkpoint(model, megatron_dir)
    out_dtype = parse_dtype(dtype) if dtype else checkpoint_dtype(meta)
    if peft_dir:
        _write_adapters(model, arch, lora, peft_dir, dtype=out_dtype, base=side_files, overwrite=overwrite)
    if hf_dir:
        write_hf_model(model, arch, hf_dir, hf_config=cfg, dtype=out_dtype, overwrite=overwrite,
                       max_shard_bytes=max_shard_bytes, bucket_bytes=bucket_bytes, side_files_from=side_files,
                       merge_lora=bool(lora))


def write_hf_model(model, arch, hf_dir: str, *, hf_config: Dict[str, Any], dtype: torch.dtype, overwrite: bool = False,
                   max_shard_bytes: int = 2 << 30, bucket_bytes: int = 256 << 20, side_files_from: Optional[str] = None,
                   merge_lora: bool = False) -> None:
    """Collective: writes the (sharded) Megatron ``model`` as an HF checkpoint directory (rank 0 writes,
    atomically; ``config.json`` with ``dtype``, tokenizer files copied from ``side_files_from``).
    ``merge_lora``: the adapted weights go out merged with their LoRA adapters."""
    import torch.distributed as dist

    from megatron_rlfp16.bridge import StagingBuffer, export_hf

    # The writer copies every tensor it receives, so one staging buffer serves all buckets.
    stream = export_hf(model, arch, dtype=dtype, bucket_bytes=bucket_bytes, receivers=0,
                       staging=StagingBuffer(), merge_lora=merge_lora)
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
        name = dtype_name(dtype)
        cfg = dict(hf_config, dtype=name, torch_dtype=name)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        copy_side_files(side_files_from, tmp)
    _log(f"[export] wrote {hf_dir}" + (" (the base merged with the adapters)" if merge_lora else ""))


def _write_adapters(model, arch, lora: Dict[str, Any], peft_dir: str, *, dtype, base: str, overwrite: bool) -> None:
    """The adapters as a PEFT directory (collective: every rank takes part in the gather; rank 0 writes)."""
    import torch.distributed as dist

    from megatron_rlfp16.lora import LoraConfig, gather_adapters, write_peft_dir

    tensors = gather_adapters(model, arch)
    if dist.get_rank() == 0:
        config = LoraConfig(rank=int(lora["rank"]), alpha=float(lora["alpha"]), dropout=float(lora.get("dropout", 0.0)))
        write_peft_dir(tensors, config, peft_dir, base_model=os.path.abspath(base), overwrite=overwrite, dtype=dtype)
        _log(f"[export] wrote {peft_dir} (PEFT LoRA adapter, {len(tensors)} tensors)")
    dist.barrier()


def _bridge_names(arch):
    from megatron_rlfp16.bridge import Bridge

    return Bridge(arch).hf_names()


def _log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)
