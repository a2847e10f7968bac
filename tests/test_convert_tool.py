"""tools/convert_checkpoint.py: layout-independent Megatron checkpoints, bit-exact round trips,
and bad input that fails clearly and leaves nothing behind."""
import importlib.util
import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.tiny import make_tiny_model

pytestmark = pytest.mark.ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDS = (torch.arange(2 * 10).reshape(2, 10) * 13 + 3) % 300


def load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()


def convert(*argv):
    return tool.main([str(a) for a in argv])


def listing(path):
    return sorted(os.listdir(path))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    hf = make_tiny_model("qwen2", str(root / "hf"), seed=3)
    assert convert("import", "--hf-dir", hf, "--megatron-dir", root / "m_tp2", "--tp", 2) == 0
    return root, hf


def logits_from(source, kind, tp, pp):
    """Logits of a model loaded at (tp, pp) from an HF dir or a Megatron checkpoint."""
    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.checkpoint import load_megatron_checkpoint, read_meta
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from test_bridge_parity import pipeline_logits

    init_runtime(ParallelConfig(tp=tp, pp=pp))
    cfg = read_config_json(source) if kind == "hf" else read_meta(source)["hf_config"]
    model, arch = build_model(cfg, parallel_output=False)
    model.eval()
    if kind == "hf":
        load_hf_checkpoint(model, arch, source)
    else:
        load_megatron_checkpoint(model, source)
    with torch.no_grad():
        if pp == 1:
            from megatron_rlfp16.models import causal_mask

            b, s = IDS.shape
            return model(IDS, torch.arange(s)[None].expand(b, s), causal_mask(s))
        return pipeline_logits(model, IDS)


def reshard_job(hf, ckpt):
    return {
        (tp, pp, kind): logits_from(hf if kind == "hf" else ckpt, kind, tp, pp)
        for tp, pp in ((1, 1), (1, 2))
        for kind in ("hf", "megatron")
    }


def test_tp2_checkpoint_loads_at_tp1_and_pp2_with_identical_logits(dense):
    root, hf = dense
    per_rank = run_on_ranks(reshard_job, 2, hf, str(root / "m_tp2"), timeout=600)
    tp1 = per_rank[0]
    assert torch.equal(tp1[1, 1, "megatron"], tp1[1, 1, "hf"])
    pp2 = per_rank[1]  # the last pipeline stage holds the logits
    assert torch.equal(pp2[1, 2, "megatron"], pp2[1, 2, "hf"])
    assert (pp2[1, 2, "megatron"] - tp1[1, 1, "megatron"]).abs().max() < 1e-5


