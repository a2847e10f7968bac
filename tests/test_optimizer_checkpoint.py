"""A checkpoint can be saved before the optimizer's first real step (every step so far skipped for
FP16 overflow, or a PPO critic's warm-up of the policy), and loading it changes nothing: the next
step equals a fresh optimizer's. Before, megatron-core 0.16's DistributedOptimizer with torch's Adam
asserted in ``state_dict()`` when it held no Adam state. Real ranks: DP=2, FP16, distributed
optimizer."""
import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks

pytestmark = pytest.mark.ranks

DIMS = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64)


def _worker(ckpt_dir):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_rlfp16.checkpoint import load_megatron_checkpoint, save_megatron_checkpoint
    from megatron_rlfp16.models import build_model
    from megatron_rlfp16.precision import OptimizerStep, PrecisionConfig
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.testing.tiny import tiny_config

    init_runtime(ParallelConfig(), seed=3)
    precision = PrecisionConfig(trainer="fp16")
    cfg = tiny_config("llama", **DIMS).to_dict()

    def build():
        model, _ = build_model(cfg, params_dtype=precision.trainer.torch_dtype,
                               config_overrides=precision.transformer_overrides())
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
            **precision.ddp_kwargs(), use_distributed_optimizer=True), model)
        optimizer = precision.build_optimizer([ddp], lr=1e-2, weight_decay=0.1, use_distributed_optimizer=True)
        return ddp, OptimizerStep(optimizer, precision, model=[ddp])

    def one_step(ddp, stepper):
        g = torch.Generator().manual_seed(5)
        for p in ddp.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=g) * 1e-3)
        stepper.step()
        return [p.detach().clone() for p in ddp.parameters()]

    fresh, fresh_step = build()
    initial = [p.detach().clone() for p in fresh.parameters()]
    save_megatron_checkpoint(fresh, ckpt_dir, hf_config=cfg, extra_state=fresh_step.checkpoint_state(fresh))
    expected = one_step(fresh, fresh_step)
    loaded, loaded_step = build()
    state = load_megatron_checkpoint(loaded, ckpt_dir,
                                     extra_state=loaded_step.checkpoint_state(loaded, is_loading=True))
    loaded_step.load_checkpoint_state(state)
    got = one_step(loaded, loaded_step)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(expected, got))
    moved = max((a.float() - b.float()).abs().max().item() for a, b in zip(expected, initial))
    return diff, moved


def test_a_never_stepped_optimizer_saves_and_loads_to_the_same_next_step(tmp_path):
    for diff, moved in run_on_ranks(_worker, 2, str(tmp_path / "ckpt"), timeout=300):
        assert diff == 0.0 and moved > 0  # a real step, the same with the loaded state
