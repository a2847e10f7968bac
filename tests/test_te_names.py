"""TransformerEngine parameter names (fused norms, grouped-GEMM experts) go through the same bridge.

TE does not install on CPU, so the TE-named state dicts are synthesized from a real local-spec model:
every name is rewritten into TE's spelling, then import and export run on those names alone.
"""
import pytest
import torch
from safetensors.torch import load_file

from megatron_rlfp16.bridge.names import to_canonical, to_te
from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.tiny import make_tiny_model


@pytest.mark.parametrize("te_name,canonical", [
    ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.3.input_layernorm.weight"),
    ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.0.pre_mlp_layernorm.weight"),
    ("decoder.layers.1.mlp.experts.linear_fc1.weight5", "decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight"),
    ("decoder.layers.1.mlp.experts.linear_fc2.weight0", "decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"),
    ("decoder.layers.0.self_attention.linear_qkv._extra_state", None),
])
def test_te_spellings_map_to_canonical(te_name, canonical):
    assert to_canonical(te_name) == canonical


def test_offsets_apply_to_layers_and_grouped_experts():
    name = "decoder.layers.1.mlp.experts.linear_fc2.weight1"
    assert to_canonical(name, layer_offset=4, expert_offset=2) == \
        "decoder.layers.5.mlp.experts.local_experts.3.linear_fc2.weight"


def te_job(hf_dir):
    from megatron_rlfp16.bridge import Bridge, ShardContext, export_hf_weights, import_hf_weights, load_hf_checkpoint
    from megatron_rlfp16.checkpoint import SafetensorsReader
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.runtime import init_runtime

    init_runtime()
    model, arch = build_model(read_config_json(hf_dir))
    load_hf_checkpoint(model, arch, hf_dir)
    local = {n: p.detach().clone() for n, p in model.named_parameters()}
    te = {to_te(n, has_moe=arch.is_moe): t for n, t in local.items()}
    te["decoder.layers.0.self_attention.linear_qkv._extra_state"] = torch.empty(0)
    ctx = ShardContext.from_megatron(model)
    bridge = Bridge(arch)
    exported = {n: t.clone() for n, t in export_hf_weights(te.items(), bridge, ctx)}
    blank = {n: torch.zeros_like(t) for n, t in te.items() if "_extra_state" not in n}
    import_hf_weights(blank.items(), bridge, ctx, SafetensorsReader(hf_dir))
    return dict(te_names=sorted(te), exported=exported, imported=blank,
                expected={to_te(n, has_moe=arch.is_moe): t for n, t in local.items()})


@pytest.mark.ranks
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_te_named_state_dicts_round_trip(tmp_path, family):
    hf = make_tiny_model(family, str(tmp_path / family), seed=7)
    (out,) = run_on_ranks(te_job, 1, hf, timeout=300)
    if family == "llama":
        assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in out["te_names"]
    else:
        assert "decoder.layers.0.mlp.experts.linear_fc1.weight3" in out["te_names"]
        assert "decoder.layers.0.pre_mlp_layernorm.weight" in out["te_names"]  # separate under MoE
    original = load_file(f"{hf}/model.safetensors")
    assert sorted(out["exported"]) == sorted(original)
    for name, t in original.items():
        assert torch.equal(out["exported"][name], t), name
    for name, t in out["expected"].items():
        assert torch.equal(out["imported"][name], t), name


def keys_job(hf_dir):
    """Megatron's own checkpoint key of every parameter of a local-spec model: the local spec's
    ``sharded_state_dict_keys_map`` renames its norms to the TransformerEngine spelling there."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.runtime import init_runtime

    init_runtime()
    model, arch = build_model(read_config_json(hf_dir))
    sharded = model.sharded_state_dict()
    return {name: sharded[name].key for name, _ in model.named_parameters()
            if isinstance(sharded.get(name), ShardedTensor)}


@pytest.mark.ranks
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_te_names_agree_with_megatrons_own_key_map(tmp_path, family):
    import re

    hf = make_tiny_model(family, str(tmp_path / family), seed=7)
    (keys,) = run_on_ranks(keys_job, 1, hf, timeout=300)
    has_moe = family == "qwen3_moe"
    checked = 0
    for name, key in keys.items():
        if ".mlp.experts." in name or ".mlp.router." in name:
            continue  # stacked expert keys are a checkpoint layout, not a module's parameter name
        ours = re.sub(r"\.layers\.\d+\.", ".layers.", to_te(name, has_moe=has_moe))  # layers are stacked
        if has_moe and name.endswith("pre_mlp_layernorm.weight"):
            # The one place the local spec's map and TE's module tree differ: a TE MoE layer keeps
            # pre_mlp_layernorm as its own module (the router reads its output); the local spec maps
            # it into linear_fc1 for every layer kind.
            assert key.endswith("mlp.linear_fc1.layer_norm_weight") and ours.endswith("pre_mlp_layernorm.weight")
            continue
        assert ours == key, name
        checked += 1
    assert checked >= 8 and any("layer_norm_weight" in k for k in keys.values())
