"""The memory plan against what Megatron really allocates, and its verdict on the GPU recipes.

Measured on real Megatron ranks (CPU, gloo): the bytes of the parameters, DDP's gradient buffers,
the optimizer's FP32 master copies and Adam moments after one step (FP16 and FP32, with and
without the distributed optimizer), and the bytes of every tensor the forward and the log-probs
save for the backward (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded, shared
storage counted once), with and without recompute. The plan, computed from the HF config alone,
must be within 15 % of each.
"""
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIMS = dict(hidden_size=256, num_hidden_layers=2, intermediate_size=384, vocab_size=1000, head_dim=64,
            num_attention_heads=4)


def _saved_activation_bytes(model, arch, b, s):
    from megatron.core import parallel_state as ps

    from megatron_rlfp16.logprobs import next_token_logprobs
    from megatron_rlfp16.models import causal_mask

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() != 0:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    ids = torch.randint(0, arch.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids, torch.arange(s)[None].expand(b, s), causal_mask(s))
        next_token_logprobs(logits, ids, vocab_size=arch.vocab_size, tp_group=ps.get_tensor_model_parallel_group())
    return sum(seen.values())


def activations_job(cases):
    from megatron_rlfp16.models import build_model
    from megatron_rlfp16.models.builder import uses_sequence_parallel
    from megatron_rlfp16.plan.memory import MemoryConfig, activation_bytes
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.testing.tiny import tiny_config

    out = []
    for family, tp, b, s, precision_name, recompute, extra in cases:
        init_runtime(ParallelConfig(tp=tp))
        precision = PrecisionConfig(trainer=precision_name)
        overrides = dict(precision.transformer_overrides(), **MemoryConfig(recompute=recompute).recompute_overrides())
        model, arch = build_model(tiny_config(family, **DIMS, **extra).to_dict(),
                                  params_dtype=precision.trainer.torch_dtype, config_overrides=overrides)
        precision.prepare_model(model)
        model.train()
        actual = _saved_activation_bytes(model, arch, b, s)
        planned = activation_bytes(arch, tp=tp, micro_batch_size=b, seq_length=s,
                                   dtype_bytes=precision.trainer.torch_dtype.itemsize,
                                   sequence_parallel=uses_sequence_parallel(arch, tp), recompute=recompute,
                                   fp32_logits=precision.fp32_logits, include_transient=False)
        out.append(dict(case=(family, tp, b, s, precision_name, recompute), actual=actual, planned=planned))
    return out


ACTIVATION_CASES = [
    ("llama", 1, 2, 64, "fp32", "none", {}), ("llama", 1, 4, 96, "fp16", "none", {}),
    ("llama", 2, 2, 64, "fp32", "none", {}), ("llama", 2, 2, 64, "fp16", "none", {}),
    ("llama", 1, 2, 64, "fp32", "full", {}), ("llama", 1, 2, 64, "fp16", "selective", {}),
    ("qwen3", 2, 2, 64, "fp32", "none", {}),
    ("qwen3_moe", 1, 2, 64, "fp32", "none", dict(moe_intermediate_size=64)),
    ("qwen3_moe", 2, 2, 64, "fp16", "none", dict(moe_intermediate_size=64)),
]


