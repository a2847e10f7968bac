"""The RL loop: prompts -> n samples each -> rewards -> advantages -> π_old -> updates -> weight sync.

Every rank runs the same loop (SPMD under torchrun). Trainer and rollout engine share the ranks:
Megatron trains with TP/PP/DP, vLLM rolls out with its own TP on the same processes, and after each
step the bridge's export generator streams the new weights into the engine in buckets. Each rollout
TP group samples its share of the step's prompts and all ranks then hold the whole batch; each
data-parallel rank trains on its slice.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_rlfp16.trainer.config import TrainerConfig
from megatron_rlfp16.trainer.metrics import MetricsLogger
from megatron_rlfp16.trainer.sources import PromptSource

RL_STATE = "rl_state.json"


class Trainer:
    def __init__(self, config: TrainerConfig, source: PromptSource, *, model=None, arch=None):
        """Builds (or takes) the Megatron model, the optimizer and the rollout engine.

        ``model``/``arch`` let a caller hand over an already trained model (the demo's supervised
        warm start); otherwise the model is loaded from ``config.hf_dir``.
        """
        from megatron_rlfp16.bridge import load_hf_checkpoint
        from megatron_rlfp16.megatron.train import wrap_ddp
        from megatron_rlfp16.models import build_model, read_config_json
        from megatron_rlfp16.precision import OptimizerStep
        from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine
        from megatron_rlfp16.runtime import ParallelConfig, init_runtime

        self.config = config.validate()
        self.source = source
        run, precision = config.run, config.precision
        init_runtime(ParallelConfig(tp=config.tp, pp=config.pp, ep=config.ep), seed=run.seed)
        self.hf_config = read_config_json(config.hf_dir)
        if model is None:
            model, arch = build_model(self.hf_config, params_dtype=precision.trainer.torch_dtype,
                                      config_overrides=precision.transformer_overrides())
            load_hf_checkpoint(model, arch, config.hf_dir)
            precision.prepare_model(model)
        self.arch = arch
        self.model = model if hasattr(model, "zero_grad_buffer") else wrap_ddp(
            model, **{k: v for k, v in precision.ddp_kwargs().items() if k == "grad_reduce_in_fp32"})
        self.optimizer = precision.build_optimizer(
            [self.model], lr=run.lr, weight_decay=run.weight_decay, use_distributed_optimizer=False)
        self.stepper = OptimizerStep(self.optimizer, precision, model=self.model)
        self.engine = RolloutEngine(
            config.hf_dir,
            RolloutConfig(dtype=precision.rollout_precision.vllm_dtype, tp=config.rollout_tp or config.tp,
                          seed=run.seed, max_model_len=self._max_model_len(),
                          gpu_memory_utilization=config.rollout_gpu_memory_utilization,
                          sleep_level=config.rollout_sleep_level),
            engine_kwargs=precision.vllm_kwargs(),
        )
        self.rank = dist.get_rank()
        self.step = 0
        self.ckpt_dir = os.path.join(config.out_dir, "checkpoint")
        if config.resume and os.path.isdir(self.ckpt_dir):
            self._load()
        self.sync_weights()  # the engine starts from the trainer's weights, whatever their origin
        self.logger = MetricsLogger(config.out_dir, total_steps=run.steps, resume_step=self.step,
                                    tensorboard=config.tensorboard, progress=config.progress,
                                    enabled=self.rank == 0)

    def _max_model_len(self) -> int:
        return min(self.arch.max_position_embeddings, 256 + self.config.run.max_new_tokens)

    # ---- one step ---------------------------------------------------------------------------
    def train_step(self) -> Dict[str, float]:
        from megatron_rlfp16.losses import compute_advantages
        from megatron_rlfp16.megatron.recompute import compute_logprobs
        from megatron_rlfp16.megatron.train import train_step
        from megatron_rlfp16.mismatch import mismatch_metrics

        run = self.config.run
        t0 = time.perf_counter()
        examples = self.source.prompts(self.step, run.prompts_per_step)
        prompts = [self.source.encode_prompt(e) for e in examples]
        batch = self.engine.generate_sharded(
            prompts, n=run.group_size, temperature=run.temperature, max_tokens=run.max_new_tokens,
            stop_token_ids=[self.source.eos_id], seed=run.seed * 7919 + self.step * 104729)
        # GPU: the engine's weights and KV cache make room for training; the sync wakes the weights
        # and the next rollout the KV cache (no-op on CPU).
        self.engine.sleep()
        t_rollout = time.perf_counter()
        kept = [i for i in range(len(examples)) if i not in set(batch.skipped)]
        rewards = torch.tensor([
            self.source.reward(examples[batch.prompt_index[j]], self.source.decode(batch.responses[j]))
            for j in range(len(batch))
        ], dtype=torch.float32)
        advantages = compute_advantages(rewards, run.group_size, estimator=run.advantage_estimator)
        t_reward = time.perf_counter()

        pad = self.config.tp if (self.arch.is_moe and self.config.tp > 1) else 1
        tokens, mask, rollout_lp = batch.to_tensors(pad_id=0, pad_to_multiple=pad)
        mine = self._dp_slice(len(batch))
        micro = self._micro_batches(tokens[mine], mask[mine], rollout_lp[mine], advantages[mine])
        old = compute_logprobs(self.model, [dict(input_ids=m["input_ids"]) for m in micro],
                               vocab_size=self.arch.vocab_size, temperature=run.temperature)
        mm = mismatch_metrics(old, rollout_lp[mine], mask[mine])
        if run.recompute_old_logprobs:
            for k, m in enumerate(micro):
                m["old_logprobs"] = old[k * run.micro_batch_size:(k + 1) * run.micro_batch_size]
        t_logprob = time.perf_counter()

        metrics: Dict[str, float] = {}
        groups = self._mini_batches(micro)
        for group in groups:
            out = train_step(self.model, group, self.config.loss, vocab_size=self.arch.vocab_size,
                             temperature=run.temperature)
            step_out = self.stepper.step()
            for k, v in {**out, **step_out}.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / len(groups)
        t_train = time.perf_counter()
        sync = self.sync_weights()
        t_end = time.perf_counter()

        self.step += 1
        metrics.update(
            reward=float(rewards.mean()) if len(rewards) else 0.0,
            reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0,
            response_length=float(mask.sum(-1).mean()),
            prompts_skipped=float(len(batch.skipped)),
            prompts_used=float(len(kept)),
            loss_scale=self.stepper.loss_scale,
            time_rollout=t_rollout - t0, time_reward=t_reward - t_rollout,
            time_logprobs=t_logprob - t_reward, time_train=t_train - t_logprob,
            time_weight_sync=sync["seconds"], time_step=t_end - t0,
        )
        metrics.update({f"mismatch/{k}": float(v) for k, v in mm.items()})
        return metrics

    def _dp_slice(self, n: int) -> slice:
        from megatron.core import parallel_state as ps

        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if n % dp:
            raise ValueError(f"{n} samples do not split over {dp} data-parallel ranks")
        per = n // dp
        return slice(rank * per, (rank + 1) * per)

    def _micro_batches(self, tokens, mask, rollout_lp, advantages) -> List[dict]:
        size = self.config.run.micro_batch_size
        out = []
        for lo in range(0, tokens.shape[0], size):
            out.append(dict(input_ids=tokens[lo:lo + size], loss_mask=mask[lo:lo + size],
                            rollout_logprobs=rollout_lp[lo:lo + size], advantages=advantages[lo:lo + size]))
        if len({m["input_ids"].shape[0] for m in out}) > 1:
            raise ValueError(f"micro_batch_size={size} must divide the {tokens.shape[0]} samples per rank")
        return out

    def _mini_batches(self, micro: List[dict]) -> List[List[dict]]:
        k = self.config.run.updates_per_step
        if len(micro) % k:
            raise ValueError(f"updates_per_step={k} must divide the {len(micro)} micro-batches per rank")
        per = len(micro) // k
        return [micro[i * per:(i + 1) * per] for i in range(k)]

    def sync_weights(self) -> Dict[str, float]:
        """Streams the trainer's weights into the rollout engine (collective)."""
        from megatron_rlfp16.bridge import export_hf

        dtype = self.config.precision.rollout_precision.torch_dtype
        stream = export_hf(self.model, self.arch, dtype=dtype,
                           bucket_bytes=self.config.run.sync_bucket_mb << 20)
        return self.engine.update_weights(stream)

    # ---- the run ----------------------------------------------------------------------------
    def fit(self, *, stop_after: Optional[int] = None) -> List[Dict[str, float]]:
        """Runs until ``config.run.steps`` (or ``stop_after`` more steps); returns this call's metrics."""
        run = self.config.run
        history = []
        target = run.steps if stop_after is None else min(run.steps, self.step + stop_after)
        while self.step < target:
            metrics = self.train_step()
            history.append(metrics)
            self.logger.log(self.step, metrics)
            if run.save_every and self.step % run.save_every == 0 and self.step < run.steps:
                self.save()
        if self.step >= run.steps:
            self.save()
        return history

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        from megatron_rlfp16.checkpoint import save_megatron_checkpoint

        state = dict(step=self.step, source=self.source.state_dict(),
                     python_rng=random.getstate(), torch_rng=torch.get_rng_state().tolist())
        save_megatron_checkpoint(self.model, self.ckpt_dir, hf_config=self.hf_config, overwrite=True,
                                 extra_state=self.stepper.checkpoint_state(self.model),
                                 extra_files={RL_STATE: json.dumps(state, default=_jsonable)})

    def _load(self) -> None:
        from megatron_rlfp16.checkpoint import load_megatron_checkpoint

        loaded = load_megatron_checkpoint(self.model, self.ckpt_dir,
                                          extra_state=self.stepper.checkpoint_state(self.model, is_loading=True))
        self.stepper.load_checkpoint_state(loaded)
        with open(os.path.join(self.ckpt_dir, RL_STATE), encoding="utf-8") as f:
            state = json.load(f)
        self.step = int(state["step"])
        self.source.load_state_dict(state["source"])
        random.setstate(_tuplify(state["python_rng"]))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))

    def close(self) -> None:
        self.logger.close()
        self.engine.close()


def _jsonable(x):
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"cannot serialize {type(x)}")


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
