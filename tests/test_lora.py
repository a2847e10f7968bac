"""LoRA on Megatron-Core against transformers + ``peft`` (the independent reference), on real ranks.

Random adapter tensors in PEFT's names (every ``lora_B`` non-zero, so every adapter path counts) are
loaded into Megatron at TP=1 (DP=2), TP=2 and PP=2 for a dense Llama (fused QKV with GQA, fused
gate/up), and at TP=2 with sequence parallelism for a Qwen3-MoE (attention adapters only; LoRA on
experts is refused). Checked: log-probs against ``peft``'s model in FP32; the adapters read back
(``lora_state_dict``) bit-exact; only adapter parameters train; the gradients of one RL loss
(``train_step``, Megatron DDP) equal ``peft``'s gradients of the same loss, adapter by adapter.

In the same spawn: adapters checkpointed at TP=2 load at PP=2 bit-exact (the checkpoint holds no base
weights); LoRA on one side of a load only is refused; an FP16 step with overflowing gradients is
skipped with every parameter bit-identical, and the FP16 optimizer's FP32 masters are the adapters.
"""
import pytest
import torch

from megatron_rlfp16.losses import PolicyLossConfig, policy_loss
from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.lora import random_adapter_tensors
from megatron_rlfp16.testing.tiny import make_tiny_model

pytestmark = pytest.mark.ranks

RANK, ALPHA = 4, 8.0
DENSE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MOE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CASES = {  # name: (family, targets, tp, pp)
    "llama_tp1": ("llama", DENSE_TARGETS, 1, 1),
    "llama_tp2": ("llama", DENSE_TARGETS, 2, 1),
    "llama_pp2": ("llama", DENSE_TARGETS, 1, 2),
    "llama_qv_down_tp2": ("llama", ("q_proj", "v_proj", "down_proj"), 2, 1),
    "moe_attention_tp2_sp": ("qwen3_moe", MOE_TARGETS, 2, 1),
}
B, S, PROMPT = 4, 12, 3
CONFIG = PolicyLossConfig(loss="ppo_clip", agg="token-mean")


def batch():
    ids = (torch.arange(B * S).reshape(B, S) * 29 + 7) % 300
    target = torch.arange(1, S)
    mask = torch.stack([(target >= PROMPT)] * B).float()
    return dict(input_ids=ids, loss_mask=mask, advantages=torch.tensor([1.0, -0.5, 2.0, -1.5]))


def adapter_tensors(hf_dir, targets, seed=0):
    return random_adapter_tensors(hf_dir, targets, rank=RANK, alpha=ALPHA, seed=seed)


def _worker(dirs, tensors):
    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.lora import LoraConfig, apply_lora, load_lora_state_dict, lora_state_dict
    from megatron_rlfp16.megatron import compute_logprobs, train_step, wrap_ddp
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    results = {}
    for case, (family, targets, tp, pp) in CASES.items():
        init_runtime(ParallelConfig(tp=tp, pp=pp))
        model, arch = build_model(read_config_json(dirs[family]))
        load_hf_checkpoint(model, arch, dirs[family])
        apply_lora(model, arch, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=targets))
        used = load_lora_state_dict(model, arch, tensors[case])
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        ddp = wrap_ddp(model)
        mb = batch()
        old = compute_logprobs(ddp, [dict(input_ids=mb["input_ids"])], vocab_size=arch.vocab_size)
        train_step(ddp, [dict(mb, old_logprobs=old, rollout_logprobs=old)], CONFIG, vocab_size=arch.vocab_size)
        results[case] = dict(old=old.clone(), used=used, trainable=trainable,
                             weights=lora_state_dict(model, arch), grads=lora_state_dict(model, arch, grads=True))
    results["checkpoint"] = _checkpoint_round_trip(dirs, tensors["llama_tp2"])
    results["fp16"] = _fp16_overflow_leaves_everything(dirs["llama"], tensors["llama_tp2"])
    return results


