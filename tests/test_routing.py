"""Routing replay's pieces that need no ranks and no engine: the routes' layout through the rollout
batch, request-id mapping, block hashes, the plan's decisions and every bad-input message."""
import numpy as np
import pytest
import torch

from megatron_rlfp16.rollout.batch import RolloutBatch, apply_stop_strings
from megatron_rlfp16.routing import NO_ROUTE, check_replay_mode, check_routes, same_expert_sets


def _batch(with_routes=True):
    prompts, responses = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    routes = [np.arange((len(p) + len(r) - 1) * 2 * 2, dtype=np.int16).reshape(-1, 2, 2) % 4
              for p, r in zip(prompts, responses)] if with_routes else None
    return RolloutBatch(prompts=prompts, responses=responses, logprobs=[[-1.0] * len(r) for r in responses],
                        prompt_index=[0, 1], finished=[True, False], routes=routes)


def test_routes_tensor_follows_the_token_layout():
    batch = _batch()
    tokens, mask, _ = batch.to_tensors(pad_to_multiple=4)
    routes = batch.routes_tensor(tokens.shape[1])
    assert routes.shape == (2, 8, 2, 2) and routes.dtype == torch.int16
    for i, r in enumerate(batch.routes):
        assert torch.equal(routes[i, : len(r)], torch.from_numpy(r))
        assert (routes[i, len(r):] == NO_ROUTE).all()  # the last token and the padding
    joined = RolloutBatch.concat([batch, _batch()])
    assert len(joined.routes) == 4
    assert RolloutBatch.concat([batch, _batch(with_routes=False)]).routes is None
    with pytest.raises(ValueError, match="no routes: the engine was started without return_routes"):
        _batch(with_routes=False).routes_tensor(8)


def test_stop_strings_cut_the_routes_with_the_response():
    batch = _batch()
    text = {6: "a", 7: "STOP", 8: "b", 9: "STOP", 10: "c"}
    cut = apply_stop_strings(batch, ["STOP"], lambda ids: "".join(text[t] for t in ids))
    assert cut == 1 and batch.responses == [[6, 7], [8, 9]]  # the first already ended at its stop
    assert [len(r) for r in batch.routes] == [3 + 2 - 1, 2 + 2 - 1]


def test_same_expert_sets_ignores_order():
    a = torch.tensor([[0, 3], [1, 2], [2, 0]])
    b = torch.tensor([[3, 0], [1, 3], [0, 2]], dtype=torch.int16)
    assert same_expert_sets(a, b).tolist() == [True, False, True]


def test_bad_routes_and_modes_are_named():
    with pytest.raises(ValueError, match=r"routing_replay='R3'; valid: none, r2, r3"):
        check_replay_mode("R3")
    routes = torch.zeros(2, 8, 3, 2, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"routes have shape \(2, 8, 3, 2\) but the model needs "
                                         r"\(2, 8, 2, 2\) \(\[batch, sequence, layers=2, top-k=2\]\)"):
        check_routes(routes, batch=2, seq=8, layers=2, topk=2, num_experts=4)
    routes = torch.full((2, 8, 2, 2), 5, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"expert ids from 5 to 5; the model has 4 experts \(ids 0..3, -1"):
        check_routes(routes, batch=2, seq=8, layers=2, topk=2, num_experts=4)


def test_engine_request_ids_map_to_samples():
    from megatron_rlfp16.compat.vllm import sample_of_request

    assert sample_of_request("7-a85b379c", 1) == ("7", 0)
    assert sample_of_request("3_7-a85b379c", 4) == ("7", 3)
    assert sample_of_request("3_my-id-a85b379c", 4) == ("my-id", 3)
    with pytest.raises(ValueError, match=r"'7-a85b379c' is not '<k>_<id>-<suffix>' \(n=4\)"):
        sample_of_request("7-a85b379c", 4)
    with pytest.raises(ValueError, match=r"not '<id>-<8 hex>'"):
        sample_of_request("7", 1)


