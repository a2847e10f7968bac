"""Hugging Face safetensors directories: a lazy per-tensor reader and an atomic, size-sharded writer.

The reader opens each file once and reads only the tensors asked for, so a rank importing its shards
touches only what it needs. The writer writes into a temporary directory next to the target and
renames it into place when everything is written: a failure leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

INDEX_NAME = "model.safetensors.index.json"
# Copied alongside the weights on export when the source directory has them.
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


class CheckpointError(RuntimeError):
    """A checkpoint on disk that cannot be read: names the file and what is wrong."""


def read_json(path: str, *, expect: type = dict):
    """A JSON file of a checkpoint, with errors that name the file (a half-copied or hand-edited
    index or metadata file otherwise surfaces as a bare ``JSONDecodeError``)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                              "the file is damaged or was not copied completely") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason}); the file is damaged") from None
    if not isinstance(value, expect):
        raise CheckpointError(f"{path}: expected a JSON {expect.__name__}, got {type(value).__name__}")
    return value


class SafetensorsReader:
    """Reads named tensors from an HF directory (single file or sharded with an index)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.hf_dir = hf_dir
        self._handles: Dict[str, object] = {}
        index_path = os.path.join(hf_dir, INDEX_NAME)
        self._where: Dict[str, str] = {}
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' object naming the tensors' files")
            for name, file in weight_map.items():
                self._where[name] = os.path.join(hf_dir, file)
            for path in sorted(set(self._where.values())):
                if not os.path.isfile(path):
                    raise CheckpointError(f"{index_path} lists {os.path.basename(path)!r}, which is missing")
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"{hf_dir!r} has no *.safetensors files")
            for file in files:
                for name in self._open(os.path.join(hf_dir, file)).keys():
                    self._where[name] = os.path.join(hf_dir, file)

    def _open(self, path: str):
        if path not in self._handles:
            try:
                self._handles[path] = self._safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated headers
                raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
        return self._handles[path]

    def names(self) -> List[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is not in {self.hf_dir!r}")
        path = self._where[name]
        try:
            return self._open(path).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # a truncated data section surfaces only when the tensor is read
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e})") from None


class AtomicDir:
    """``with AtomicDir(out, overwrite) as tmp:`` writes into ``tmp``; on success ``tmp`` replaces
    ``out``; on any error ``tmp`` is removed and ``out`` is left as it was.

    ``tmp`` is the hidden sibling ``.<name>.tmp-<pid>``. A write killed outright (SIGKILL) cannot
    remove it, so every start first removes the siblings of that pattern whose process is gone
    (only those: a concurrent live write is left alone). The result gets the mode ``out`` had, or
    the one a new directory gets under the umask (never the 0700 of a private temp directory)."""

    def __init__(self, target: str, overwrite: bool = False):
        self.target = os.path.abspath(target)
        self.overwrite = overwrite
        self.tmp: Optional[str] = None

    def __enter__(self) -> str:
        if os.path.exists(self.target) and not self.overwrite:
            raise FileExistsError(f"{self.target!r} already exists; pass --overwrite to replace it")
        parent = os.path.dirname(self.target)
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(self.target)
        self.tmp = _temp_name(self.target, os.getpid())
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        if os.path.isdir(self.target):
            os.chmod(self.tmp, os.stat(self.target).st_mode & 0o7777)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.target):
            old = self.tmp + ".old"
            os.rename(self.target, old)
            os.rename(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.target)
        return False


def _temp_name(target: str, pid: int) -> str:
    parent, base = os.path.split(target)
    return os.path.join(parent, f".{base}.tmp-{pid}")


def remove_stale_temps(target: str) -> List[str]:
    """Removes ``.<name>.tmp-<pid>`` (and its ``.old``) beside ``target`` whose process is gone;
    returns what it removed."""
    parent, base = os.path.split(os.path.abspath(target))
    prefix = f".{base}.tmp-"
    removed = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        pid = name[len(prefix):].removesuffix(".old")
        if not name.startswith(prefix) or not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        removed.append(os.path.join(parent, name))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier write in this process that was interrupted
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def write_safetensors_shards(
    tensors: Iterable[Tuple[str, torch.Tensor]],
    out_dir: str,
    *,
    max_shard_bytes: int = 2 << 30,
    progress=None,
) -> Dict[str, str]:
    """Writes ``(name, tensor)`` pairs into size-bounded ``model-0000i-of-0000n.safetensors`` files
    plus an index (a single ``model.safetensors`` when one file suffices). Holds at most one shard's
    tensors in memory. Returns the weight map."""
    from safetensors.torch import save_file

    pending: Dict[str, torch.Tensor] = {}
    pending_bytes = 0
    written: List[Tuple[str, List[str]]] = []
    total = 0

    def flush():
        nonlocal pending, pending_bytes
        if not pending:
            return
        name = f"part-{len(written):05d}.safetensors"
        save_file(pending, os.path.join(out_dir, name), metadata={"format": "pt"})
        written.append((name, list(pending)))
        pending, pending_bytes = {}, 0

    seen = set()
    for name, t in tensors:
        if name in seen:
            raise ValueError(f"tensor {name!r} was produced twice")
        seen.add(name)
        nbytes = t.numel() * t.element_size()
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        pending[name] = t.detach().contiguous().clone()
        pending_bytes += nbytes
        total += nbytes
        if progress is not None:
            progress(name, nbytes)
    flush()
    weight_map: Dict[str, str] = {}
    if len(written) == 1:
        os.rename(os.path.join(out_dir, written[0][0]), os.path.join(out_dir, "model.safetensors"))
        weight_map = {n: "model.safetensors" for n in written[0][1]}
    else:
        for i, (tmp_name, names) in enumerate(written):
            final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            os.rename(os.path.join(out_dir, tmp_name), os.path.join(out_dir, final))
            weight_map.update({n: final for n in names})
        with open(os.path.join(out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return weight_map


def copy_side_files(src_dir: Optional[str], out_dir: str) -> List[str]:
    copied = []
    if src_dir and os.path.isdir(src_dir):
        for name in SIDE_FILES:
            path = os.path.join(src_dir, name)
            if os.path.isfile(path):
                shutil.copy2(path, os.path.join(out_dir, name))
                copied.append(name)
    return copied


def iter_hf_files(hf_dir: str) -> Iterator[str]:
    yield from sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