def _lora_model(hf_dir, tp, pp, tensors=None, seed=0, dtype=None, lora=True):
    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.lora import LoraConfig, apply_lora, load_lora_state_dict
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=tp, pp=pp))
    model, arch = build_model(read_config_json(hf_dir), **({} if dtype is None else dict(params_dtype=dtype)))
    load_hf_checkpoint(model, arch, hf_dir)
    if lora:
        apply_lora(model, arch, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=DENSE_TARGETS), seed=seed)
        if tensors is not None:
            load_lora_state_dict(model, arch, tensors)
    return model, arch


def _checkpoint_round_trip(dirs, tensors):
    """Adapters saved at TP=2 (the run checkpoint: adapters only) load at PP=2 exactly; LoRA on one
    side only is refused with a message naming both sides."""
    import os

    from megatron_rlfp16.checkpoint import load_megatron_checkpoint, save_megatron_checkpoint
    from megatron_rlfp16.checkpoint.hf_io import CheckpointError
    from megatron_rlfp16.lora import lora_state_dict
    from megatron_rlfp16.models import read_config_json

    hf = dirs["llama"]
    cfg = read_config_json(hf)
    ckpt, full = os.path.join(dirs["root"], "lora_ckpt"), os.path.join(dirs["root"], "full_ckpt")
    model, arch = _lora_model(hf, 2, 1, tensors)
    save_megatron_checkpoint(model, ckpt, hf_config=cfg, overwrite=True, lora_base=hf)
    model, arch = _lora_model(hf, 1, 2, seed=5)  # other random adapters until the load
    load_megatron_checkpoint(model, ckpt)
    out = dict(loaded=lora_state_dict(model, arch))
    bare, _ = _lora_model(hf, 2, 1, lora=False)
    try:
        load_megatron_checkpoint(bare, ckpt)
    except CheckpointError as e:
        out["into_full"] = str(e)
    save_megatron_checkpoint(bare, full, hf_config=cfg, overwrite=True)
    model, _ = _lora_model(hf, 2, 1)
    try:
        load_megatron_checkpoint(model, full)
    except CheckpointError as e:
        out["into_lora"] = str(e)
    size = lambda d: sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))  # noqa: E731
    base = sum(p.numel() * p.element_size() for p in bare.parameters())
    out["bytes"] = (size(ckpt), size(full), base * 2)  # two TP ranks' shards: the whole base
    return out


def _fp16_overflow_leaves_everything(hf, tensors):
    """FP16 LoRA at TP=2 with Megatron's FP16 optimizer: an overflowing step (huge advantages) is skipped
    with every parameter, adapter or base, bit-identical; a clean step moves only the adapters. The
    optimizer's FP32 master copies are the adapters' and nothing else."""
    from megatron_rlfp16.megatron import compute_logprobs, train_step, wrap_ddp
    from megatron_rlfp16.precision import OptimizerStep, PrecisionConfig

    precision = PrecisionConfig(trainer="fp16", initial_loss_scale=1024.0).validate()
    model, arch = _lora_model(hf, 2, 1, tensors, dtype=precision.trainer.torch_dtype)
    precision.prepare_model(model)
    ddp = wrap_ddp(model, **precision.ddp_kwargs())
    optimizer = precision.build_optimizer([ddp], lr=1e-2, weight_decay=0.0)
    stepper = OptimizerStep(optimizer, precision, model=ddp)
    snapshot = lambda: {n: p.detach().clone() for n, p in model.named_parameters()}  # noqa: E731
    masters = [p for g in optimizer.param_groups for p in g["params"]]
    out = dict(master_dtypes=sorted({str(p.dtype) for p in masters}), master_numel=sum(p.numel() for p in masters),
               adapter_numel=sum(p.numel() for n, p in model.named_parameters() if p.requires_grad))
    steps = []
    for advantage in (1e8, 1.0):
        before = snapshot()
        mb = batch()
        mb["advantages"] = mb["advantages"] * advantage
        old = compute_logprobs(ddp, [dict(input_ids=mb["input_ids"])], vocab_size=arch.vocab_size)
        train_step(ddp, [dict(mb, old_logprobs=old, rollout_logprobs=old)], CONFIG, vocab_size=arch.vocab_size)
        metrics = stepper.step()
        after = snapshot()
        steps.append(dict(skipped=float(metrics["overflow"]), loss_scale=float(metrics["loss_scale"]),
                          changed=sorted(n for n in before if not torch.equal(before[n], after[n]))))
    out["steps"] = steps
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import transformers
    from peft import LoraConfig as PeftLoraConfig, get_peft_model, set_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    dirs = {f: make_tiny_model(f, str(root / f), seed=3) for f in ("llama", "qwen3_moe")}
    dirs["root"] = str(root)
    tensors = {case: adapter_tensors(dirs[f], targets, seed=i) for i, (case, (f, targets, _, _)) in enumerate(CASES.items())}
    per_rank = run_on_ranks(_worker, 2, dirs, tensors, timeout=900)
    reference = {}
    for case, (family, targets, _, _) in CASES.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(dirs[family])
        peft_model = get_peft_model(model, PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets)))
        set_peft_model_state_dict(peft_model, tensors[case])
        mb = batch()
        logits = peft_model(input_ids=mb["input_ids"]).logits.float()
        lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, mb["input_ids"][:, 1:, None]).squeeze(-1)
        loss, _ = policy_loss(lp, lp.detach(), lp.detach(), mb["advantages"], mb["loss_mask"].bool(), CONFIG)
        loss.backward()
        grads = {n.replace(".default", ""): p.grad.clone() for n, p in peft_model.named_parameters() if "lora_" in n}
        reference[case] = dict(old=lp.detach(), grads=grads, tensors=tensors[case])
    return per_rank, reference


