"""FP16 training with loss scaling on real Megatron ranks (gloo, CPU): no mocks of Megatron.

A tiny Llama (vocab 300, hidden 64, 2 layers) built in FP16 from ``PrecisionConfig``, wrapped in
Megatron's DDP with the distributed optimizer, trained through ``get_forward_backward_func`` on a
fixed batch it can memorize. Overflows are real: either the loss is multiplied by 1e8 inside the
loss function, so the FP16 backward overflows to inf, or every ``main_grad`` of ONE rank is set to
inf after the gradient reduction (only that rank's optimizer shard sees it, so the other ranks skip
only through Megatron's all-reduce of ``found_inf``).

Expected loss-scale sequences are written out by hand from Megatron's ``DynamicGradScaler`` rules
(back off after ``hysteresis`` overflows counted since the last growth, grow after
``loss_scale_window`` clean steps), not read back from a run.

TP=2, PP=2 and DP=2 all run in ONE spawn of 2 ranks (Megatron is imported once; ``init_runtime``
rebuilds the parallel groups between layouts); the tests below read that run's results.
"""
import math

import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks

pytestmark = pytest.mark.ranks

VOCAB, SEQ, MICRO, NUM_MICRO, LR = 300, 16, 2, 2, 1e-2
SPIKE = 1e8  # loss multiplier that overflows FP16 gradients at any loss scale >= 1


# -- helpers that run inside the ranks ----------------------------------------------------------


def _hf_config() -> dict:
    from megatron_rlfp16.testing.tiny import tiny_config

    return tiny_config("llama").to_dict()


def _build(precision, *, tp=1, pp=1, distributed=True):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_rlfp16.models import build_model
    from megatron_rlfp16.precision import OptimizerStep
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=tp, pp=pp))
    model, _ = build_model(_hf_config(), params_dtype=precision.trainer.torch_dtype,
                           config_overrides=precision.transformer_overrides())
    head = precision.prepare_model(model)
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(**precision.ddp_kwargs(), use_distributed_optimizer=distributed),
        model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = precision.build_optimizer([ddp], lr=LR, weight_decay=0.0, use_distributed_optimizer=distributed)
    return ddp, optimizer, OptimizerStep(optimizer, precision, model=[ddp]), head


def _batches():
    """This DP rank's fixed micro-batches: NUM_MICRO x [MICRO, SEQ + 1] token ids."""
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(100 + ps.get_data_parallel_rank())
    return list(torch.randint(0, VOCAB, (NUM_MICRO, MICRO, SEQ + 1), generator=g))


def _forward_step(spike: float, losses: list):
    from megatron.core import parallel_state as ps

    from megatron_rlfp16.logprobs import vocab_parallel_logprobs
    from megatron_rlfp16.models import causal_mask

    tp_group = ps.get_tensor_model_parallel_group()

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        output = model(inputs, torch.arange(SEQ).expand_as(inputs), causal_mask(SEQ))

        def loss_func(logits):
            loss = -vocab_parallel_logprobs(logits, targets, vocab_size=VOCAB, tp_group=tp_group).mean()
            losses.append(loss.detach())
            return loss * spike, {"loss": loss.detach()}

        return output, loss_func

    return forward_step


