"""Where a refit's bytes travel for a model with experts: four gloo ranks, seen as two "nodes" of two
ranks ({0, 1} and {2, 3}), export a Qwen3-MoE model to every rank (``receivers="all"``, the colocated
refit) scoped to the world and to the replica.

Scoped to the replica, dense weights stay inside the data-parallel replica (TP x PP ranks) and
expert weights inside the expert-data-parallel replica (the ranks that hold every expert once); when
both fit in a node, no byte crosses nodes. Every rank must still receive every HF tensor, bit for bit
equal to the checkpoint's.
"""
import pytest
import torch
from safetensors.torch import load_file

from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.tiny import make_tiny_model

pytestmark = pytest.mark.ranks

NODES = ({0, 1}, {2, 3})
# name: (tp, ep, etp). expert-data-parallel size = 4 / (ep * etp): 2, 2 and 1.
LAYOUTS = {"tp1_ep2": (1, 2, None), "tp2_ep2_etp1": (2, 2, 1), "tp1_ep4": (1, 4, None)}


def _export_everywhere(hf_dir):
    import torch.distributed as dist

    from megatron_rlfp16.bridge import export_hf, load_hf_checkpoint
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    calls = []
    original = dist.broadcast

    def counting(tensor, src, group=None, **kwargs):
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
        if len(ranks) > 1:
            calls.append((tuple(sorted(ranks)), tensor.numel() * tensor.element_size()))
        return original(tensor, src, group=group, **kwargs)

    dist.broadcast = counting
    out = {}
    for layout, (tp, ep, etp) in LAYOUTS.items():
        init_runtime(ParallelConfig(tp=tp, ep=ep, etp=etp))
        model, arch = build_model(read_config_json(hf_dir))
        load_hf_checkpoint(model, arch, hf_dir)
        for scope in ("world", "replica"):
            calls.clear()
            tensors = {n: t.clone() for n, t in export_hf(model, arch, scope=scope, bucket_bytes=16 << 10)}
            out[layout, scope] = dict(tensors=tensors, calls=list(calls))
    dist.broadcast = original
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    hf_dir = make_tiny_model("qwen3_moe", str(tmp_path_factory.mktemp("moe")), seed=3)
    return run_on_ranks(_export_everywhere, 4, hf_dir, timeout=600), load_file(f"{hf_dir}/model.safetensors")


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("scope", ["world", "replica"])
def test_every_rank_receives_the_whole_checkpoint(exports, layout, scope):
    per_rank, original = exports
    for rank, out in enumerate(per_rank):
        got = out[layout, scope]["tensors"]
        assert sorted(got) == sorted(original), (rank, layout, scope)
        for name, tensor in original.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), (rank, layout, scope, name)


def test_scoped_to_the_world_every_byte_goes_to_every_rank(exports):
    per_rank, original = exports
    for layout in LAYOUTS:
        for out in per_rank:
            calls = out[layout, "world"]["calls"]
            assert {ranks for ranks, _ in calls} == {(0, 1, 2, 3)}, layout
            assert sum(n for _, n in calls) == _nbytes(original.values()), layout


def test_scoped_to_the_replica_no_byte_crosses_nodes_when_a_node_holds_every_expert(exports):
    per_rank, original = exports
    experts = _nbytes(t for name, t in original.items() if ".mlp.experts." in name)
    dense = _nbytes(original.values()) - experts
    assert experts > 0 and dense > 0
    for rank, out in enumerate(per_rank):
        node = next(n for n in NODES if rank in n)
        # TP 1, EP 2: every rank holds the dense weights whole (nothing to send), and its node's two
        # ranks hold every expert between them.
        calls = out["tp1_ep2", "replica"]["calls"]
        assert {ranks for ranks, _ in calls} == {tuple(sorted(node))}
        assert sum(n for _, n in calls) == experts
        # TP 2, expert TP 1, EP 2: the node's two ranks are one dense replica and one expert replica.
        calls = out["tp2_ep2_etp1", "replica"]["calls"]
        assert {ranks for ranks, _ in calls} == {tuple(sorted(node))}
        assert sum(n for _, n in calls) == experts + dense
        # EP 4: the experts are spread over both nodes, so they cross; the dense weights still do not
        # leave the rank.
        calls = out["tp1_ep4", "replica"]["calls"]
        assert {ranks for ranks, _ in calls} == {(0, 1, 2, 3)}
        assert sum(n for _, n in calls) == experts
