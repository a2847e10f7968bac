"""Every Python block in README.md and docs/ either runs in a test or says it is a sketch.

A block that claims to run is preceded by ``<!-- doctest: SETUP -->``; its setup provides the names
the prose assumes (``hf_dir``, ``rewards``, ...). Blocks of one file and setup run in order in one
namespace, as a reader would paste them. A block that is an outline (``...`` where the reader's own
code goes) is preceded by ``<!-- sketch -->``. An unmarked block fails ``test_every_block_is_marked``.
"""
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!--\s*(doctest:\s*(\w+)|sketch)\s*-->")


def blocks():
    """``(doc, line, setup or None, code)`` of every Python block."""
    out = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                start = i
                j = i + 1
                while lines[j].strip() != "```":
                    j += 1
                mark = None
                k = start - 1
                while k >= 0 and not lines[k].strip():
                    k -= 1
                m = MARK.search(lines[k]) if k >= 0 else None
                if m:
                    mark = m.group(2) or "sketch"
                out.append((doc.relative_to(ROOT).as_posix(), start + 1, mark, "\n".join(lines[start + 1:j])))
                i = j
            i += 1
    return out


def test_every_block_is_marked():
    unmarked = [f"{doc}:{line}" for doc, line, mark, _ in blocks() if mark is None]
    assert unmarked == [], "mark each Python block <!-- doctest: SETUP --> or <!-- sketch -->"


PRELUDES = {
    "losses": """
        import torch
        from megatron_rlfp16.losses import PolicyLossConfig, compute_advantages
        torch.manual_seed(0)
        group_size, B, T = 8, 16, 12
        rewards = torch.randint(0, 2, (B,)).float()
        logprobs = -torch.rand(B, T)
        old_logprobs = logprobs + 0.01 * torch.randn(B, T)
        rollout_logprobs = logprobs + 0.01 * torch.randn(B, T)
        mask = torch.ones(B, T)
        mask[:, 9:] = 0
        global_num_tokens, global_num_seqs = mask.sum(), torch.tensor(float(B))
        max_response_length = T
    """,
    "tiny_llama": """
        import json, os, sys, tempfile
        import torch, vllm
        from megatron_rlfp16.checkpoint import load_megatron_checkpoint, save_megatron_checkpoint
        from megatron_rlfp16.precision import OverflowGuard
        from megatron_rlfp16.testing.tiny import make_tiny_model
        tmp = tempfile.mkdtemp()
        hf_dir = make_tiny_model("llama", os.path.join(tmp, "hf"), seed=0)
        hf_config = json.load(open(os.path.join(hf_dir, "config.json")))
        ckpt_dir = os.path.join(tmp, "ckpt")
    """,
}
EPILOGUES = {
    # vLLM's teardown ends the process group: engines go last, after everything collective.
    "tiny_llama": """
        for name in ("run", "llm"):
            obj = globals().get(name)
            engine = getattr(obj, "engine", None) if name == "run" else None
            if engine is not None:
                engine.close()
            elif name == "llm" and obj is not None:
                from megatron_rlfp16.compat import vllm as vllm_compat
                vllm_compat.shutdown(obj)
        print("DOCTEST-OK")
    """,
}


def _script(setup, codes):
    body = [textwrap.dedent(PRELUDES[setup])] + [f"# --- {where}\n{code}" for where, code in codes]
    body.append(textwrap.dedent(EPILOGUES.get(setup, 'print("DOCTEST-OK")')))
    # Distributed checkpoint saves start helper processes with "spawn": keep the work under main.
    return "if __name__ == '__main__':\n" + textwrap.indent("\n".join(body), "    ") + "\n"


def _groups():
    groups = {}
    for doc, line, mark, code in blocks():
        if mark and mark != "sketch":
            groups.setdefault((doc, mark), []).append((f"{doc}:{line}", code))
    return groups


LANES = {"losses": pytest.mark.unit, "tiny_llama": pytest.mark.vllm}


@pytest.mark.parametrize("doc,setup", [pytest.param(d, s, marks=LANES[s], id=f"{d}-{s}") for d, s in _groups()])
def test_doc_blocks_run(tmp_path, doc, setup):
    script = tmp_path / "doc_blocks.py"
    script.write_text(_script(setup, _groups()[doc, setup]), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "DOCTEST-OK" in proc.stdout, (proc.stdout[-3000:] + proc.stderr[-6000:])
