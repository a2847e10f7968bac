"""A vLLM engine colocated with the trainer's ranks.

Every trainer rank creates the engine in-process (``external_launcher``: the ranks of one rollout
TP group run identical engines with the same seed and see the same outputs). Its dtype comes from
the run's ``Precision``, and it returns log-probs of the *processed* distribution (after temperature),
the one the trainer scores with temperature-scaled logits, so importance ratios compare like with like.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_rlfp16.rollout.batch import RolloutBatch

VLLM_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32",
               "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


@dataclasses.dataclass(kw_only=True)
class RolloutConfig:
    dtype: str = "float16"
    """Engine dtype; normally taken from ``PrecisionConfig`` so it cannot drift from the trainer."""
    tp: int = 1
    """Rollout tensor-parallel size (independent of the trainer's TP)."""
    max_model_len: int = 512
    """Longest prompt + response the engine accepts; longer prompts are skipped and counted."""
    seed: int = 0
    gpu_memory_utilization: float = 0.4
    """Fraction of GPU memory for weights + KV cache (GPU only; colocated with training)."""
    enable_sleep_mode: Optional[bool] = None
    """Release weights and KV cache while training (GPU only); None: on when a GPU is present."""
    sleep_level: int = 2
    """vLLM sleep level: 2 discards the weights (the refit after training rewrites them all), 1 keeps
    a copy in host memory (the engine can then generate again without a refit)."""
    enforce_eager: bool = True

    def validate(self) -> None:
        if self.dtype not in VLLM_DTYPES:
            raise ValueError(f"RolloutConfig.dtype={self.dtype!r}; valid: {sorted(set(VLLM_DTYPES))}")
        if self.tp < 1:
            raise ValueError(f"RolloutConfig.tp={self.tp!r}: must be >= 1")
        if self.max_model_len < 2:
            raise ValueError(f"RolloutConfig.max_model_len={self.max_model_len!r}: must be >= 2")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"RolloutConfig.sleep_level={self.sleep_level!r}; valid: 1, 2")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"RolloutConfig.gpu_memory_utilization={self.gpu_memory_utilization!r}: must be in (0, 1]"
            )


