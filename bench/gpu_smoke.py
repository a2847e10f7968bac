"""The GPU smoke check: one command, one GPU, about ten minutes, one JSON line per section.

    python bench/gpu_smoke.py --out runs/gpu-smoke            # on a GPU machine (make gpu-smoke)
    python bench/gpu_smoke.py --out runs/smoke --dry-run      # anywhere: tiny sizes, on CPU

Needs torch and megatron-core (either wheel the GPU machine has, 0.16.1 or 0.19.x) and transformers;
not vLLM, not TransformerEngine. Each section appends one JSON object to ``OUT/smoke.jsonl``
(``{"section", "ok", ...figures}`` or ``{"section", "ok": false, "error"}``) and the next section
runs whatever happened:

- ``environment``: versions, the device, its memory;
- ``parity``: Megatron (through the bridge) against transformers, logits in FP32, dense and MoE;
- ``fp16_mechanics``: FP16 training with dynamic loss scaling, with and without the distributed
  optimizer: an injected overflow skips the step and halves the scale, clean steps do not;
- ``logprobs``: vocab-parallel log-probs at V = 151,936 against ``log_softmax`` + gather;
- ``offload``: the trainer-state offload round trip (bit-exact, device memory released);
- ``memory``: half of Qwen3-8B (18 layers, about one TP=2 rank's 4.6 B parameters; a tiny model with
  ``--dry-run``) built for real with random weights, its memory after each phase (weights, gradient
  buffers and optimizer state after a step, activations of one 2,048-token micro-batch) next to the
  memory plan's figures;
- ``routing_replay``: the Megatron side of MoE routing replay on the device (random routes through
  the π_old pass and a train step; routing maps and log-probs against transformers routed alike).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_rlfp16.precision.dtypes import Precision  # noqa: E402  (torch-free)

QWEN3_8B = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
                tie_word_embeddings=False, torch_dtype=Precision.BF16.vllm_dtype)
TINY = dict(QWEN3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=1000)


def _device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def section_environment(args):
    import torch

    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.cuda.is_available())
    for name in ("megatron.core", "transformers", "vllm", "transformer_engine"):
        try:
            module = __import__(name, fromlist=["__version__"])
            out[name] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent is a figure too
            out[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        out.update(device=props.name, device_gib=round(props.total_memory / 2**30, 1))
    return out


def section_parity(args):
    import tempfile

    import torch

    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.models import build_model, causal_mask, read_config_json
    from megatron_rlfp16.testing.tiny import hf_logits, make_tiny_model

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("llama", "qwen3_moe"):
            hf = make_tiny_model(family, os.path.join(tmp, family), seed=1)
            model, arch = build_model(read_config_json(hf), parallel_output=False)
            model = model.to(_device()).eval()
            load_hf_checkpoint(model, arch, hf)
            ids = (torch.arange(2 * 24).reshape(2, 24) * 7 + 3) % arch.vocab_size
            with torch.no_grad():
                got = model(ids.to(_device()), torch.arange(24, device=_device())[None].expand(2, 24),
                            causal_mask(24, device=_device())).float().cpu()[..., :arch.vocab_size]
            want = hf_logits(hf, ids)
            out[f"{family}_max_abs_diff"] = float((got - want).abs().max())
    out["ok"] = all(v < 1e-3 for v in out.values())
    return out


def _trainer(precision_name, distributed, cfg=None, **precision_kwargs):
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_rlfp16.models import build_model
    from megatron_rlfp16.precision import OptimizerStep, PrecisionConfig

    precision = PrecisionConfig(trainer=precision_name, **precision_kwargs)
    model, arch = build_model(dict(cfg or TINY), params_dtype=precision.trainer.torch_dtype,
                              config_overrides=precision.transformer_overrides())
    model = model.to(_device())
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        **precision.ddp_kwargs(), use_distributed_optimizer=distributed), model)
    optimizer = precision.build_optimizer([ddp], lr=1e-3, weight_decay=0.0, use_distributed_optimizer=distributed)
    return ddp, optimizer, OptimizerStep(optimizer, precision, model=[ddp]), arch, torch


def _grad_step(ddp, optimizer, stepper, torch, value=1e-3):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    for p in ddp.parameters():
        p.main_grad.fill_(value)
    return stepper.step()


def section_fp16_mechanics(args):
    out = {}
    for distributed in (False, True):
        ddp, optimizer, stepper, _, torch = _trainer(Precision.FP16, distributed, hysteresis=1)
        scales, skipped = [], []
        for value in (1e-3, float("inf"), 1e-3):
            metrics = _grad_step(ddp, optimizer, stepper, torch, value)
            scales.append(metrics["loss_scale"])
            skipped.append(metrics["skipped_steps"])
        key = "distributed_optimizer" if distributed else "plain_optimizer"
        out[key] = dict(loss_scales=scales, skipped_steps=skipped,
                        ok=skipped == [0.0, 1.0, 1.0] and scales[1] == scales[0] / 2)
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def section_logprobs(args):
    import torch

    from megatron_rlfp16.logprobs import vocab_parallel_logprobs

    vocab = 151936
    b, s = (2, 64) if args.dry_run else (4, 1024)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(b, s, vocab, generator=g) * 4).to(_device())
    target = torch.randint(0, vocab, (b, s), generator=g).to(_device())
    start = time.perf_counter()
    got = vocab_parallel_logprobs(logits, target, vocab_size=vocab)
    seconds = time.perf_counter() - start
    want = torch.log_softmax(logits.double(), -1).gather(-1, target[..., None])[..., 0]
    diff = float((got.double() - want).abs().max())
    return dict(vocab=vocab, tokens=b * s, max_abs_diff=diff, seconds=round(seconds, 4), ok=diff < 1e-4)


def section_offload(args):
    from megatron_rlfp16.runtime.offload import TrainerOffload, _state_tensors

    ddp, optimizer, stepper, _, torch = _trainer(Precision.FP16, True)
    _grad_step(ddp, optimizer, stepper, torch)
    before = [t.detach().clone() for t in _state_tensors([ddp], optimizer)]
    mover = TrainerOffload([ddp], optimizer)
    cuda = torch.cuda.is_available()
    allocated = torch.cuda.memory_allocated() if cuda else None
    freed = mover.offload()
    allocated_offloaded = torch.cuda.memory_allocated() if cuda else None
    restored = mover.reload()
    after = list(_state_tensors([ddp], optimizer))
    identical = all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == len(after)
    out = dict(freed_bytes=freed, restored_bytes=restored, identical=identical)
    if cuda:
        out.update(allocated_before=allocated, allocated_offloaded=allocated_offloaded,
                   released=allocated - allocated_offloaded)
    out["ok"] = identical and freed == restored > 0 and (not cuda or allocated - allocated_offloaded >= 0.9 * freed)
    # The optimizer's part alone (--offload-optimizer's round trip around each optimizer step).
    allocated = torch.cuda.memory_allocated() if cuda else None
    optimizer_freed = mover.offload(("optimizer",))
    optimizer_released = allocated - torch.cuda.memory_allocated() if cuda else None
    optimizer_restored = mover.reload(("optimizer",))
    same = all(torch.equal(a, b) for a, b in zip(before, _state_tensors([ddp], optimizer)))
    out.update(optimizer_freed_bytes=optimizer_freed, optimizer_restored_bytes=optimizer_restored,
               optimizer_released=optimizer_released, optimizer_identical=same)
    out["ok"] = out["ok"] and same and 0 < optimizer_freed == optimizer_restored < freed and (
        not cuda or optimizer_released >= 0.9 * optimizer_freed)
    return out


def section_memory(args):
    """Half of Qwen3-8B (18 of its 36 layers, about 4.6 B parameters: the size of one TP=2 rank's
    shard) built for real on one GPU, its memory after each phase next to the memory plan's."""
    import torch

    from megatron_rlfp16.models import causal_mask, parse_hf_config
    from megatron_rlfp16.models.builder import uses_sequence_parallel
    from megatron_rlfp16.plan.memory import activation_bytes, plan_memory

    cfg = TINY if args.dry_run else dict(QWEN3_8B, num_hidden_layers=18)
    cuda = torch.cuda.is_available()

    def used():
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return None

    out = dict(model="tiny" if args.dry_run else "Qwen3-8B, 18 layers", phases={})
    base = used()
    ddp, optimizer, stepper, arch, _ = _trainer(Precision.FP16, False, cfg)
    out["phases"]["model_ddp_optimizer"] = used()
    _grad_step(ddp, optimizer, stepper, torch)
    out["phases"]["after_step"] = used()
    b, s = 1, (64 if args.dry_run else 2048)
    ids = torch.randint(0, arch.vocab_size, (b, s), device=_device())
    before_forward = used()
    logits = ddp(ids, torch.arange(s, device=_device())[None], causal_mask(s, device=_device()))
    out["phases"]["after_forward"] = used()
    del logits
    plan = plan_memory(parse_hf_config(cfg), dtype_bytes=2, micro_batch_size=b, seq_length=s)
    planned_state = sum(plan.components[k] for k in ("weights", "gradients", "master_weights", "optimizer_state"))
    out["planned_state_bytes"] = planned_state
    # The forward alone: logits in FP32 without the log-probs' own tensors.
    out["planned_activation_bytes"] = activation_bytes(
        arch, tp=1, micro_batch_size=b, seq_length=s, dtype_bytes=2,
        sequence_parallel=uses_sequence_parallel(arch, 1),
        attention="unfused", include_transient=False)
    if cuda:
        out["measured_state_bytes"] = out["phases"]["after_step"] - base
        out["measured_activation_bytes"] = out["phases"]["after_forward"] - before_forward
        out["state_ratio"] = round(planned_state / out["measured_state_bytes"], 3)
        out["activation_ratio"] = round(out["planned_activation_bytes"] / out["measured_activation_bytes"], 3)
        out["ok"] = 0.85 <= out["state_ratio"] <= 1.15
    else:  # no allocator on CPU: the bytes of the tensors the state consists of
        from megatron_rlfp16.runtime.offload import TrainerOffload

        out["measured_state_bytes"] = TrainerOffload([ddp], optimizer).resident_bytes()
        out["state_ratio"] = round(planned_state / out["measured_state_bytes"], 3)
        out["ok"] = 0.85 <= out["state_ratio"] <= 1.15
    return out