def state_job(cases):
    """Bytes of the model's parameters, DDP's gradient buffers and the optimizer's master weights
    and moments after one optimizer step, against the plan."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_rlfp16.models import build_model
    from megatron_rlfp16.plan.memory import plan_memory
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.testing.tiny import tiny_config

    out = []
    for family, tp, precision_name, distributed, extra in cases:
        init_runtime(ParallelConfig(tp=tp))
        precision = PrecisionConfig(trainer=precision_name)
        model, arch = build_model(tiny_config(family, **DIMS, **extra).to_dict(),
                                  params_dtype=precision.trainer.torch_dtype,
                                  config_overrides=precision.transformer_overrides())
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            **precision.ddp_kwargs(), use_distributed_optimizer=distributed), model)
        optimizer = precision.build_optimizer([ddp], lr=1e-3, weight_decay=0.0, use_distributed_optimizer=distributed)
        for p in ddp.parameters():
            p.main_grad.fill_(1e-3)
        optimizer.step()
        weights = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in ddp.parameters()}
        grads = sum(buf.grad_data.numel() * buf.grad_data.element_size()
                    for buf in ddp.buffers + ddp.expert_parallel_buffers)
        master = moments = 0
        for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
            for group in sub.optimizer.param_groups:
                for p in group["params"]:
                    if p.untyped_storage().data_ptr() not in weights:
                        master += p.numel() * p.element_size()
                    for t in sub.optimizer.state.get(p, {}).values():
                        if torch.is_tensor(t) and t.numel() > 1:
                            moments += t.numel() * t.element_size()
        import torch.distributed as dist

        plan = plan_memory(arch, tp=tp, dp=dist.get_world_size() // tp, dtype_bytes=precision.trainer.torch_dtype.itemsize,
                           fp32_grads=precision.fp32_grad_reduce, distributed_optimizer=distributed)
        actual = dict(weights=sum(weights.values()), gradients=grads, master_weights=master, optimizer_state=moments)
        out.append(dict(case=(family, tp, precision_name, distributed), actual=actual,
                        planned={k: plan.components[k] for k in actual}))
    return out


STATE_CASES = [
    ("llama", 1, "fp16", False, {}), ("llama", 1, "fp16", True, {}), ("llama", 1, "fp32", False, {}),
    ("llama", 2, "fp16", False, {}), ("llama", 1, "bf16", True, {}),
]


@pytest.fixture(scope="module")
def measured():
    return run_on_ranks(_both, 2, timeout=900)[0]


def _both():
    return dict(activations=activations_job(ACTIVATION_CASES), state=state_job(STATE_CASES),
                offload=[offload_job(distributed) for distributed in (True, False)])


def offload_job(distributed):
    """FP16 training with and without an offload/reload between steps: the state after the round
    trip is bit-identical, its storage is freed in between, and the next steps are the same."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_rlfp16.models import build_model
    from megatron_rlfp16.precision import OptimizerStep, PrecisionConfig
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.runtime.offload import KINDS, TrainerOffload, _state_tensors
    from megatron_rlfp16.testing.tiny import tiny_config

    def step(ddp, optimizer, stepper, seed):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        g = torch.Generator().manual_seed(seed)
        for p in ddp.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=g) * 1e-2)
        return stepper.step()

    runs = {}
    for offload in (False, True):
        init_runtime(ParallelConfig(), seed=3)
        precision = PrecisionConfig(trainer="fp16")
        model, _ = build_model(tiny_config("llama", **DIMS).to_dict(), params_dtype=torch.float16,
                               config_overrides=precision.transformer_overrides())
        g = torch.Generator().manual_seed(11)  # the same starting weights in both runs
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            **precision.ddp_kwargs(), use_distributed_optimizer=distributed), model)
        optimizer = precision.build_optimizer([ddp], lr=1e-2, weight_decay=0.0, use_distributed_optimizer=distributed)
        stepper = OptimizerStep(optimizer, precision, model=[ddp])
        step(ddp, optimizer, stepper, 0)
        out = {}
        if offload:
            mover = TrainerOffload([ddp], optimizer)
            before = [t.detach().clone() for t in _state_tensors([ddp], optimizer)]
            resident = mover.resident_bytes()
            out["freed"] = mover.offload()
            out["resident_while_offloaded"] = mover.resident_bytes()
            out["restored"] = mover.reload()
            after = list(_state_tensors([ddp], optimizer))
            out["resident"] = resident
            out["identical"] = len(before) == len(after) and all(
                a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(before, after))
            # The kinds apart, in the trainer's order: the optimizer's part alone (the optimizer
            # step's round trip), then the gradients (before the refit), then the parameters.
            out["kind_bytes"] = {k: mover.resident_bytes((k,)) for k in KINDS}
            out["optimizer_freed"] = mover.offload(("optimizer",))
            out["others_resident"] = mover.resident_bytes(("params", "grads"))
            out["optimizer_restored"] = mover.reload(("optimizer",))
            out["optimizer_freed_again"] = mover.offload(("optimizer",))
            out["grads_freed"] = mover.offload(("grads", "optimizer"))  # the optimizer's part is out already
            out["params_freed"] = mover.offload()
            out["host_bytes"] = mover.host_bytes()
            out["restored_by_kind"] = mover.reload()
            out["identical_by_kind"] = all(torch.equal(a, b) for a, b in zip(before, _state_tensors([ddp], optimizer)))
            out["numel"] = sum(p.numel() for p in ddp.parameters())
            out["tensors"] = len(list(ddp.parameters()))
        for seed in (1, 2):
            step(ddp, optimizer, stepper, seed)
        out["params"] = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
        runs[offload] = out
    return dict(distributed=distributed, plain=runs[False], offloaded=runs[True])