class RolloutEngine:
    """``generate`` for rollouts, ``update_weights`` for in-place refit from the bridge's stream."""

    def __init__(self, hf_dir: str, config: RolloutConfig, *, engine_kwargs: Optional[dict] = None):
        """``engine_kwargs`` are merged into vLLM's ``LLM(...)`` arguments last; pass
        ``PrecisionConfig.vllm_kwargs()`` so the engine's dtype and FP32 islands follow the trainer's."""
        config.validate()
        # The engine must live in this process (the trainer's rank), with deterministic scheduling.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.config = config
        kwargs = dict(
            model=hf_dir,
            dtype=VLLM_DTYPES[config.dtype],
            skip_tokenizer_init=True,
            enforce_eager=config.enforce_eager,
            max_model_len=config.max_model_len,
            seed=config.seed,
            tensor_parallel_size=config.tp,
            logprobs_mode="processed_logprobs",
        )
        if torch.distributed.is_initialized():
            kwargs["distributed_executor_backend"] = "external_launcher"
            world = torch.distributed.get_world_size()
            if world % config.tp:
                raise ValueError(f"RolloutConfig.tp={config.tp} does not divide the world size {world}")
            # Each rollout TP group is an independent engine: vLLM lays the world out as
            # external-DP x DP x PP x TP, and with DP=1 the remaining ranks are external replicas
            # that need no collective between them. (vLLM's own DP would shard MoE experts across
            # the replicas and make every forward a lock-step all-gather between them.)
            kwargs["data_parallel_size"] = 1
        if on_gpu:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
            sleep = config.enable_sleep_mode if config.enable_sleep_mode is not None else True
            kwargs["enable_sleep_mode"] = sleep
        kwargs.update(engine_kwargs or {})
        self.dtype = kwargs["dtype"]
        self.llm = LLM(**kwargs)
        _quiet_expected_reload_warnings()
        self.sleep_enabled = bool(on_gpu and kwargs.get("enable_sleep_mode"))
        self._asleep: set = set()  # the parts ("weights", "kv_cache") released by sleep()
        self._weights_discarded = False  # sleep level 2 until update_weights refills them
        # vLLM's layout puts TP innermost: ranks [r*tp, (r+1)*tp) form replica r.
        world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) \
            if torch.distributed.is_initialized() else (1, 0)
        self.num_replicas = world // config.tp
        self.replica_rank = rank // config.tp

    # ---- generation ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 64,
        stop_token_ids: Optional[List[int]] = None,
        seed: Optional[int] = None,
        first_index: int = 0,
    ) -> RolloutBatch:
        """Samples ``n`` responses per prompt on this engine. Prompts that are empty or leave no room
        for a response within ``max_model_len`` are skipped and listed in ``RolloutBatch.skipped``.

        ``first_index`` numbers the prompts from there (in ``prompt_index``, ``skipped`` and the
        per-prompt seeds), for a share of a larger request: see ``generate_sharded``."""
        from vllm import SamplingParams, TokensPrompt

        if temperature < 0:
            raise ValueError(f"temperature={temperature!r}: must be >= 0")
        self.wake_up()
        keep, skipped = [], []
        for i, p in enumerate(prompts, start=first_index):
            (keep if 0 < len(p) < self.config.max_model_len else skipped).append(i)
        by_index = {i: prompts[i - first_index] for i in keep}
        requests = [TokensPrompt(prompt_token_ids=list(by_index[i])) for i in keep]
        params = []
        for i in keep:
            room = self.config.max_model_len - len(by_index[i])
            params.append(SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=min(max_tokens, room),
                logprobs=0, detokenize=False, stop_token_ids=stop_token_ids,
                # vLLM seeds the k-th of n samples with seed + k: space prompts n apart.
                seed=None if seed is None else seed + i * n,
            ))
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        batch = RolloutBatch(prompts=[], responses=[], logprobs=[], prompt_index=[], finished=[],
                             skipped=skipped)
        for i, out in zip(keep, outputs):
            for comp in out.outputs:
                ids = list(comp.token_ids)
                batch.prompts.append(list(by_index[i]))
                batch.responses.append(ids)
                batch.logprobs.append([lp[t].logprob for t, lp in zip(ids, comp.logprobs)])
                batch.prompt_index.append(i)
                batch.finished.append(comp.finish_reason == "stop")
        return batch

    def generate_sharded(self, prompts: Sequence[Sequence[int]], **kwargs) -> RolloutBatch:
        """``generate`` with the prompts split over the engine replicas (one per rollout TP group):
        each replica samples its contiguous share, then every rank receives the whole batch, in
        prompt order (collective over the world). Per-prompt seeds follow the prompt's position in
        the whole request, so the samples do not depend on how many replicas there are. With one
        replica this is ``generate``."""
        if self.num_replicas == 1:
            return self.generate(prompts, **kwargs)
        per = -(-len(prompts) // self.num_replicas)
        lo = min(self.replica_rank * per, len(prompts))
        hi = min(lo + per, len(prompts))
        mine = self.generate(prompts[lo:hi], first_index=lo, **kwargs)
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, mine)
        # All ranks of a replica hold the same share; take its first rank's.
        return RolloutBatch.concat(parts[::self.config.tp])

    # ---- weights ------------------------------------------------------------------------------
    def _runner(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner

    @staticmethod
    def _loaders_intact(model) -> bool:
        """True when every parameter still has its loader, i.e. post-load processing replaced none of
        them and ``load_weights`` can write straight into them."""
        return all(hasattr(p, "weight_loader") for p in model.parameters())

    def update_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> dict:
        """Loads ``(hf_name, tensor)`` pairs (e.g. the bridge's export stream, consumed bucket by bucket)
        into the engine in place, then drops every cached prefix computed with the old weights.

        vLLM's in-place reload is used: each layer's weights are gathered in checkpoint layout, its
        post-load processing (repacking for CPU GEMM kernels, expert layouts, FP32 head copies, ...)
        runs once, as at start-up, and the result is copied into the live tensors. A plain
        ``model.load_weights`` would write into parameters that processing has already replaced."""
        start = time.perf_counter()
        count = 0
        nbytes = 0

        def counted():
            nonlocal count, nbytes
            for name, t in weights:
                count += 1
                nbytes += t.numel() * t.element_size()
                yield name, t

        self.wake_up(tags=["weights"])  # the KV cache stays released until the next generate
        runner = self._runner()
        patched = 0
        if self._loaders_intact(runner.model) or not hasattr(runner, "reload_weights"):
            runner.model.load_weights(counted())
        else:
            with rerun_expert_processing(runner.model) as patched:
                runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        self._weights_discarded = False
        self.llm.reset_prefix_cache()
        return dict(tensors=count, bytes=nbytes, expert_layers_reprocessed=patched,
                    seconds=time.perf_counter() - start)

    def close(self) -> None:
        """Shuts the engine down at the end of a run. vLLM's teardown destroys torch.distributed's
        default group as well, so nothing collective may follow; without ``close`` vLLM's exit hook
        tries the same after the trainer's shutdown and fails on groups that are already gone."""
        if getattr(self, "llm", None) is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    # ---- GPU memory ---------------------------------------------------------------------------
    @property
    def sleeping(self) -> bool:
        return bool(self._asleep)

    def sleep(self) -> None:
        """Releases the engine's GPU memory (weights and KV cache) for the training phase.

        With ``sleep_level=2`` the weights are discarded: the next ``update_weights`` wakes them and
        rewrites every one, and the KV cache comes back with the next ``generate``, so the training
        phase and the refit never hold the KV cache. A no-op without sleep mode (CPU)."""
        if not self.sleep_enabled or self._asleep:
            return
        self.llm.sleep(level=self.config.sleep_level)
        self._asleep = {"weights", "kv_cache"}
        self._weights_discarded = self.config.sleep_level == 2

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Re-allocates the released parts (``tags`` a subset of ``("weights", "kv_cache")``; None:
        all). Waking for generation after a level-2 sleep without a refit in between is refused:
        the weights' memory would come back with undefined contents."""
        wanted = set(tags) if tags is not None else {"weights", "kv_cache"}
        unknown = wanted - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"wake_up tags={sorted(wanted)}: valid tags are 'weights', 'kv_cache'")
        parts = sorted(self._asleep & wanted)
        if "kv_cache" in parts and self._weights_discarded:
            raise RuntimeError(
                "the rollout engine slept with sleep_level=2, which discards its weights; call "
                "update_weights(...) before generating (or use RolloutConfig.sleep_level=1)"
            )
        if parts:
            self.llm.wake_up(tags=parts)
            self._asleep -= set(parts)


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


def _quiet_expected_reload_warnings() -> None:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(_RotaryReloadFilter())
