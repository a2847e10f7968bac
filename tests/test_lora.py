"""LoRA on Megatron-Core against transformers + ``peft`` (the independent reference), on real ranks.

Random adapter tensors in PEFT's names (every ``lora_B`` non-zero, so every adapter path counts) are
loaded into Megatron at TP=1 (DP=2), TP=2 and PP=2 for a dense Llama (fused QKV with GQA, fused
gate/up), and at TP=2 with sequence parallelism for a Qwen3-MoE (attention adapters only; LoRA on
experts is refused). Checked: log-probs against ``peft``'s model in FP32; the adapters read back
(``lora_state_dict``) bit-exact; only adapter parameters train; the gradients of one RL loss
(``train_step``, Megatron DDP) equal ``peft``'s gradients of the same loss, adapter by adapter.
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
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import transformers
    from peft import LoraConfig as PeftLoraConfig, get_peft_model, set_peft_model_state_dict

    root = tmp_path_factory.mktemp("lora")
    dirs = {f: make_tiny_model(f, str(root / f), seed=3) for f in ("llama", "qwen3_moe")}
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