def section_routing_replay(args):
    """The Megatron side of routing replay on the device: random routes replayed through the π_old
    pass and one FP16 train step; every router call's routing map must equal the routes, and the
    replayed log-probs must equal transformers' MoE blocks forced to the same experts (FP32)."""
    import tempfile

    import torch
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.losses import PolicyLossConfig
    from megatron_rlfp16.megatron import compute_logprobs, routing, train_step, wrap_ddp
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.testing.routing import hf_model_routed_by, random_routes
    from megatron_rlfp16.testing.tiny import make_tiny_model

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_tiny_model("qwen3_moe", os.path.join(tmp, "moe"), seed=3)
        model, arch = build_model(read_config_json(hf))
        model = model.to(_device())
        load_hf_checkpoint(model, arch, hf)
        ddp = wrap_ddp(model)
        hub = routing.install(ddp)
        b, s = 4, 32
        ids = (torch.arange(b * s).reshape(b, s) * 13 + 5) % arch.vocab_size
        routes = random_routes(b, s, arch.num_layers, arch.moe_topk, arch.num_experts, seed=4, lengths=[s] * b)
        seen = []
        for m in model.modules():
            if isinstance(m, TopKRouter):
                m.register_forward_hook(lambda mod, a, o: seen.append((mod.layer_number - 1, o[1].cpu())))
        hub.phase(replay=True, compare=True)
        start = time.perf_counter()
        old = compute_logprobs(ddp, [dict(input_ids=ids, routes=routes)], vocab_size=arch.vocab_size).cpu()
        out["pi_old_seconds"] = round(time.perf_counter() - start, 4)
        out.update(hub.agreement())
        hub.finish()
        mask = torch.ones(b, s - 1)
        hub.phase(replay=True)
        start = time.perf_counter()
        train_step(ddp, [dict(input_ids=ids, routes=routes, loss_mask=mask, advantages=torch.ones(b),
                              old_logprobs=old, rollout_logprobs=old)], PolicyLossConfig(),
                   vocab_size=arch.vocab_size)
        out["train_step_seconds"] = round(time.perf_counter() - start, 4)
        hub.finish()
        rows = routes.transpose(0, 1)
        wrong = 0
        for layer, chosen_map in seen:
            want = rows[:, :, layer].reshape(-1, arch.moe_topk).long().sort(1).values
            chosen = chosen_map.to(torch.int8).topk(arch.moe_topk, dim=1).indices.sort(1).values
            valid = want[:, 0] >= 0
            wrong += int((chosen[valid] != want[valid]).any(1).sum())
        out["router_calls"], out["rows_not_replayed"] = len(seen), wrong
        reference, set_routes = hf_model_routed_by(hf)
        set_routes(routes)
        with torch.no_grad():
            lp = torch.log_softmax(reference(ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        out["logprob_max_abs_diff_vs_routed_transformers"] = float((old[:, : s - 2] - lp[:, : s - 2]).abs().max())
    out["ok"] = out["rows_not_replayed"] == 0 and out["logprob_max_abs_diff_vs_routed_transformers"] < 1e-3
    return out


SECTIONS = [section_environment, section_parity, section_fp16_mechanics, section_logprobs, section_offload,
            section_memory, section_routing_replay]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for smoke.jsonl")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (automatic without a GPU)")
    p.add_argument("--only", action="append", default=[], help="run only this section (repeatable)")
    args = p.parse_args(argv)
    import torch

    args.dry_run = args.dry_run or not torch.cuda.is_available()
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "smoke.jsonl")
    init_runtime(ParallelConfig())
    failures = 0
    for section in SECTIONS:
        name = section.__name__.removeprefix("section_")
        if args.only and name not in args.only:
            continue
        start = time.perf_counter()
        try:
            record = dict(section=name, **section(args))
            record.setdefault("ok", True)
        except Exception as err:  # noqa: BLE001 - one section's failure must not stop the others
            record = dict(section=name, ok=False, error=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc()[-2000:])
        record["seconds"] = round(time.perf_counter() - start, 2)
        failures += not record["ok"]
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}, default=str), flush=True)
    print(f"wrote {path}: {failures} section(s) failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