@pytest.mark.ranks
def test_planned_activations_are_within_15_percent_of_what_megatron_saves(measured):
    for row in measured["activations"]:
        ratio = row["planned"] / row["actual"]
        assert 0.85 <= ratio <= 1.15, (row, ratio)


@pytest.mark.ranks
def test_planned_weights_gradients_and_optimizer_state_match_megatrons(measured):
    for row in measured["state"]:
        for key, actual in row["actual"].items():
            planned = row["planned"][key]
            if actual == 0:
                assert planned == 0, (row["case"], key, planned)
            else:
                assert 0.85 <= planned / actual <= 1.15, (row["case"], key, planned, actual)
    fp32 = [r for r in measured["state"] if r["case"][2] == "fp32"][0]
    assert fp32["actual"]["master_weights"] == 0  # no FP32 copy of FP32 weights
    sharded = [r for r in measured["state"] if r["case"][:3] == ("llama", 1, "fp16")]
    plain, dist = sorted(sharded, key=lambda r: r["case"][3])
    # The distributed optimizer halves master weights and moments over 2 data-parallel ranks.
    assert dist["actual"]["optimizer_state"] < 0.6 * plain["actual"]["optimizer_state"]


# ---- the recipes (unit: the plan needs only the HF config) --------------------------------------

QWEN3_8B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096,
            "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def _recipe_plan(tmp_path, **memory):
    from megatron_rlfp16.megatron.args import RLConfig
    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.plan.memory import MemoryConfig
    from megatron_rlfp16.rollout import RolloutConfig
    from megatron_rlfp16.runtime import ParallelConfig
    from megatron_rlfp16.trainer import RunConfig, TrainerConfig

    config = TrainerConfig(
        hf_dir=str(tmp_path), parallel=ParallelConfig(tp=2), rollout=RolloutConfig(tp=2),
        run=RunConfig(prompts_per_step=64, max_new_tokens=2048, micro_batch_size=4),
        rl=RLConfig(group_size=8), memory=MemoryConfig(**dict(dict(device_memory_gib=80), **memory)))
    return resolve_plan(config, world_size=8, hf_config=QWEN3_8B)


def test_the_8b_recipe_fits_80gb_gpus_with_fused_attention_and_the_distributed_optimizer(tmp_path):
    from megatron_rlfp16.plan.memory import GiB

    plan = _recipe_plan(tmp_path, attention="fused")
    assert plan.distributed_optimizer and plan.data_parallel == 4
    assert plan.memory.peak()[1] < 76 * GiB
    # ~4.1 B parameters per rank: FP16 weights, FP32 gradients, master and moments over 4 DP ranks.
    components = plan.memory.components
    assert components["weights"] == pytest.approx(2 * 4.1e9, rel=0.02)
    assert components["optimizer_state"] == pytest.approx(8 * 4.1e9 / 4, rel=0.02)


@pytest.mark.parametrize("memory,message", [
    (dict(attention="fused", distributed_optimizer=False),
     r"the rollout phase needs .* the largest is optimizer_state\. To fit: offloading .* the distributed optimizer"),
    (dict(attention="unfused"), r"the training phase needs .* the largest is activations\. To fit: a fused "
                                r"attention kernel \(install TransformerEngine\); or activation recompute"),
])
def test_what_does_not_fit_is_refused_before_anything_is_built(tmp_path, memory, message):
    from megatron_rlfp16.plan import MemoryPlanError

    with pytest.raises(MemoryPlanError, match=message):
        _recipe_plan(tmp_path, **memory)
    _recipe_plan(tmp_path, **dict(memory, device_memory_gib=None))  # no device: nothing to check


def test_offload_empties_the_rollout_phase_of_trainer_state(tmp_path):
    plan = _recipe_plan(tmp_path, attention="fused", distributed_optimizer=False, device_memory_gib=None)
    offloaded = plan.memory.replace(offload=True, device_bytes=None)
    assert set(offloaded.phases["rollout"]) == {"engine"}
    assert set(offloaded.phases["refit"]) == {"weights", "engine_weights", "bucket"}