@pytest.mark.parametrize("case", list(CASES))
def test_logprobs_equal_peft(runs, case):
    per_rank, reference = runs
    for result in per_rank:
        assert (result[case]["old"] - reference[case]["old"]).abs().max() <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_adapters_read_back_exactly_and_only_they_train(runs, case):
    per_rank, reference = runs
    tensors = reference[case]["tensors"]
    seen = {}
    for result in per_rank:
        r = result[case]
        assert r["trainable"] and all(".lora." in n for n in r["trainable"])
        for name, t in r["weights"].items():
            assert torch.equal(t, tensors[name]), name
        seen.update(r["weights"])
    assert set(seen) == set(tensors)  # every adapter of every stage


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_peft(runs, case):
    per_rank, reference = runs
    want = reference[case]["grads"]
    got = {}
    for result in per_rank:
        got.update(result[case]["grads"])
    assert set(got) == set(want)
    for name, g in got.items():
        assert torch.allclose(g, want[name], atol=1e-6, rtol=1e-4), (name, (g - want[name]).abs().max())


def test_adapter_checkpoints_reshard_and_hold_only_the_adapters(runs):
    per_rank, reference = runs
    want = reference["llama_tp2"]["tensors"]
    got = {}
    for result in per_rank:
        got.update(result["checkpoint"]["loaded"])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    lora_bytes, full_bytes, base_bytes = per_rank[0]["checkpoint"]["bytes"]
    adapter_bytes = sum(t.numel() * 4 for t in want.values())
    assert base_bytes < full_bytes  # the full checkpoint holds the base ...
    assert adapter_bytes <= lora_bytes < base_bytes / 4  # ... the LoRA one the adapters, not the base


def test_lora_on_one_side_only_is_refused(runs):
    per_rank, _ = runs
    for result in per_rank:
        c = result["checkpoint"]
        assert "holds LoRA adapters (rank 4)" in c["into_full"] and "this run has no LoRA" in c["into_full"]
        assert "--lora-rank 4" in c["into_full"]
        assert "holds a full model without LoRA adapters, and this run has LoRA (rank 4)" in c["into_lora"]


def test_fp16_overflow_skips_with_adapters_bit_identical(runs):
    per_rank, _ = runs
    for result in per_rank:
        r = result["fp16"]
        assert r["master_dtypes"] == ["torch.float32"] and r["master_numel"] == r["adapter_numel"]
        overflow, clean = r["steps"]
        assert overflow["skipped"] == 1.0 and overflow["changed"] == []
        assert clean["skipped"] == 0.0 and clean["changed"] and all(".lora." in n for n in clean["changed"])