def test_export_round_trip_is_bit_exact_and_complete(dense):
    root, hf = dense
    out = root / "exported"
    assert convert("export", "--megatron-dir", root / "m_tp2", "--hf-dir", out, "--pp", 2) == 0
    original, exported = load_file(f"{hf}/model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["dtype"] == "float32"
    assert "generation_config.json" in listing(out)
    assert not [p for p in listing(root) if ".tmp" in p]


def test_moe_ep2_import_exports_sharded_fp16(tmp_path):
    hf = make_tiny_model("mixtral", str(tmp_path / "hf"), seed=4)
    assert convert("import", "--hf-dir", hf, "--megatron-dir", tmp_path / "m", "--ep", 2) == 0
    out = tmp_path / "out"
    # A tiny shard limit forces several safetensors files and an index.
    assert convert("export", "--megatron-dir", tmp_path / "m", "--hf-dir", out, "--tp", 2,
                   "--dtype", "float16", "--max-shard-size", 0.0002) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    exported = {}
    for f in files:
        exported.update(load_file(out / f))
    original = load_file(f"{hf}/model.safetensors")
    assert sorted(original) == sorted(exported)
    for k, v in original.items():
        assert exported[k].dtype == torch.float16
        assert torch.equal(exported[k], v.to(torch.float16)), k


# ---- bad input: a clear message naming the file or field, a non-zero exit, nothing written ----

def expect_failure(capsys, argv, *needles, code=2):
    assert convert(*argv) == code
    err = capsys.readouterr().err
    for needle in needles:
        assert str(needle) in err, f"{needle!r} not in {err!r}"
    return err


def test_missing_hf_dir(tmp_path, capsys):
    expect_failure(capsys, ["import", "--hf-dir", tmp_path / "nope", "--megatron-dir", tmp_path / "m"],
                   "nope", "not a directory")
    assert listing(tmp_path) == []


def test_hf_dir_without_config(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    expect_failure(capsys, ["import", "--hf-dir", tmp_path / "hf", "--megatron-dir", tmp_path / "m"],
                   "config.json")
    assert listing(tmp_path) == ["hf"]


def test_unsupported_architecture(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    expect_failure(capsys, ["import", "--hf-dir", hf, "--megatron-dir", tmp_path / "m"],
                   "model_type", "gpt2", "llama", "qwen3_moe")


@pytest.mark.parametrize("flag,value,needle", [
    ("--tp", 3, "num_attention_heads=4"),
    ("--ep", 3, "number of experts 4"),
])
def test_layout_that_does_not_divide(tmp_path, capsys, flag, value, needle):
    hf = make_tiny_model("qwen3_moe", str(tmp_path / "hf"))
    expect_failure(capsys, ["import", "--hf-dir", hf, "--megatron-dir", tmp_path / "m", flag, value],
                   f"{flag[2:]}={value}", needle)
    assert listing(tmp_path) == ["hf"]


def test_missing_and_truncated_shards(tmp_path, capsys):
    hf = pathlib.Path(make_tiny_model("llama", str(tmp_path / "hf")))
    # Re-save as two shards with an index, then break them one way at a time.
    tensors = load_file(hf / "model.safetensors")
    from safetensors.torch import save_file

    names = sorted(tensors)
    half = len(names) // 2
    (hf / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[:half]}, hf / "a.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, hf / "b.safetensors")
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "a.safetensors" if i < half else "b.safetensors" for i, n in enumerate(names)}}))
    args = ["import", "--hf-dir", hf, "--megatron-dir", tmp_path / "m"]

    data = (hf / "b.safetensors").read_bytes()
    (hf / "b.safetensors").write_bytes(data[: len(data) // 2])
    expect_failure(capsys, args, "b.safetensors")
    (hf / "b.safetensors").unlink()
    expect_failure(capsys, args, "b.safetensors", "missing")
    assert listing(tmp_path) == ["hf"]


def test_tensor_missing_from_checkpoint(tmp_path, capsys):
    hf = pathlib.Path(make_tiny_model("qwen3", str(tmp_path / "hf")))
    from safetensors.torch import save_file

    tensors = load_file(hf / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_norm.weight"]
    save_file(tensors, hf / "model.safetensors")
    expect_failure(capsys, ["import", "--hf-dir", hf, "--megatron-dir", tmp_path / "m"],
                   "model.layers.1.self_attn.q_norm.weight")
    assert listing(tmp_path) == ["hf"]


def test_shape_mismatch_names_the_tensor(tmp_path, capsys):
    hf = pathlib.Path(make_tiny_model("llama", str(tmp_path / "hf")))
    cfg = json.loads((hf / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the weights on disk are 96 wide
    (hf / "config.json").write_text(json.dumps(cfg))
    expect_failure(capsys, ["import", "--hf-dir", hf, "--megatron-dir", tmp_path / "m"],
                   "gate_proj.weight", "does not match", code=1)
    assert listing(tmp_path) == ["hf"]


def test_existing_output_is_refused_and_untouched(dense, tmp_path, capsys):
    root, _ = dense
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_failure(capsys, ["export", "--megatron-dir", root / "m_tp2", "--hf-dir", out],
                   str(out), "--overwrite")
    assert listing(out) == ["keep.txt"]


def test_export_from_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    expect_failure(capsys, ["export", "--megatron-dir", tmp_path / "m", "--hf-dir", tmp_path / "out"],
                   "rlfp16.json")
    expect_failure(capsys, ["export", "--megatron-dir", tmp_path / "x", "--hf-dir", tmp_path / "out"],
                   "--megatron-dir", "not a directory")
    assert listing(tmp_path) == ["m"]


def test_unknown_dtype_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        convert("export", "--megatron-dir", tmp_path, "--hf-dir", tmp_path / "o", "--dtype", "fp8")
    assert "fp8" in capsys.readouterr().err


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    from megatron_rlfp16.checkpoint import AtomicDir

    with pytest.raises(RuntimeError):
        with AtomicDir(str(tmp_path / "out")) as tmp:
            pathlib.Path(tmp, "half.safetensors").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert listing(tmp_path) == []


def test_damaged_json_files_are_named(dense, tmp_path, capsys):
    root, hf = dense
    # A corrupt safetensors index.
    broken = tmp_path / "hf"
    broken.mkdir()
    for name in os.listdir(hf):
        (broken / name).write_bytes((pathlib.Path(hf) / name).read_bytes())
    (broken / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    expect_failure(capsys, ["import", "--hf-dir", broken, "--megatron-dir", tmp_path / "m"],
                   f"{broken}/model.safetensors.index.json: not valid JSON", "line 1 column")
    # A corrupt rlfp16.json in a Megatron checkpoint.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "rlfp16.json").write_text("{format_version: 1}")
    expect_failure(capsys, ["export", "--megatron-dir", ckpt, "--hf-dir", tmp_path / "out"],
                   f"{ckpt}/rlfp16.json: not valid JSON")
    assert not (tmp_path / "m").exists() and not (tmp_path / "out").exists()


def test_a_truncated_shard_file_is_named_before_any_rank_starts(dense, tmp_path, capsys):
    root, _ = dense
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    for name in os.listdir(root / "m_tp2"):
        (ckpt / name).write_bytes((root / "m_tp2" / name).read_bytes())
    shard = sorted(n for n in os.listdir(ckpt) if n.endswith(".distcp"))[-1]
    data = (ckpt / shard).read_bytes()
    (ckpt / shard).write_bytes(data[: len(data) // 3])
    expect_failure(capsys, ["export", "--megatron-dir", ckpt, "--hf-dir", tmp_path / "out"],
                   f"{ckpt}/{shard}: truncated", "not written or copied completely")
    (ckpt / shard).unlink()
    expect_failure(capsys, ["export", "--megatron-dir", ckpt, "--hf-dir", tmp_path / "out"],
                   f"{ckpt}/{shard}: missing")
    assert not (tmp_path / "out").exists()


def test_overwrite_keeps_the_directory_mode_and_stale_temps_are_removed(dense, tmp_path):
    root, _ = dense
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o751)
    # What a killed export leaves (its process is gone), and a live export's directory.
    dead = tmp_path / ".out.tmp-999999999"
    live = tmp_path / f".out.tmp-{os.getppid()}"
    dead.mkdir(), live.mkdir()
    assert convert("export", "--megatron-dir", root / "m_tp2", "--hf-dir", out, "--overwrite") == 0
    assert os.stat(out).st_mode & 0o7777 == 0o751
    assert listing(tmp_path) == [live.name, "out"]
    fresh = tmp_path / "fresh"
    assert convert("export", "--megatron-dir", root / "m_tp2", "--hf-dir", fresh) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(fresh).st_mode & 0o777 == 0o777 & ~umask  # not a private temp dir's 0700
    m = tmp_path / "m"
    m.mkdir()
    os.chmod(m, 0o750)
    assert convert("import", "--hf-dir", out, "--megatron-dir", m, "--overwrite") == 0
    assert os.stat(m).st_mode & 0o7777 == 0o750 and "rlfp16.json" in listing(m)