def test_the_optimizer_state_apart_leaves_the_training_phase(tmp_path):
    """With offload_optimizer the training phase holds no master weights or optimizer state, and
    the optimizer phase holds the whole state but no activations."""
    from megatron_rlfp16.plan import MemoryPlanError
    from megatron_rlfp16.plan.memory import plan_memory, with_offload_optimizer

    memory = _recipe_plan(tmp_path, attention="fused", distributed_optimizer=False, device_memory_gib=None).memory
    apart = memory.replace(offload=True, offload_optimizer=True)
    c = apart.components
    assert set(apart.phases) == {"rollout", "training", "optimizer", "refit"}
    assert apart.phases["training"] == dict(weights=c["weights"], gradients=c["gradients"], activations=c["activations"])
    assert apart.phases["optimizer"] == {k: c[k] for k in ("weights", "gradients", "master_weights", "optimizer_state")}
    assert set(memory.replace(offload=True).phases) == {"rollout", "training", "refit"}
    with pytest.raises(ValueError, match="offload_optimizer=True needs offload=True"):
        plan_memory(memory.inputs["arch"], offload_optimizer=True)
    # None: on only where the run does not fit otherwise.
    assert with_offload_optimizer(memory.replace(offload=True, device_bytes=200 << 30), None).settings[
        "offload_optimizer"] is False
    tight = memory.replace(offload=True, device_bytes=int(0.9 * memory.replace(offload=True).phase_total("training")))
    assert with_offload_optimizer(tight, None).settings["offload_optimizer"] is True
    with pytest.raises(MemoryPlanError, match=r"the training phase .* the largest is activations\. To fit: .*; or the "
                                              r"master weights and optimizer state in host memory outside the "
                                              r"optimizer step \(--offload-optimizer, with --offload\)\.$"):
        with_offload_optimizer(tight, False).check()


def test_the_memory_plan_tool(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN3_8B))
    common = [sys.executable, "tools/memory_plan.py", "--hf-config", str(path), "--tp", "2", "--device-memory-gib", "80"]
    fits = subprocess.run(common + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert fits.returncode == 0, fits.stderr
    described = json.loads(fits.stdout)
    assert described["peak"]["gib"] < 80 and set(described["phases_gib"]) == {"rollout", "training", "refit"}
    refused = subprocess.run(common + ["--no-distributed-optimizer", "--no-offload"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 3 and "the largest is optimizer_state" in refused.stderr, refused.stderr
    assert "| **total** |" in refused.stdout


@pytest.mark.ranks
def test_offload_round_trip_is_bit_exact_and_frees_the_state(measured):
    for row in measured["offload"]:
        o = row["offloaded"]
        assert o["identical"], row["distributed"]
        # Every byte of parameters, gradient buffers, master weights and moments was freed, then restored.
        assert o["freed"] == o["resident"] == o["restored"] > 0 and o["resident_while_offloaded"] == 0
        for name, p in row["plain"]["params"].items():
            assert torch.equal(o["params"][name], p), name  # the steps after the round trip are the same
        # The kinds apart. FP16 parameters, FP32 gradient buffers; the optimizer's part is the FP32
        # master weights and both Adam moments (and Adam's FP32 step counter per tensor), over the
        # data-parallel ranks with the distributed optimizer.
        n, kinds = o["numel"], o["kind_bytes"]
        assert (kinds["params"], kinds["grads"]) == (2 * n, 4 * n)
        if row["distributed"]:
            assert kinds["optimizer"] == pytest.approx(12 * n / 2, rel=1e-3)
        else:
            assert kinds["optimizer"] == 12 * n + 4 * o["tensors"]
        assert o["optimizer_freed"] == o["optimizer_restored"] == o["optimizer_freed_again"] == kinds["optimizer"]
        assert o["others_resident"] == kinds["params"] + kinds["grads"]  # untouched by the optimizer's move
        assert (o["grads_freed"], o["params_freed"]) == (kinds["grads"], kinds["params"])
        assert o["host_bytes"] == o["restored_by_kind"] == o["freed"] and o["identical_by_kind"]


@pytest.mark.ranks
def test_the_gpu_smoke_check_dry_runs_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_smoke.py", "--out", str(tmp_path), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert [r["section"] for r in records] == ["environment", "parity", "fp16_mechanics", "logprobs", "offload",
                                               "memory", "routing_replay"]
    assert proc.returncode == 0 and all(r["ok"] for r in records), proc.stdout + proc.stderr[-3000:]
    by = {r["section"]: r for r in records}
    assert by["fp16_mechanics"]["plain_optimizer"]["skipped_steps"] == [0.0, 1.0, 1.0]
    assert by["memory"]["state_ratio"] == pytest.approx(1.0, abs=0.01)
    assert by["routing_replay"]["rows_not_replayed"] == 0 and by["routing_replay"]["router_calls"] == 4
