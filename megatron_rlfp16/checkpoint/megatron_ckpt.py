"""Megatron-Core distributed checkpoints with the HF config they were made from.

A checkpoint directory holds Megatron's ``dist_checkpointing`` files (sharded, layout-independent: one
saved at TP=2 loads at TP=1 or PP=2) plus ``rlfp16.json`` with the Hugging Face config and the dtype,
so that export needs nothing but the directory. Saves go to a temporary sibling directory that is
renamed into place once every rank has finished: an interrupted save leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from megatron_rlfp16.checkpoint.hf_io import CheckpointError, copy_side_files, read_json
from megatron_rlfp16.runtime.faults import pause_point

META_NAME = "rlfp16.json"
FORMAT_VERSION = 1


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_str(value: Optional[str]) -> str:
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def read_meta(ckpt_dir: str) -> Dict[str, Any]:
    """The ``rlfp16.json`` of a checkpoint, with errors that name the directory."""
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"--megatron-dir {ckpt_dir!r} is not a directory")
    path = os.path.join(ckpt_dir, META_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{ckpt_dir!r} has no {META_NAME}: not a checkpoint written by megatron-rlfp16 "
            "(tools/convert_checkpoint.py import makes one)"
        )
    meta = read_json(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={meta.get('format_version')!r}; supported: {FORMAT_VERSION}")
    return meta


def model_sharded_state_dict(model) -> Dict[str, Any]:
    """The model's part of a checkpoint: Megatron's ``sharded_state_dict()``, or for a model with LoRA
    adapters only the adapters (the frozen base comes from its HF checkpoint, recorded in the
    checkpoint's ``rlfp16.json`` under "lora")."""
    from megatron_rlfp16.bridge.context import unwrap

    bare = unwrap(model)
    sharded = bare.sharded_state_dict()
    if getattr(bare, "_rlfp16_lora", None):
        sharded = {k: v for k, v in sharded.items() if ".lora." in k}
    return sharded


def lora_meta(model, base_hf_dir: Optional[str]) -> Optional[Dict[str, Any]]:
    """What ``rlfp16.json`` records of a model's LoRA adapters (None without): their config and the
    base checkpoint they adapt, with a fingerprint of its weight files."""
    from megatron_rlfp16.lora.layers import lora_config_of

    config = lora_config_of(model)
    if config is None:
        return None
    return dict(rank=config.rank, alpha=config.resolved_alpha, dropout=config.dropout,
                target_modules=adapted_modules(model),
                base_hf_dir=os.path.abspath(base_hf_dir) if base_hf_dir else None,
                base_fingerprint=base_fingerprint(base_hf_dir) if base_hf_dir else None)


def adapted_modules(model) -> list:
    """The HF module names (``q_proj``, ...) a model's adapters cover."""
    from megatron_rlfp16.bridge.context import unwrap

    adapters = unwrap(model)._rlfp16_lora["adapters"].values()
    return sorted({hf.rsplit(".", 1)[-1] for a in adapters for hf in a.hf_modules.values()})


def base_fingerprint(hf_dir: str) -> str:
    """Names and sizes of an HF checkpoint's weight files: enough to tell one base model from another
    without reading them."""
    names = sorted(n for n in os.listdir(hf_dir) if n.endswith((".safetensors", ".bin"))) if os.path.isdir(hf_dir) else []
    return ";".join(f"{n}:{os.path.getsize(os.path.join(hf_dir, n))}" for n in names)


def save_megatron_checkpoint(
    model,
    ckpt_dir: str,
    *,
    hf_config: Dict[str, Any],
    extra_state: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    copy_files_from: Optional[str] = None,
    extra_files: Optional[Dict[str, str]] = None,
    keep_previous_as: Optional[str] = None,
    lora_base: Optional[str] = None,
    extra_models: Optional[Dict[str, Any]] = None,
) -> None:
    """Collective: saves ``model`` (plus ``extra_state``, a sharded-state-dict fragment such as the
    optimizer's) to ``ckpt_dir`` atomically. Tokenizer/generation files found in ``copy_files_from``
    are kept with it so that a later export can hand them on. ``extra_files`` (name -> text, written
    by rank 0) go into the same atomic rename, e.g. a trainer's step and data position.
    ``keep_previous_as`` (a path) keeps the checkpoint being replaced there instead of deleting it.
    A model with LoRA adapters saves only them; ``lora_base`` is the HF checkpoint they adapt
    (recorded, so that a resume or an export finds it). ``extra_models`` (name -> ``(model,
    extra_state)``, e.g. PPO's critic) are saved as checkpoints of their own in ``ckpt_dir/<name>``,
    inside the same atomic write; load each with ``load_megatron_checkpoint(model, ckpt_dir/<name>)``."""
    from megatron.core import dist_checkpointing

    from megatron_rlfp16.bridge.context import unwrap

    target = os.path.abspath(ckpt_dir)
    error = None
    if _is_rank0() and os.path.exists(target) and not overwrite:
        error = f"{target!r} already exists; pass --overwrite to replace it"
    error = _broadcast_str(error)
    if error:
        raise FileExistsError(error)
    tmp = _broadcast_str(target + f".tmp-{os.getpid()}" if _is_rank0() else None)
    try:
        if _is_rank0():
            recover_checkpoint(target)  # a previous save killed mid-swap, or its leftovers
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            if os.path.isdir(target):  # --overwrite keeps the directory's mode
                os.chmod(tmp, os.stat(target).st_mode & 0o7777)
        _barrier()
        bare = unwrap(model)
        sharded = {"model": model_sharded_state_dict(bare)}
        if extra_state:
            sharded.update(extra_state)
        lora = lora_meta(bare, lora_base)
        _start_writer_results_queue()
        dist_checkpointing.save(sharded, tmp)
        _barrier()
        for name, (other, other_state) in (extra_models or {}).items():
            sub = os.path.join(tmp, name)
            if _is_rank0():
                os.makedirs(sub)
            _barrier()
            other_bare = unwrap(other)
            dist_checkpointing.save(dict({"model": model_sharded_state_dict(other_bare)}, **(other_state or {})), sub)
            _barrier()
            if _is_rank0():
                from megatron_rlfp16.precision.dtypes import dtype_name

                with open(os.path.join(sub, META_NAME), "w", encoding="utf-8") as f:
                    # Not an HF model (e.g. a critic's value head): no hf_config to export with.
                    json.dump(dict(format_version=FORMAT_VERSION, hf_config=None,
                                   dtype=dtype_name(next(other_bare.parameters()).dtype), model=name), f, indent=2)
        if _is_rank0():
            from megatron_rlfp16.precision.dtypes import dtype_name

            dtype = next(bare.parameters()).dtype
            meta = dict(format_version=FORMAT_VERSION, hf_config=hf_config,
                        dtype=dtype_name(dtype))
            if lora is not None:
                meta["lora"] = lora
            with open(os.path.join(tmp, META_NAME), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2)
            copy_side_files(copy_files_from, tmp)
            for name, text in (extra_files or {}).items():
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(text)
            pause_point("checkpoint-written")
            _swap_in(tmp, target, keep_previous_as=keep_previous_as)
        _barrier()
    except BaseException:
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


_writer_manager = None


def _start_writer_results_queue() -> None:
    """Megatron's checkpoint writer hands its results to the rank through a queue served by a
    ``multiprocessing`` manager process, started on the first save (the module global
    ``filesystem_async._results_queue``, in 0.16 and 0.19). Started there it dies with the SIGTERM that
    ``torchrun`` sends to the rank's process group, and the save that signal asked for fails with
    ``EOFError``. Started here, the manager ignores SIGTERM/SIGINT and ends with its rank."""
    global _writer_manager
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron_rlfp16.runtime.stop import detach_from_stop_signals

    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # already started, or a Megatron that does it otherwise
    # Forked, not spawned: a spawned child starts with default signal actions (and an empty signal
    # mask), so it can die before its initializer runs; a forked one has the rank's handlers until then.
    manager = SyncManager(ctx=mp.get_context("fork"))
    manager.start(initializer=detach_from_stop_signals, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    _writer_manager = manager


def _swap_in(tmp: str, target: str, *, keep_previous_as: Optional[str] = None) -> None:
    """Puts the complete checkpoint ``tmp`` at ``target`` with renames only, so that at every
    instant a complete checkpoint exists: ``target`` (the old one), then ``target.old-PID`` (the old
    one, moved aside), then ``target`` (the new one). The old one is deleted last (or renamed to
    ``keep_previous_as``)."""
    old = f"{target}.old-{os.getpid()}"
    if os.path.exists(target):
        os.rename(target, old)
        pause_point("checkpoint-swapping")
    os.rename(tmp, target)
    if keep_previous_as and os.path.exists(old):
        shutil.rmtree(keep_previous_as, ignore_errors=True)
        os.rename(old, keep_previous_as)
    else:
        shutil.rmtree(old, ignore_errors=True)


def _siblings(target: str, marker: str):
    parent, base = os.path.split(target)
    if not os.path.isdir(parent or "."):
        return []
    prefix = base + marker
    return sorted(os.path.join(parent, n) for n in os.listdir(parent or ".")
                  if n.startswith(prefix) and n[len(prefix):].isdigit())


def recover_checkpoint(ckpt_dir: str) -> list:
    """Makes ``ckpt_dir`` the last complete checkpoint again after a save was killed; returns what
    it removed or moved. Only this module's own names are touched: ``<dir>.tmp-<pid>`` (a write
    that never finished: removed) and ``<dir>.old-<pid>`` (the previous checkpoint moved aside
    during a swap: moved back when ``<dir>`` is missing, removed when ``<dir>`` is complete).
    Not collective: call it on one rank (the saving rank does, before every save)."""
    target = os.path.abspath(ckpt_dir)
    done = []
    for tmp in _siblings(target, ".tmp-"):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(tmp)
    olds = _siblings(target, ".old-")
    if olds and not os.path.isdir(target):
        newest = max(olds, key=os.path.getmtime)
        os.rename(newest, target)
        done.append(newest)
        olds.remove(newest)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
        done.append(old)
    return done


def load_megatron_checkpoint(model, ckpt_dir: str, *, extra_state: Optional[Dict[str, Any]] = None) -> Dict:
    """Collective: loads the model weights saved by :func:`save_megatron_checkpoint` into ``model``
    (any TP/PP/EP layout). Returns the loaded ``extra_state`` entries."""
    from megatron.core import dist_checkpointing

    from megatron_rlfp16.bridge.context import unwrap

    meta = read_meta(ckpt_dir)
    check_shard_files(ckpt_dir)
    bare = unwrap(model)
    check_lora_matches(meta, bare, ckpt_dir)
    sharded = {"model": model_sharded_state_dict(bare)}
    if extra_state:
        sharded.update(extra_state)
    try:
        loaded = dist_checkpointing.load(sharded, ckpt_dir)
    except Exception as e:  # torch.distributed.checkpoint raises many types for damaged files
        raise CheckpointError(f"{ckpt_dir}: the checkpoint cannot be loaded ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1] if str(e).strip() else e!r})") from e
    missing, unexpected = bare.load_state_dict(loaded.pop("model"), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if getattr(bare, "_rlfp16_lora", None):  # the frozen base is not in the checkpoint
        missing = [k for k in missing if ".lora." in k]
    if missing or unexpected:
        raise RuntimeError(f"{ckpt_dir}: checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return loaded


def check_lora_matches(meta: Dict[str, Any], model, ckpt_dir: str) -> None:
    """A checkpoint with LoRA adapters loads only into a model with the same adapters, and one without
    only into a model without; anything else is an error that says which side has what."""
    from megatron_rlfp16.lora.layers import lora_config_of

    saved, config = meta.get("lora"), lora_config_of(model)
    if saved is None and config is None:
        return
    if saved is None:
        raise CheckpointError(f"{ckpt_dir} holds a full model without LoRA adapters, and this run has LoRA "
                              f"(rank {config.rank}); resume it without LoRA (--lora-rank 0), or start the "
                              "LoRA run from an HF export of it (tools/convert_checkpoint.py export)")
    if config is None:
        raise CheckpointError(f"{ckpt_dir} holds LoRA adapters (rank {saved['rank']}) for the base "
                              f"{saved.get('base_hf_dir')!r}, and this run has no LoRA; resume it with "
                              f"--lora-rank {saved['rank']}, or export a merged model first "
                              "(tools/convert_checkpoint.py export)")
    mine = (config.rank, float(config.resolved_alpha), adapted_modules(model))
    theirs = (saved["rank"], float(saved["alpha"]), sorted(saved.get("target_modules") or []))
    if theirs != mine:
        raise CheckpointError(f"{ckpt_dir} holds LoRA adapters of rank {theirs[0]}, alpha {theirs[1]} on "
                              f"{', '.join(theirs[2])}; this run has rank {mine[0]}, alpha {mine[1]} on "
                              f"{', '.join(mine[2])}: use the checkpoint's")


def check_shard_files(ckpt_dir: str) -> None:
    """Every data file the checkpoint's ``.metadata`` refers to is there and long enough, or an
    error naming the first that is not (a truncated ``.distcp`` otherwise fails deep inside the
    load with a bare ``EOFError``)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(ckpt_dir).read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: no .metadata file: not a complete distributed checkpoint") from None
    except Exception as e:
        raise CheckpointError(f"{os.path.join(ckpt_dir, '.metadata')}: cannot be read ({type(e).__name__}: {e}); "
                              "the file is damaged or was not copied completely") from None
    needed: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (the checkpoint's .metadata refers to it)")
        if os.path.getsize(path) < size:
            raise CheckpointError(f"{path}: truncated ({os.path.getsize(path)} bytes, the checkpoint's .metadata "
                                  f"needs {size}); the file was not written or copied completely")


def checkpoint_dtype(meta: Dict[str, Any]) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in (FP32 when its metadata names none)."""
    from megatron_rlfp16.precision.dtypes import Precision

    return Precision.parse(meta.get("dtype") or Precision.FP32, field="rlfp16.json dtype").torch_dtype
