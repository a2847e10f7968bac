"""The PPO critic (``megatron.critic``) on real Megatron ranks against a transformers reference.

Reference: the HF checkpoint in transformers, FP32, one process: the last hidden state (after the
final norm) times the same value head, ``losses.value.value_loss`` and ``backward()``. Under test:
``make_critic`` on the Megatron model loaded from that checkpoint at TP=2 (dense, tied embeddings),
PP=2 and TP=2 with sequence parallelism (MoE), ``compute_values`` and ``critic_train_step`` over
two micro-batches; values, the head's gradient and every trunk gradient (gathered by the bridge)
are compared.
"""
import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks

pytestmark = pytest.mark.ranks

B, S, MICRO = 4, 10, 2
LAYOUTS = {"qwen2-tp2": ("qwen2", 2, 1), "qwen2-pp2": ("qwen2", 1, 2), "moe-tp2-sp": ("qwen3_moe", 2, 1)}


def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (B, S), generator=g)
    mask = torch.zeros(B, S - 1, dtype=torch.bool)
    for b, (start, end) in enumerate([(2, 9), (0, 5), (4, 8), (1, 9)]):
        mask[b, start:end] = True
    head = torch.randn(1, 128, generator=g) * 0.05
    bias = torch.randn(1, generator=g)
    old = torch.randn(B, S - 1, generator=g) * 0.3
    returns = old + torch.randn(B, S - 1, generator=g) * 0.5
    return dict(input_ids=ids, loss_mask=mask, old_values=old, returns=returns), head, bias


def _worker(hf_dir, tp, pp):
    import dataclasses

    from megatron_rlfp16.bridge import Bridge, ShardContext, export_hf_weights, load_hf_checkpoint
    from megatron_rlfp16.megatron import split, wrap_ddp
    from megatron_rlfp16.megatron.critic import compute_values, critic_train_step, make_critic
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron.core import parallel_state as ps

    init_runtime(ParallelConfig(tp=tp, pp=pp))
    model, arch = build_model(read_config_json(hf_dir))
    load_hf_checkpoint(model, arch, hf_dir)
    make_critic(model)
    batch, head, bias = inputs()
    last = ps.is_pipeline_last_stage()
    if last:
        with torch.no_grad():
            model.output_layer.weight.copy_(head)
            model.output_layer.bias.copy_(bias)
    ddp = wrap_ddp(model)
    micro = split(batch, MICRO)
    values = compute_values(ddp, micro)
    metrics = critic_train_step(ddp, micro, clip=0.2)
    named = [(n, p.main_grad) for n, p in model.named_parameters() if not n.startswith("output_layer.")]
    trunk = dataclasses.replace(arch, tie_embeddings=True)  # the critic has no lm_head to export
    grads = {n: t.clone() for n, t in export_hf_weights(named, Bridge(trunk), ShardContext.from_megatron(model))}
    head_grads = (model.output_layer.weight.main_grad.clone(), model.output_layer.bias.main_grad.clone()) if last else None
    return dict(values=values, metrics=metrics, grads=grads, head_grads=head_grads)


def reference(hf_dir):
    import transformers

    from megatron_rlfp16.losses.value import value_loss

    batch, head, bias = inputs()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    w = head.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    hidden = hf(batch["input_ids"], output_hidden_states=True).hidden_states[-1]  # after the final norm
    values = (hidden @ w.t() + b)[..., 0][:, :-1]
    loss, _ = value_loss(values, batch["old_values"], batch["returns"], batch["loss_mask"], clip=0.2)
    loss.backward()
    grads = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None and not n.startswith("lm_head")}
    return dict(values=values.detach(), loss=loss.item(), grads=grads, head_grads=(w.grad, b.grad))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from megatron_rlfp16.testing.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("critic")
    return {"qwen2": make_tiny_model("qwen2", str(root / "qwen2"), seed=1, tie_word_embeddings=True),
            "qwen3_moe": make_tiny_model("qwen3_moe", str(root / "moe"), seed=2)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_critic_values_and_gradients_equal_transformers(checkpoints, layout):
    family, tp, pp = LAYOUTS[layout]
    hf_dir = checkpoints[family]
    ref = reference(hf_dir)
    ranks = run_on_ranks(_worker, tp * pp, hf_dir, tp, pp, timeout=300)
    mask = inputs()[0]["loss_mask"]
    for rank, out in enumerate(ranks):
        diff = (out["values"] - ref["values"])[mask].abs().max().item()
        assert diff < 1e-4, (layout, rank, diff)
        assert out["metrics"]["value_loss"] == pytest.approx(ref["loss"], rel=1e-4)
        # transformers fuses the experts of a layer into one tensor; the bridge names them one by one.
        common = sorted(set(out["grads"]) & set(ref["grads"]))
        assert [n for n in ref["grads"] if n not in common and ".experts." not in n] == [], layout
        assert len(common) >= 10, layout
        for name in common:
            want = ref["grads"][name]
            scale = want.abs().max().item()
            assert scale > 0, name
            err = (out["grads"][name] - want).abs().max().item()
            assert err <= 1e-4 * max(1.0, scale) + 1e-6, f"{layout} rank {rank} {name}: {err:.3g} (scale {scale:.3g})"
        if out["head_grads"] is not None:
            for got, want in zip(out["head_grads"], ref["head_grads"]):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert any(out["head_grads"] is not None for out in ranks)
