"""The directory the bad-input tables of docs/quickstart.md and docs/conversion.md run in.

Each name in those tables is made here: ``hf`` (a tiny Llama, no tokenizer files), ``chat`` (a tiny
Llama with a tokenizer and chat template), ``m`` (a Megatron checkpoint of ``hf``), damaged copies
(``m-truncated``: a shard file cut to a third; ``m-bad-meta``: ``rlfp16.json`` cut short;
``hf-bad-index``: a safetensors index cut short), prompt files (``data.jsonl`` good;
``bad-json.jsonl``: line 2 is not JSON; ``empty-prompt.jsonl``: line 1's prompt is empty;
``long-prompt.jsonl``: line 2's prompt is longer than the engine takes) and ``report.txt`` (a file).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys


def _copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def make_sandbox(root: str, repo: str) -> str:
    from megatron_rlfp16.testing.tiny import make_chat_model, make_tiny_model

    hf = make_tiny_model("llama", os.path.join(root, "hf"))
    make_chat_model(os.path.join(root, "chat"), seed=1)
    subprocess.run([sys.executable, os.path.join(repo, "tools/convert_checkpoint.py"), "import", "--hf-dir", hf,
                    "--megatron-dir", os.path.join(root, "m")], check=True, capture_output=True, timeout=600)
    bad = _copy(os.path.join(root, "m"), os.path.join(root, "m-truncated"))
    shard = sorted(n for n in os.listdir(bad) if n.endswith(".distcp"))[-1]
    with open(os.path.join(bad, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(bad, shard)) // 3)
    meta = _copy(os.path.join(root, "m"), os.path.join(root, "m-bad-meta"))
    with open(os.path.join(meta, "rlfp16.json"), "w") as f:
        f.write('{"format_version": 1, "hf_config": {')
    index = _copy(hf, os.path.join(root, "hf-bad-index"))
    with open(os.path.join(index, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": {"lm_head.weight": ')

    def jsonl(name, rows):
        with open(os.path.join(root, name), "w", encoding="utf-8") as f:
            for row in rows:
                f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")

    good = [{"prompt": f"what is {i} + {i} ?", "answer": str(2 * i)} for i in range(1, 5)]
    jsonl("data.jsonl", good)
    jsonl("bad-json.jsonl", [good[0], '{"prompt": "what is 1 ?", "answer": ', good[1]])
    jsonl("empty-prompt.jsonl", [{"prompt": "", "answer": "1"}, good[0]])
    jsonl("long-prompt.jsonl", [good[0], {"prompt": " ".join(["1 + 1"] * 200), "answer": "2"}, good[1]])
    with open(os.path.join(root, "report.txt"), "w") as f:
        f.write("not a directory\n")
    return root