def _train_step(ddp, optimizer, stepper, *, spike=1.0, poison_rank=None):
    """One step; returns (mean loss on the last stage or None, the stepper's metrics or the
    exception it raised)."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = []
    get_forward_backward_func()(
        forward_step_func=_forward_step(spike, losses), data_iterator=iter(_batches()), model=[ddp],
        num_microbatches=NUM_MICRO, seq_length=SEQ, micro_batch_size=MICRO, forward_only=False,
    )
    if poison_rank is not None and dist.get_rank() == poison_rank:
        for p in ddp.parameters():
            p.main_grad.fill_(float("inf"))
    loss = torch.stack(losses).mean().item() if losses else None
    try:
        return loss, stepper.step()
    except Exception as e:  # noqa: BLE001 - the caller inspects it
        return loss, e


def _params(ddp) -> dict:
    return {n: p.detach().clone() for n, p in ddp.module.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _scaler_state(optimizer) -> dict:
    sub = getattr(optimizer, "chained_optimizers", [optimizer])[0]
    state = sub.grad_scaler.state_dict()
    return dict(scale=float(state["scale"]), growth_tracker=state["growth_tracker"],
                hysteresis_tracker=state["hysteresis_tracker"])


def _head_check(ddp) -> dict:
    """One forward with a hook on the output layer: are the logits FP32, and equal to an FP32
    matmul of the FP16 hidden states and weight?"""
    from megatron_rlfp16.models import causal_mask

    seen = {}
    layer = ddp.module.output_layer
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(h=args[0], logits=out[0]))
    with torch.no_grad():
        tokens = _batches()[0][:, :-1]
        ddp(tokens, torch.arange(SEQ).expand_as(tokens), causal_mask(SEQ))
    handle.remove()
    h, w = seen["h"], layer.weight
    fp32 = torch.matmul(h.float(), w.float().t())
    fp16 = torch.matmul(h, w.t()).float()
    return dict(hidden_dtype=h.dtype, weight_dtype=w.dtype, logits_dtype=seen["logits"].dtype,
                err_vs_fp32=(seen["logits"] - fp32).abs().max().item(),
                err_vs_fp16=(seen["logits"] - fp16).abs().max().item())


# -- rank functions -----------------------------------------------------------------------------


def _overflow_run(tp, pp, precision_kwargs, spike_steps, num_steps):
    """Trains ``num_steps`` steps, overflowing (loss spike) at the 1-based ``spike_steps``."""
    from megatron_rlfp16.precision import PrecisionConfig

    precision = PrecisionConfig(trainer="fp16", **precision_kwargs)
    ddp, optimizer, stepper, head = _build(precision, tp=tp, pp=pp)
    out = dict(head_layers=head, config_fp16=ddp.config.fp16,
               grad_scale=float(ddp.config.grad_scale_func(torch.ones(1))),  # what the schedule multiplies by
               param_dtypes=sorted({str(p.dtype) for p in ddp.module.parameters()}),
               head=_head_check(ddp) if pp == 1 else None, steps=[])
    for step in range(1, num_steps + 1):
        before = _params(ddp)
        loss, metrics = _train_step(ddp, optimizer, stepper, spike=SPIKE if step in spike_steps else 1.0)
        if isinstance(metrics, Exception):
            raise metrics
        out["steps"].append(dict(loss=loss, metrics=metrics, unchanged=_same(before, _params(ddp))))
    return out


def _checkpoint_run(ckpt_dir):
    """DP=2: train 3 steps (rank 0 alone poisoned at step 2), save, run 2 more; rebuild fresh,
    load, run the same 2 steps; return what must match."""
    from megatron_rlfp16.checkpoint.megatron_ckpt import load_megatron_checkpoint, save_megatron_checkpoint
    from megatron_rlfp16.precision import PrecisionConfig

    precision = PrecisionConfig(trainer="fp16", initial_loss_scale=256.0, loss_scale_window=2, hysteresis=2)
    ddp, optimizer, stepper, _ = _build(precision)
    first = []
    for step in (1, 2, 3):
        before = _params(ddp)
        _, metrics = _train_step(ddp, optimizer, stepper, poison_rank=0 if step == 2 else None)
        first.append(dict(metrics=metrics, unchanged=_same(before, _params(ddp))))
    save_megatron_checkpoint(ddp, ckpt_dir, hf_config=_hf_config(),
                             extra_state=stepper.checkpoint_state(ddp))
    saved = dict(counters=stepper.state_dict(), scaler=_scaler_state(optimizer), params=_params(ddp))
    continued = [_train_step(ddp, optimizer, stepper)[1] for _ in range(2)]
    after = _params(ddp)

    ddp2, optimizer2, stepper2, _ = _build(precision)
    fresh_differs = not _same(saved["params"], _params(ddp2))
    loaded = load_megatron_checkpoint(ddp2, ckpt_dir,
                                      extra_state=stepper2.checkpoint_state(ddp2, is_loading=True))
    stepper2.load_checkpoint_state(loaded)
    restored = dict(counters=stepper2.state_dict(), scaler=_scaler_state(optimizer2),
                    params_equal=_same(saved["params"], _params(ddp2)))
    resumed = [_train_step(ddp2, optimizer2, stepper2)[1] for _ in range(2)]
    return dict(first=first, saved={k: v for k, v in saved.items() if k != "params"},
                restored=restored, fresh_differs=fresh_differs, continued=continued, resumed=resumed,
                resumed_equal=_same(after, _params(ddp2)))


def _dp2_run(ckpt_dir):
    """DP=2, one set of ranks for both: the checkpoint round trip, then the floor stops."""
    return dict(checkpoint=_checkpoint_run(ckpt_dir), floor=_floor_run())


def _floor_run():
    """DP=2: overflows at a dynamic floor (initial == min, hysteresis 2) and under a static scale."""
    from megatron_rlfp16.precision import PrecisionConfig

    out = {}
    precision = PrecisionConfig(trainer="fp16", initial_loss_scale=4.0, min_loss_scale=4.0, hysteresis=2)
    ddp, optimizer, stepper, _ = _build(precision)
    before = _params(ddp)
    results = [_train_step(ddp, optimizer, stepper, poison_rank=1)[1],  # hysteresis 2 -> 1: skip
               _train_step(ddp, optimizer, stepper)[1]]                 # clean step
    updated = _params(ddp)
    results.append(_train_step(ddp, optimizer, stepper, poison_rank=1)[1])  # 1 -> 0 at floor: stop
    out["dynamic"] = [r if isinstance(r, dict) else (type(r).__name__, str(r)) for r in results]
    out["dynamic_updated_once"] = not _same(before, updated) and _same(updated, _params(ddp))

    static = PrecisionConfig(trainer="fp16", loss_scale=4.0)
    ddp, optimizer, stepper, _ = _build(static)
    error = _train_step(ddp, optimizer, stepper, poison_rank=0)[1]
    out["static"] = (type(error).__name__, str(error))
    # A spike is caught earlier: ddp_kwargs() turns Megatron DDP's NaN/Inf check on without a
    # dynamic scaler, and it raises before the gradient reduction.
    try:
        _train_step(ddp, optimizer, stepper, spike=SPIKE)
        out["static_spike"] = None
    except RuntimeError as e:
        out["static_spike"] = str(e)
    return out


# -- tests --------------------------------------------------------------------------------------


TP2_SPIKES = {2, 4, 5, 9}
# hysteresis 2, window 3, initial 256, Megatron's factors 2 / 0.5. The tracker of overflows is
# reset only by growth: the non-consecutive overflows at steps 2 and 4 back off at step 4, and
# step 5 backs off again; three clean steps (6-8) grow and reset it, so step 9 does not back off.
TP2_SCALES = [256, 256, 256, 128, 64, 64, 64, 128, 128, 128, 128, 256]
PP2_SPIKES = {3, 4}
# hysteresis 1, window 3, initial 256, growth 4 / backoff 0.25 (installed by build_optimizer).
PP2_SCALES = [256, 256, 64, 16, 16, 16, 64, 64, 64, 256]
TP2_KWARGS = dict(initial_loss_scale=256.0, loss_scale_window=3, hysteresis=2)
PP2_KWARGS = dict(initial_loss_scale=256.0, loss_scale_window=3, hysteresis=1, growth_factor=4.0,
                  backoff_factor=0.25)


CLIP = 0.05  # far below the tiny model's gradient norm: the clip is active


def _set_weights(ddp) -> None:
    """The same starting point in every precision: seeded values rounded to FP16 first."""
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        for i, (name, p) in enumerate(ddp.module.named_parameters()):
            g = torch.Generator().manual_seed(1000 * i + ps.get_tensor_model_parallel_rank())
            value = (0.02 * torch.randn(p.shape, generator=g)).half()
            p.copy_(value.float() + (1.0 if "norm" in name else 0.0))


def _scale_run():
    """One clipped step from the same weights with initial loss scales 2^8 and 2^14 (FP16) and in
    FP32 (no scaling): the grad norm and the weights after the step."""
    from megatron_rlfp16.precision import PrecisionConfig

    out = {}
    for label, kwargs in (("fp16_2^8", dict(trainer="fp16", initial_loss_scale=2.0**8, grad_clip=CLIP)),
                          ("fp16_2^14", dict(trainer="fp16", initial_loss_scale=2.0**14, grad_clip=CLIP)),
                          ("fp32", dict(trainer="fp32", grad_clip=CLIP))):
        precision = PrecisionConfig(**kwargs)
        ddp, optimizer, stepper, _ = _build(precision, tp=2, distributed=False)
        # Plain SGD (Adam's update would hide the gradient's magnitude; Megatron's distributed
        # optimizer is Adam only) with the clip.
        optimizer = precision.build_optimizer([ddp], lr=1.0, weight_decay=0.0, use_distributed_optimizer=False,
                                              optimizer="sgd", sgd_momentum=0.0)
        from megatron_rlfp16.precision import OptimizerStep

        stepper = OptimizerStep(optimizer, precision, model=[ddp])
        _set_weights(ddp)
        optimizer.reload_model_params()  # the FP32 master copies take the new weights
        start = {n: p.float() for n, p in _params(ddp).items()}
        _, metrics = _train_step(ddp, optimizer, stepper)
        out[label] = dict(metrics=metrics, start=start, params={n: p.float() for n, p in _params(ddp).items()})
    return out


def _all_runs(ckpt_dir):
    """Every layout on one set of 2 ranks (init_runtime rebuilds Megatron's groups between them):
    spawning and importing Megatron once instead of three times."""
    return dict(
        tp2=_overflow_run(2, 1, TP2_KWARGS, TP2_SPIKES, len(TP2_SCALES)),
        pp2=_overflow_run(1, 2, PP2_KWARGS, PP2_SPIKES, len(PP2_SCALES)),
        dp2=_dp2_run(ckpt_dir),
        scales=_scale_run(),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("fp16") / "ckpt"
    return run_on_ranks(_all_runs, 2, str(ckpt_dir), timeout=600)


@pytest.fixture(scope="module")
def tp2_run(runs):
    return [r["tp2"] for r in runs]


@pytest.fixture(scope="module")
def pp2_run(runs):
    return [r["pp2"] for r in runs]


@pytest.fixture(scope="module")
def dp2_run(runs):
    return [r["dp2"] for r in runs]


def _check_overflow_run(results, spikes, scales):
    for rank, out in enumerate(results):
        assert out["config_fp16"] and out["param_dtypes"] == ["torch.float16"], rank
        assert out["grad_scale"] == scales[0], rank  # OptimizerStep wired scale_loss into the schedule
        steps = out["steps"]
        assert [s["metrics"]["loss_scale"] for s in steps] == scales, rank
        for i, s in enumerate(steps, start=1):
            m = s["metrics"]
            assert m["overflow"] == (1.0 if i in spikes else 0.0), (rank, i)
            assert m["skipped_steps"] == sum(1 for j in spikes if j <= i), (rank, i)
            assert m["steps"] == i
            # A skipped step leaves every weight bit-identical; every other step changes them.
            assert s["unchanged"] == (i in spikes), (rank, i)
            assert math.isnan(m["grad_norm"]) == (i in spikes), (rank, i)
    losses = [s["loss"] for s in results[-1]["steps"]]  # last rank: the last pipeline stage
    for i in spikes:  # same weights, same data: the next step sees exactly the same loss
        assert losses[i] == losses[i - 1], i
    assert losses[-1] < 0.6 * losses[0], losses


def test_tp2_fp16_trains_and_skips_overflowed_steps(tp2_run):
    _check_overflow_run(tp2_run, TP2_SPIKES, TP2_SCALES)


def test_tp2_lm_head_runs_in_fp32(tp2_run):
    for out in tp2_run:
        assert out["head_layers"] == ["output_layer"]
        head = out["head"]
        assert (head["hidden_dtype"], head["weight_dtype"]) == (torch.float16, torch.float16)
        assert head["logits_dtype"] == torch.float32
        # Bitwise the FP32 product, and visibly not an FP16 one (which rounds logits to 11 bits).
        assert head["err_vs_fp32"] == 0.0 and head["err_vs_fp16"] > 1e-5, head


def test_pp2_fp16_trains_and_skips_with_custom_factors(pp2_run):
    assert pp2_run[0]["head_layers"] == [] and pp2_run[1]["head_layers"] == ["output_layer"]
    _check_overflow_run(pp2_run, PP2_SPIKES, PP2_SCALES)


def test_checkpoint_restores_scale_counters_and_trajectory(dp2_run):
    for rank, out in enumerate(r["checkpoint"] for r in dp2_run):
        first = out["first"]
        # Only rank 0's shard held the inf; rank 1 skipped through the all-reduced found_inf.
        assert [f["metrics"]["overflow"] for f in first] == [0.0, 1.0, 0.0], rank
        assert [f["unchanged"] for f in first] == [False, True, False], rank
        # 256 -> (overflow, hysteresis 2 -> 1) 256 -> 256: growth tracker 1 of window 2.
        assert out["saved"]["scaler"] == dict(scale=256.0, growth_tracker=1, hysteresis_tracker=1)
        assert out["saved"]["counters"] == dict(version=1, steps=3, skipped_steps=1, consecutive_skips=0)
        assert out["fresh_differs"], "the rebuilt model should start from different random weights"
        assert out["restored"] == dict(out["saved"], params_equal=True), rank
        assert out["resumed"] == out["continued"], rank
        assert [m["loss_scale"] for m in out["resumed"]] == [512.0, 512.0]  # grew at step 4
        assert out["resumed_equal"], rank


def test_overflow_at_the_loss_scale_floor_stops_training(dp2_run):
    for rank, out in enumerate(r["floor"] for r in dp2_run):
        skipped, clean, stopped = out["dynamic"]
        assert skipped["overflow"] == 1.0 and skipped["loss_scale"] == 4.0, rank
        assert clean["overflow"] == 0.0 and clean["skipped_steps"] == 1.0, rank
        assert out["dynamic_updated_once"], rank
        kind, message = stopped
        assert kind == "LossScaleFloorError", message
        for needle in ("step 3", "min_loss_scale=4", "65504", "fp32_logits", "promote_to_fp32",
                       "OverflowGuard", "learning rate", "trainer='bf16'"):
            assert needle in message, (needle, message)
        kind, message = out["static"]
        assert kind == "LossScaleFloorError" and "static loss_scale=4" in message, message
        assert "loss_scale=None" in message, message
        assert out["static_spike"] is not None and "found" in out["static_spike"], out["static_spike"]


def test_grad_norm_and_clipped_step_do_not_depend_on_the_loss_scale(runs):
    for rank, out in enumerate(r["scales"] for r in runs):
        low, high, ref = out["fp16_2^8"], out["fp16_2^14"], out["fp32"]
        for run in (low, high):
            assert run["metrics"]["skipped_steps"] == 0, (rank, run["metrics"])
        norm = ref["metrics"]["grad_norm"]
        assert norm > 10 * CLIP  # the clip is active
        # The norm is measured after unscaling: the same at both scales, and the FP32 model's.
        assert low["metrics"]["grad_norm"] == pytest.approx(high["metrics"]["grad_norm"], rel=1e-5)
        assert low["metrics"]["grad_norm"] == pytest.approx(norm, rel=2e-2)
        for name, w in ref["params"].items():
            torch.testing.assert_close(low["params"][name], high["params"][name], rtol=0, atol=1e-3, msg=name)
            # FP16 storage rounds to ~1e-3 of the magnitude (the norms' weights are ~1); an unscaled or
            # unclipped update would be >= 256 x the clipped one (~1e-4 per weight).
            torch.testing.assert_close(low["params"][name], w, rtol=0, atol=2e-3, msg=name)
        moved = max((ref["params"][n] - ref["start"][n]).abs().max().item() for n in ref["params"])
        assert 1e-5 < moved < 1e-2, moved