def test_block_hashes_name_the_whole_prefix():
    from megatron_rlfp16.rollout.routes import _block_hashes

    a = _block_hashes(list(range(10)), 4)
    b = _block_hashes(list(range(8)) + [99, 98, 97], 4)
    c = _block_hashes([0, 1, 2, 3] + [9, 9, 9, 9], 4)
    assert len(a) == 2 and a == b[:2]  # full blocks only; the same leading tokens, the same hashes
    assert c[0] == a[0] and c[1] != a[1]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from megatron_rlfp16.testing.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("routing_plan")
    return {f: make_tiny_model(f, str(root / f), seed=0) for f in ("llama", "qwen3_moe")}


def _plan(hf_dir, **kwargs):
    from megatron_rlfp16.megatron.args import RLConfig
    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.trainer import TrainerConfig

    rollout = kwargs.pop("rollout", None)
    extra = dict(rollout=rollout) if rollout is not None else {}
    return resolve_plan(TrainerConfig(hf_dir=hf_dir, rl=RLConfig(**kwargs), **extra), world_size=1)


def test_plan_decides_routes_replay_and_the_moe_kernel(dirs):
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.rollout import RolloutConfig
    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.trainer import TrainerConfig

    moe = _plan(dirs["qwen3_moe"])
    assert moe.routing_replay == "none" and moe.rollout.return_routes is True  # agreement is measured
    assert moe.engine_gpu_kwargs == {"moe_backend": "triton"}  # FP16 MoE: off FlashInfer's MoE kernels
    assert moe.describe()["routing"] == dict(replay="none", engine_routes=True)
    assert _plan(dirs["qwen3_moe"], routing_replay="r3").routing_replay == "r3"
    dense = _plan(dirs["llama"])
    assert dense.rollout.return_routes is False and dense.engine_gpu_kwargs == {}
    bf16 = resolve_plan(TrainerConfig(hf_dir=dirs["qwen3_moe"], precision=PrecisionConfig(trainer="bf16")),
                        world_size=1)
    assert bf16.engine_gpu_kwargs == {}
    off = _plan(dirs["qwen3_moe"], routing_replay="r2", rollout=RolloutConfig(return_routes=False))
    assert off.rollout.return_routes is False and off.routing_replay == "r2"  # R2 needs no engine routes


def test_plan_refuses_replay_it_cannot_do(dirs):
    from megatron_rlfp16.rollout import RolloutConfig

    with pytest.raises(ValueError, match=r"RLConfig.routing_replay='r3': llama is a dense model, it has no "
                                         r"router to replay; valid: 'none'"):
        _plan(dirs["llama"], routing_replay="r3")
    with pytest.raises(ValueError, match=r"RLConfig.routing_replay='r3' replays the rollout engine's routes, "
                                         r"but RolloutConfig.return_routes=False"):
        _plan(dirs["qwen3_moe"], routing_replay="r3", rollout=RolloutConfig(return_routes=False))
    with pytest.raises(ValueError, match=r"RolloutConfig.return_routes='yes'; valid: None, True, False"):
        _plan(dirs["qwen3_moe"], rollout=RolloutConfig(return_routes="yes"))


def test_mismatch_tool_refuses_replay_on_a_dense_model(dirs, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "tools/measure_mismatch.py", "--hf-dir", dirs["llama"],
                           "--routing-replay", "--out", str(tmp_path / "r")],
                          cwd=__import__("pathlib").Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--routing-replay: " in proc.stderr and "is a dense model (llama)" in proc.stderr


def test_route_capture_runs_the_engine_eagerly_on_gpu():
    from megatron_rlfp16.rollout.engine import RolloutConfig, _eager

    assert _eager(RolloutConfig(return_routes=True), on_gpu=True) is True
    assert _eager(RolloutConfig(), on_gpu=True) is False  # CUDA graphs without routes
    assert _eager(RolloutConfig(), on_gpu=False) is True
    with pytest.raises(ValueError, match=r"RolloutConfig.enforce_eager=False with return_routes: CUDA graphs"):
        _eager(RolloutConfig(return_routes=True, enforce_eager=False), on_gpu=True)
