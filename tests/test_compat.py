"""The compatibility modules against the installed vLLM and Megatron-Core: every private or
version-specific name they rely on exists, and the CPU stand-ins can be entered and left.

The calls that need a live engine (``model_runner``, ``reload_weights``, ``shutdown``) run in the
``vllm`` lane through ``RolloutEngine`` (tests/test_rollout_sync.py, tests/test_trainer_*.py)."""
import logging
import subprocess
import sys
import textwrap

import pytest


def test_cpu_stand_ins_are_entered_explicitly_and_can_be_left():
    script = textwrap.dedent("""
        import torch
        from megatron.core.tensor_parallel import random as mp_random
        from megatron_rlfp16.compat import megatron as compat

        class Passthrough(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        before = (torch.cuda.current_device, torch.cuda.Stream, mp_random._get_cuda_rng_state)
        assert not compat.cpu_stand_ins_installed()
        with compat.cpu_stand_ins():
            assert torch.cuda.current_device() == "cpu"
            assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
            assert torch.ones(2, device="cuda").device.type == "cpu"
            mp_random._get_cuda_rng_state()  # the model-parallel RNG tracker's CUDA state -> CPU's
            with compat.cpu_stand_ins_paused():  # the mode is left for the block, the patches stay
                assert torch.zeros(1).type() == "torch.FloatTensor"
                assert torch.cuda.current_device() == "cpu"
            assert torch.zeros(1).type() == "torch.cuda.FloatTensor"  # back after the block
            with Passthrough(), compat.cpu_stand_ins_paused():
                assert torch.ones(1).type() == "torch.cuda.FloatTensor"  # not paused under another mode
        with compat.cpu_stand_ins_paused():  # not installed: a no-op
            assert torch.zeros(1).type() == "torch.FloatTensor"
        after = (torch.cuda.current_device, torch.cuda.Stream, mp_random._get_cuda_rng_state)
        assert after == before and not compat.cpu_stand_ins_installed()
        assert torch.zeros(1).type() == "torch.FloatTensor"
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_megatron_names_the_compat_module_relies_on_exist():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe import moe_utils

    from megatron_rlfp16.compat import megatron as compat

    assert hasattr(DistributedOptimizer, "_init_optimizer_states_with_dummy_values")
    assert callable(mp_random._get_cuda_rng_state) and callable(mp_random._set_cuda_rng_state)
    compat.define_te_general_gemm()
    assert hasattr(moe_utils, "te_general_gemm")


def test_vllm_names_the_compat_module_relies_on_exist():
    from vllm import LLM
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
    from vllm.model_executor.model_loader.reload import layerwise
    from vllm.model_executor.utils import is_weights_pre_processed
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    assert callable(is_weights_pre_processed) and hasattr(UnquantizedFusedMoEMethod, "process_weights_after_loading")
    assert hasattr(FusedMoEExperts, "process_weights_after_loading")
    assert hasattr(CPUModelRunner, "reload_weights")
    assert hasattr(LLM, "reset_prefix_cache") and hasattr(LLM, "sleep") and hasattr(LLM, "wake_up")
    assert layerwise.__name__ == "vllm.model_executor.model_loader.reload.layerwise"
    # In-memory adapters (adapter_from_memory) and adapter switches without a prefix-cache reset.
    import inspect

    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.v1.core import kv_cache_utils

    assert hasattr(LRUCacheWorkerLoRAManager, "_load_adapter") and hasattr(LoRAModel, "from_lora_tensors")
    assert hasattr(PEFTHelper, "from_dict") and hasattr(PEFTHelper, "validate_legal")
    assert "lora_name" in inspect.getsource(kv_cache_utils._gen_lora_extra_hash_keys)


def test_the_reload_log_filter_drops_only_rotary_warnings():
    from megatron_rlfp16.compat.vllm import _RotaryReloadFilter

    def record(layer):
        return logging.LogRecord("x", logging.WARNING, "f", 1, "%s: Failed to load weights", (layer,), None)

    f = _RotaryReloadFilter()
    assert not f.filter(record("model.layers.0.self_attn.rotary_emb: RotaryEmbedding"))
    assert f.filter(record("model.layers.0.mlp.experts: FusedMoE"))


def test_configure_in_process_sets_the_engine_environment(monkeypatch):
    import os

    from megatron_rlfp16.compat import vllm as compat

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    compat.configure_in_process()
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"


@pytest.mark.parametrize("level", ["WARNING"])
def test_set_log_level_keeps_a_users_choice(monkeypatch, level):
    import os

    from megatron_rlfp16.compat import vllm as compat

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    compat.set_log_level(level)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_cpu_shm_segments_are_named_per_run_and_stale_ones_removed(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from vllm.distributed.device_communicators import cpu_communicator

    from megatron_rlfp16.compat import vllm as compat

    monkeypatch.setattr(cpu_communicator._CPUSHMDistributed, "make_group_name",
                        cpu_communicator._CPUSHMDistributed.make_group_name)  # restored after the test
    monkeypatch.setattr(compat, "SHM_DIR", str(tmp_path))
    monkeypatch.setenv("MASTER_PORT", "29871")
    compat.name_cpu_shm_per_run()
    communicator = SimpleNamespace(unique_name="tp:0", ranks=[0, 1], rank=1)
    stale = tmp_path / "rlfp16-29871-tp:0-[0-1]-cpushm_1"
    stale.write_bytes(b"left by a killed run")
    name = cpu_communicator._CPUSHMDistributed.make_group_name(communicator)
    assert name == "rlfp16-29871-tp:0-[0-1]-cpushm"
    assert not stale.exists()
    compat.name_cpu_shm_per_run()  # idempotent: no double wrapping
    assert cpu_communicator._CPUSHMDistributed.make_group_name(communicator) == name


def test_each_process_finds_its_gpu(monkeypatch):
    import torch

    from megatron_rlfp16.runtime import local_cuda_device
    from megatron_rlfp16.runtime.launch import rank_device_env

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert local_cuda_device() == 5
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per process (CUDA_VISIBLE_DEVICES)
    assert local_cuda_device() == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=5 but only 4 GPU\(s\) are visible .*--nproc_per_node=4"):
        local_cuda_device()
    # The test launcher: fewer GPUs than ranks -> CPU ranks, not two ranks on one GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.warns(RuntimeWarning, match="2 ranks but 1 GPU"):
        assert rank_device_env(2) == {"CUDA_VISIBLE_DEVICES": ""}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_device_env(2) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device_env(2) == {}
