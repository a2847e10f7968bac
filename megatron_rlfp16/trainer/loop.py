"""The RL loop: prompts -> n samples each -> rewards -> advantages -> π_old -> updates -> weight sync.

Every rank runs the same loop (SPMD under torchrun). Trainer and rollout engine share the ranks:
Megatron trains with TP/PP/DP, vLLM rolls out with its own TP on the same processes, and after each
step the bridge's export generator streams the new weights into the engine in buckets. Each rollout
TP group samples its share of the step's prompts and all ranks then hold the whole batch; each
data-parallel rank trains on its slice.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_rlfp16.precision.dtypes import ACCUM_DTYPE
from megatron_rlfp16.rollout.batch import apply_stop_strings
from megatron_rlfp16.runtime.faults import pause_point
from megatron_rlfp16.runtime.offload import KINDS
from megatron_rlfp16.runtime.stop import RunStopped, StopRequest
from megatron_rlfp16.trainer.config import TrainerConfig
from megatron_rlfp16.trainer.metrics import MetricsLogger
from megatron_rlfp16.trainer.sources import PromptSource

RL_STATE = "rl_state.json"
CRITIC_DIR = "critic"
"""Under a checkpoint: PPO's critic (model, optimizer, loss scale), written with the policy."""
MAX_PROMPT_DRAWS = 8
"""Draws from the source to fill a step's prompts when some do not fit the engine."""


class Trainer:
    def __init__(self, config: TrainerConfig, source: PromptSource, *, model=None, arch=None):
        """Resolves the run plan and builds the run's objects from it (``plan.build_run``).

        ``model`` lets a caller hand over an already built (or trained) Megatron model; otherwise it
        is loaded from ``config.hf_dir``. ``arch`` is accepted for compatibility and must match."""
        from megatron_rlfp16.plan import build_run, resolve_plan

        self.config = config
        self.plan = resolve_plan(config)
        if arch is not None and arch != self.plan.arch:
            raise ValueError(f"arch={arch} does not match {config.hf_dir}/config.json ({self.plan.arch})")
        self.source = source
        self.arch = self.plan.arch
        self.hf_config = dict(self.plan.hf_config)
        self._check_prompts()
        objects = build_run(self.plan, seed=config.run.seed, model=model)
        self.model, self.optimizer, self.stepper, self.engine = (
            objects.model, objects.optimizer, objects.stepper, objects.engine)
        # PPO (``rl.advantage_estimator="gae"``): the value model, its optimizer and loss scale.
        self.critic, self.critic_optimizer, self.critic_stepper = (
            objects.critic, objects.critic_optimizer, objects.critic_stepper)
        self.reference = objects.reference  # the KL penalty's frozen π_ref, or None
        self.rank = dist.get_rank()
        self.offloader = None
        if self.plan.offload:  # the trainer's state leaves the device while the engine samples
            from megatron_rlfp16.runtime.offload import TrainerOffload

            self.offloader = _Offloads([TrainerOffload(self.model, self.optimizer)] + (
                [TrainerOffload(self.critic, self.critic_optimizer)] if self.critic is not None else []),
                optimizer_apart=self.plan.offload_optimizer)
        self._refit_due = False  # a save with offload put the engine to sleep: refit before rollout
        self.step = 0
        self._step_metrics: Dict[str, float] = {}
        self._base_in_engine = False  # adapter-only sync: the base goes in with the first sync
        self.ckpt_dir = os.path.join(config.out_dir, "checkpoint")
        self._changes: Dict[str, str] = {}
        if config.resume:
            self._recover_checkpoint()
            if os.path.isdir(self.ckpt_dir):
                self._load()
                if self.rank == 0:
                    print(f"[rlfp16] resumed from {self.ckpt_dir} at step {self.step}", file=sys.stderr, flush=True)
        self.sync_weights()  # the engine starts from the trainer's weights, whatever their origin
        self.logger = MetricsLogger(config.out_dir, total_steps=config.run.steps, resume_step=self.step,
                                    tensorboard=config.tensorboard, progress=config.progress,
                                    enabled=self.rank == 0)

    # ---- one step: the data path, one stage call each ----------------------------------------
    def train_step(self) -> Dict[str, float]:
        timer = _PhaseTimer()
        self._step_metrics: Dict[str, float] = {}  # what the stages add to this step's metrics
        if self._refit_due:  # the engine slept through an offloaded save; the weights are still here
            self.sync_weights()
            self._refit_due = False
            timer.mark("weight_sync_after_save")
        offloaded = self.offloader.offload() if self.offloader else 0
        timer.mark("offload")
        examples, batch, left_out = self.rollout()
        rewards, advantages = self.score(examples, batch)
        if self.config.rl.dynamic_sampling:  # more rollouts until the batch holds informative groups
            examples, batch, rewards, advantages = self.resample(examples, batch, rewards, advantages)
        if self.config.rl.overlong_buffer:
            self._step_metrics["overlong_penalty_mean"] = float(self._penalty(batch).mean())
        # GPU: the engine's weights and KV cache make room for training; the sync wakes the weights
        # and the next rollout the KV cache (no-op on CPU).
        self.engine.sleep()
        timer.mark("rollout")
        pause_point("rollout-done")
        if self.offloader:
            self.offloader.reload()
            timer.mark("reload")
            # what stays on the host while training: the optimizer's part with offload_optimizer
            self._step_metrics["memory/training_host_gib"] = self.offloader.host_bytes() / 2**30
        self.log_samples(examples, batch, rewards)
        timer.mark("reward")
        micro, tensors = self.micro_batches(batch, advantages)
        mismatch = self.old_logprobs(micro, tensors)
        timer.mark("logprobs")
        if self.critic is not None:  # PPO: the critic's values, then GAE's token advantages
            self._step_metrics.update(self.critic_advantages(micro))
            timer.mark("values")
        metrics = self.update(micro)
        timer.mark("train")
        if self.offloader:  # the refit reads only the weights
            self.offloader.offload(("grads", "optimizer"))
            timer.mark("offload_before_sync")
        # Also after a critic warm-up step, which leaves the policy as it was: on a GPU the sleeping
        # engine may have dropped its weights, and the refit is what brings them back.
        moved = self.sync_weights()
        timer.mark("weight_sync")
        self.step += 1
        metrics.update(
            reward=float(rewards.mean()) if len(rewards) else 0.0,
            reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0,
            response_length=float(tensors["mask"].sum(-1).mean()),
            prompts_skipped=float(len(batch.skipped) + left_out),
            prompts_used=float(len(examples) - len(batch.skipped)),
            truncated_frac=float(sum(not f for f in batch.finished) / max(1, len(batch))),
            loss_scale=self.stepper.loss_scale,
            weight_sync_mib=moved["bytes"] / 2**20,
            **timer.metrics(),
            **self._step_metrics,
        )
        if self.offloader:
            metrics["memory/offloaded_gib"] = offloaded / 2**30
        metrics.update({k if k.startswith("router/") else f"mismatch/{k}": float(v) for k, v in mismatch.items()})
        return metrics

    # ---- the stages -------------------------------------------------------------------------
    def _check_prompts(self) -> None:
        """The source's whole dataset against the engine's prompt limit, before anything is built
        (sources without ``check_prompts`` are checked prompt by prompt in :meth:`step_prompts`)."""
        check = getattr(self.source, "check_prompts", None)
        if check is None:
            return
        usable = check(self.plan.rollout.max_model_len - 1)
        skipped = getattr(self.source, "skipped", [])
        if skipped and os.environ.get("RANK", "0") == "0":
            shown = "; ".join(f"{where}: {why}" for where, why in skipped[:5])
            print(f"[rlfp16] {usable} usable prompts, {len(skipped)} left out (--on-bad-prompt skip): {shown}"
                  + ("; ..." if len(skipped) > 5 else ""), file=sys.stderr, flush=True)

    def step_prompts(self, want: Optional[int] = None):
        """``(examples, token ids, left out)``: this step's prompts (``want``, default
        ``prompts_per_step``), each within the engine's limit (``0 < tokens < max_model_len``). A
        prompt that is not is left out and another drawn in its place, so the batch arithmetic holds
        whatever the data; a source that cannot fill the batch in a few draws is an error naming the
        prompts."""
        limit = self.plan.rollout.max_model_len
        want = self.config.run.prompts_per_step if want is None else want
        examples, prompts, bad = [], [], []
        for _ in range(MAX_PROMPT_DRAWS):
            if len(examples) == want:
                break
            for e in self.source.prompts(self.step, want - len(examples)):
                ids = self.source.encode_prompt(e)
                if 0 < len(ids) < limit:
                    examples.append(e)
                    prompts.append(ids)
                else:
                    bad.append((e.prompt[:60], len(ids)))
        if len(examples) < want:
            raise ValueError(f"step {self.step + 1}: only {len(examples)} of {want} prompts fit the engine "
                             f"(1 to {limit - 1} tokens) after {MAX_PROMPT_DRAWS} draws; left out, e.g. "
                             f"{bad[:3]} (text, tokens)")
        return examples, prompts, len(bad)

    def rollout(self, want: Optional[int] = None, round_: int = 0):
        """This step's prompts (``want`` of them, default ``prompts_per_step``), the engine's samples
        (every rank gets the whole batch) and the number of prompts left out for not fitting the
        engine. ``round_`` > 0 is a dynamic-sampling round: its own sampling seeds."""
        plan, run = self.plan, self.config.run
        examples, prompts, left_out = self.step_prompts(want)
        stop_ids = list(getattr(self.source, "stop_ids", None) or [self.source.eos_id])
        batch = self.engine.generate_sharded(
            prompts, n=plan.group_size, temperature=plan.temperature, max_tokens=run.max_new_tokens,
            stop_token_ids=stop_ids, seed=run.seed * 7919 + self.step * 104729 + round_ * 15485863)
        stops = getattr(self.source, "stop_strings", ())
        if stops:
            apply_stop_strings(batch, stops, self.source.decode)
        return examples, batch, left_out

    def resample(self, examples, batch, rewards, advantages):
        """DAPO's dynamic sampling: keeps the groups whose rewards differ, draws and samples prompts
        for the missing groups (at most ``dynamic_sampling_rounds`` more rollouts), and fills what is
        still missing with the dropped groups (their group-relative advantages are 0: no gradient),
        so that the batch keeps its size. The same on every rank: every rank holds the whole batch
        and the same rewards. Logs ``dynamic_sampling/filtered_frac`` (groups dropped of those drawn),
        ``dynamic_sampling/rounds`` and ``dynamic_sampling/filled`` (dropped groups used as filler)."""
        rl, group = self.config.rl, self.plan.group_size
        want = len(examples)
        pool = [(examples, batch, rewards, advantages)]
        kept, dropped = informative_groups(batch, rewards)
        rounds = 0
        while len(kept) < want and rounds < rl.dynamic_sampling_rounds:
            rounds += 1
            more = self.rollout(want - len(kept), round_=rounds)
            more_rewards, more_advantages = self.score(more[0], more[1])
            pool.append((more[0], more[1], more_rewards, more_advantages))
            k, d = informative_groups(more[1], more_rewards)
            kept += [(len(pool) - 1, g) for _, g in k]
            dropped += [(len(pool) - 1, g) for _, g in d]
        drawn = len(kept) + len(dropped)
        chosen = kept[:want] + dropped[:max(0, want - len(kept))]
        self._step_metrics.update({"dynamic_sampling/filtered_frac": len(dropped) / max(1, drawn),
                                   "dynamic_sampling/rounds": float(rounds),
                                   "dynamic_sampling/filled": float(max(0, want - len(kept)))})
        out_examples, parts, out_rewards, out_advantages = [], [], [], []
        for new_index, (part, prompt) in enumerate(sorted(chosen)):
            ex, b, r, a = pool[part]
            rows = [i for i, p in enumerate(b.prompt_index) if p == prompt]
            out_examples.append(ex[prompt])
            parts.append(b.take(rows, [new_index] * len(rows)))
            out_rewards.append(r[rows])
            out_advantages.append(a[rows])
        if any(len(p) != group for p in parts):
            raise RuntimeError("dynamic sampling: a group does not hold group_size samples")
        return (out_examples, type(batch).concat(parts), torch.cat(out_rewards), torch.cat(out_advantages))

    def score(self, examples, batch):
        """Rewards through the source's batched interface (plus DAPO's overlong punishment when
        ``RLConfig.overlong_buffer`` is set), then group advantages."""
        from megatron_rlfp16.losses import compute_advantages

        texts = [self.source.decode(r) for r in batch.responses]
        rewards = torch.tensor(self.source.score([examples[i] for i in batch.prompt_index], texts),
                               dtype=ACCUM_DTYPE)
        rl = self.config.rl
        shaped = rewards
        if rl.overlong_buffer:  # the task reward is what is reported; the advantages see the penalty
            shaped = rewards + self._penalty(batch).to(rewards.dtype)
        if rl.advantage_estimator == "gae":
            # PPO: the (shaped) outcome reward of each sample; ``critic_advantages`` turns it into
            # GAE's token advantages once the critic has valued the batch.
            return rewards, shaped
        advantages = compute_advantages(shaped, self.plan.group_size, estimator=rl.advantage_estimator)
        return rewards, advantages

    def _penalty(self, batch) -> torch.Tensor:
        """DAPO's overlong punishment of each sample (``losses.shaping``)."""
        from megatron_rlfp16.losses.shaping import overlong_penalty

        rl = self.config.rl
        return overlong_penalty(torch.tensor([len(r) for r in batch.responses]), max_len=self.config.run.max_new_tokens,
                                buffer=rl.overlong_buffer, factor=rl.overlong_penalty)

    def log_samples(self, examples, batch, rewards) -> None:
        """Every ``run.log_samples`` steps, the first ``run.samples_per_log`` samples, decoded, with
        their rewards (rank 0 writes ``samples.jsonl`` and TensorBoard text)."""
        every = self.config.run.log_samples
        step = self.step + 1
        if not every or step % every or self.rank != 0:
            return
        rows = []
        for j in range(min(self.config.run.samples_per_log, len(batch))):
            example = examples[batch.prompt_index[j]]
            rows.append(dict(prompt=self.source.decode(batch.prompts[j]), response=self.source.decode(batch.responses[j]),
                             reward=float(rewards[j]), response_length=len(batch.responses[j]),
                             truncated=not batch.finished[j], answer=example.answer,
                             response_ids=list(batch.responses[j])))
        self.logger.log_samples(step, rows)

    def micro_batches(self, batch, advantages):
        """This data-parallel rank's micro-batches, padded to the plan's sequence multiple."""
        from megatron_rlfp16.megatron.batch import split

        tokens, mask, rollout_lp = batch.to_tensors(pad_id=0, pad_to_multiple=self.plan.seq_multiple)
        mine = self._dp_slice(len(batch))
        loss_mask = mask
        if self.config.rl.mask_truncated:  # cut at max_new_tokens: out of the loss and its denominators
            truncated = torch.tensor([not f for f in batch.finished], dtype=torch.bool)
            loss_mask = mask.masked_fill(truncated[:, None], 0)
        tensors = dict(input_ids=tokens[mine], loss_mask=loss_mask[mine], rollout_logprobs=rollout_lp[mine],
                       advantages=advantages[mine])
        if batch.routes is not None:  # the engine's experts, for replay (R3) and router agreement
            tensors["routes"] = batch.routes_tensor(tokens.shape[1])[mine]
        return split(tensors, self.plan.micro_batch_size), dict(tensors, mask=mask, response_mask=mask[mine])

    def old_logprobs(self, micro, tensors) -> Dict[str, torch.Tensor]:
        """π_old by the trainer (unless bypassed), written into the micro-batches; returns the
        trainer-vs-rollout mismatch metrics of this rank's samples."""
        from megatron_rlfp16.megatron import routing
        from megatron_rlfp16.megatron.recompute import compute_logprobs
        from megatron_rlfp16.mismatch import mismatch_metrics

        hub, mode = routing.replay_of(self.model), self.plan.routing_replay
        with_routes = "routes" in tensors
        if hub is not None:  # R3 replays the engine's routes; R2 records the trainer's own
            hub.phase(replay=mode == "r3", record=mode == "r2", compare=with_routes)
        keys = ("input_ids", routing.ROUTES_KEY) if with_routes else ("input_ids",)
        old = compute_logprobs(self.model, [{k: m[k] for k in keys} for m in micro],
                               vocab_size=self.arch.vocab_size, temperature=self.plan.temperature)
        metrics = mismatch_metrics(old, tensors["rollout_logprobs"], tensors["response_mask"])
        if hub is not None:
            if with_routes:
                metrics.update(hub.agreement())
            if mode == "r2":
                for m, own in zip(micro, hub.recorded()):
                    m[routing.OWN_ROUTES_KEY] = own
            hub.finish()
        size = self.plan.micro_batch_size
        if self.config.run.recompute_old_logprobs:
            for k, m in enumerate(micro):
                m["old_logprobs"] = old[k * size:(k + 1) * size]
        if self.reference is not None:  # π_ref for the KL penalty (in the loss or in the rewards)
            ref = compute_logprobs(self.reference, [{"input_ids": m["input_ids"]} for m in micro],
                                   vocab_size=self.arch.vocab_size, temperature=self.plan.temperature)
            for k, m in enumerate(micro):
                m["ref_logprobs"] = ref[k * size:(k + 1) * size]
        return metrics

    def critic_advantages(self, micro) -> Dict[str, float]:
        """PPO: the critic values this rank's micro-batches (V_old), GAE turns the outcome rewards
        (in ``advantages``, one per sample) into token advantages and returns, and the advantages
        are whitened over the whole batch (all data-parallel ranks). Writes ``advantages``,
        ``old_values`` and ``returns`` into the micro-batches; returns the step's critic metrics."""
        from megatron.core import parallel_state as ps

        from megatron_rlfp16.losses.value import gae, kl_penalized, moments, token_rewards, whiten
        from megatron_rlfp16.megatron.critic import compute_values

        critic, beta = self.plan.critic, self.config.rl.kl_in_reward
        values = compute_values(self.critic, [{"input_ids": m["input_ids"]} for m in micro])
        size = self.plan.micro_batch_size
        sums = torch.zeros(4, dtype=torch.float64)
        raw = []
        for k, m in enumerate(micro):
            mask = m["loss_mask"] != 0
            v = values[k * size:(k + 1) * size].cpu()
            rewards = token_rewards(m["advantages"], mask)
            if beta:  # the KL of the sampling policy (π_old; μ in bypass mode) to π_ref, per token
                rewards = kl_penalized(rewards, m.get("old_logprobs", m["rollout_logprobs"]).cpu(),
                                       m["ref_logprobs"].cpu(), mask, beta)
            adv, ret = gae(rewards, v, mask, critic.gamma, critic.lam)
            m["old_values"], m["returns"] = v, ret
            raw.append(adv)
            sums[:3] += moments(adv, mask)
            sums[3] += (torch.where(mask, v.double(), 0.0)).sum()
        group = ps.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            from megatron_rlfp16.runtime import device

            moved = sums.to(device())
            dist.all_reduce(moved, group=group)
            sums = moved.cpu()
        for m, adv in zip(micro, raw):
            m["advantages"] = whiten(adv, m["loss_mask"], sums=sums[:3])
        tokens = max(float(sums[2]), 1.0)
        return {"critic/values_mean": float(sums[3]) / tokens, "critic/advantages_mean": float(sums[0]) / tokens}

    def update(self, micro) -> Dict[str, float]:
        """The policy updates: one optimizer step per mini-batch; metrics averaged over them. With a
        critic (PPO) the critic takes one step per mini-batch too, and during its warm-up only it."""
        from megatron_rlfp16.megatron.train import train_step

        per = self.plan.micro_batches_per_update
        groups = [micro[i:i + per] for i in range(0, len(micro), per)]
        metrics: Dict[str, float] = {}
        from megatron_rlfp16.megatron import routing

        hub = routing.replay_of(self.model) if self.plan.routing_replay != "none" else None
        policy = self.critic is None or self.step >= self.plan.critic.warmup_steps
        for group in groups:
            out: Dict[str, float] = {}
            if policy:
                if hub is not None:
                    hub.phase(replay=True)
                try:
                    out = train_step(self.model, group, self.config.rl.loss, vocab_size=self.arch.vocab_size,
                                     temperature=self.plan.temperature)
                finally:
                    if hub is not None:
                        hub.finish()
                with self._optimizer_state(0):
                    out.update(self.stepper.step())
            if self.critic is not None:
                out.update(self._critic_update(group))
            for k, v in out.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / len(groups)
        if not policy:
            metrics["critic/warmup"] = 1.0
        return metrics

    def _critic_update(self, group) -> Dict[str, float]:
        from megatron_rlfp16.megatron.critic import critic_train_step

        out = critic_train_step(self.critic, group, clip=self.plan.critic.value_clip)
        with self._optimizer_state(1):
            step = self.critic_stepper.step()
        return {f"critic/{k}": v for k, v in {**out, **step}.items()}

    def _optimizer_state(self, part: int):
        """Around an optimizer step: with ``offload_optimizer`` the master weights and moments of the
        policy (``part`` 0) or the critic (1) are on the device only inside this block."""
        if self.offloader is None:
            return contextlib.nullcontext()
        return self.offloader.optimizer_on_device(part)

    def _dp_slice(self, n: int) -> slice:
        from megatron.core import parallel_state as ps

        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if n % dp:
            raise ValueError(f"{n} samples do not split over {dp} data-parallel ranks")
        per = n // dp
        return slice(rank * per, (rank + 1) * per)

    def sync_weights(self) -> Dict[str, float]:
        """Brings the trainer's weights into the rollout engine (collective); returns what moved.

        Full fine-tuning streams every weight (the bridge's export, bucket by bucket). A LoRA run
        with ``sync="merged"`` streams ``W + scale · B · A`` the same way; with ``sync="adapter"``
        only the adapters move (``_sync_adapter``), after one full refit of the frozen base."""
        from megatron_rlfp16.bridge import export_hf

        lora = self.plan.lora
        if lora.enabled and lora.sync == "adapter" and self._base_in_engine:
            return self._sync_adapter()
        stream = export_hf(self.model, self.arch, dtype=self.plan.export_dtype,
                           bucket_bytes=self.plan.sync_bucket_bytes, scope="replica",
                           merge_lora=lora.enabled and lora.sync == "merged")
        moved = self.engine.update_weights(stream)
        if lora.enabled and lora.sync == "adapter":
            self._base_in_engine = True  # the frozen base, once; the adapters follow
            adapter = self._sync_adapter()
            moved = dict(adapter, bytes=moved["bytes"] + adapter["bytes"],
                         seconds=moved["seconds"] + adapter["seconds"])
        return moved

    def _sync_adapter(self) -> Dict[str, float]:
        """Adapter-only sync: the adapters, gathered whole on every rank (collective), in the export
        dtype, handed to this rank's engine in memory (``set_adapter_tensors``: a new adapter version,
        built by vLLM from the tensors as from a PEFT directory). Nothing of the base model moves and
        nothing is written; ``bytes`` counts the adapter tensors."""
        from megatron_rlfp16.lora import sync_adapters

        start = time.perf_counter()
        moved = sync_adapters(self.model, self.arch, self.engine, self.plan.lora, self.plan.export_dtype)
        return dict(moved, seconds=time.perf_counter() - start)

    # ---- the run ----------------------------------------------------------------------------
    def fit(self, *, stop_after: Optional[int] = None) -> List[Dict[str, float]]:
        """Runs until ``config.run.steps`` (or ``stop_after`` more steps); returns this call's metrics.

        Checkpoints every ``run.checkpoint_interval`` steps and at the end. On SIGTERM/SIGINT (to
        any rank) before the last step every rank finishes the current step, saves it and raises
        :class:`~megatron_rlfp16.runtime.stop.RunStopped` (see ``runtime/stop.py``)."""
        run = self.config.run
        history = []
        target = run.steps if stop_after is None else min(run.steps, self.step + stop_after)
        with StopRequest() as stop:
            while self.step < target:
                metrics = self.train_step()
                if self._changes:  # the boundary of a deliberate ablation, in the record
                    metrics["resumed_with_changed_settings"] = "; ".join(
                        f"{k}: {v}" for k, v in self._changes.items())
                    self._changes = {}
                history.append(metrics)
                self.logger.log(self.step, metrics)
                every = run.checkpoint_interval
                saved = bool(every) and self.step % every == 0 and self.step < run.steps
                if saved:
                    self.save()
                signum = stop.agreed() if self.step < target else 0
                if signum:
                    if not saved:
                        self.save()
                    raise RunStopped(signum, self.step)
            if self.step >= run.steps:
                self.save()  # a signal now only waits for this save: the run is complete
        if self._refit_due:  # leave the engine serving the trainer's weights
            self.sync_weights()
            self._refit_due = False
        if self.offloader:  # and the trainer's state on the device, as after construction
            self.offloader.reload(KINDS)
        return history

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        """Saves the run's checkpoint (collective). With offload the engine sleeps first, so the
        device holds the weights, master weights and optimizer state and nothing else; the next
        step refits the engine before it samples."""
        if self.offloader is None or not self.offloader.offloaded:
            return self._save()
        self.engine.sleep()
        self._refit_due = True
        self.offloader.reload(("optimizer",))
        try:
            self._save()
        finally:
            self.offloader.offload(("optimizer",))

    def _save(self) -> None:
        from megatron_rlfp16.checkpoint import save_megatron_checkpoint

        state = dict(step=self.step, source=self.source.state_dict(), settings=resume_settings(self.plan),
                     plan=self.plan.describe(), python_rng=random.getstate(),
                     torch_rng=torch.get_rng_state().tolist())
        keep = self.config.run.keep_checkpoints
        previous = self._previous_checkpoint_name() if keep > 1 and self.rank == 0 else None
        extra_models = None
        if self.critic is not None:  # saved in the same atomic write, under checkpoint/critic
            extra_models = {CRITIC_DIR: (self.critic, self.critic_stepper.checkpoint_state(self.critic))}
        save_megatron_checkpoint(self.model, self.ckpt_dir, hf_config=self.hf_config, overwrite=True,
                                 extra_state=self.stepper.checkpoint_state(self.model),
                                 extra_files={RL_STATE: json.dumps(state, default=_jsonable)},
                                 keep_previous_as=previous, lora_base=self.config.hf_dir,
                                 extra_models=extra_models)
        if self.rank == 0:
            for stale in kept_checkpoints(self.ckpt_dir)[:-(keep - 1) or None]:
                shutil.rmtree(stale, ignore_errors=True)
        pause_point("checkpoint-saved")

    def _previous_checkpoint_name(self) -> Optional[str]:
        """Where the checkpoint about to be replaced is kept: ``checkpoint.step-<N>``."""
        try:
            with open(os.path.join(self.ckpt_dir, RL_STATE), encoding="utf-8") as f:
                step = int(json.load(f)["step"])
        except (OSError, ValueError, KeyError):
            return None  # nothing complete to keep
        return f"{self.ckpt_dir}.step-{step:08d}"

    def _load(self) -> None:
        from megatron_rlfp16.checkpoint import load_megatron_checkpoint

        from megatron_rlfp16.checkpoint.hf_io import read_json

        state = read_json(os.path.join(self.ckpt_dir, RL_STATE))
        self._check_lora_resume()
        changes = changed_settings(state.get("settings", {}), resume_settings(self.plan))
        if changes and not self.config.allow_changed_settings:
            listed = "; ".join(f"{k}: checkpoint {old!r}, this run {new!r}" for k, (old, new) in changes.items())
            raise ValueError(
                f"{self.ckpt_dir} was saved with other settings ({listed}); resuming would mix two runs "
                "in one record. Use the checkpoint's settings, another --out, or, for a deliberate "
                "ablation, allow_changed_settings=True (--allow-changed-settings)"
            )
        self._changes = {k: f"{old} -> {new}" for k, (old, new) in changes.items()}
        if "precision.trainer" in changes:
            # Megatron's optimizers keep different state per precision (FP32 master copies only
            # under FP16/BF16): the weights carry over, the optimizer and loss scale start afresh.
            load_megatron_checkpoint(self.model, self.ckpt_dir)
            self._changes["optimizer"] = "state reset (the trainer precision changed)"
        else:
            loaded = load_megatron_checkpoint(self.model, self.ckpt_dir,
                                              extra_state=self.stepper.checkpoint_state(self.model, is_loading=True))
            self.stepper.load_checkpoint_state(loaded)
        if self.critic is not None:
            critic_dir = os.path.join(self.ckpt_dir, CRITIC_DIR)
            if not os.path.isdir(critic_dir):  # only with allow_changed_settings (the settings differ)
                self._changes["critic"] = "new (the checkpoint has none)"
            elif "precision.trainer" in changes:
                load_megatron_checkpoint(self.critic, critic_dir)
            else:
                loaded = load_megatron_checkpoint(
                    self.critic, critic_dir, extra_state=self.critic_stepper.checkpoint_state(self.critic, is_loading=True))
                self.critic_stepper.load_checkpoint_state(loaded)
        self.step = int(state["step"])
        self.source.load_state_dict(state["source"])
        random.setstate(_tuplify(state["python_rng"]))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))

    def _check_lora_resume(self) -> None:
        """LoRA on one side only, other adapters or another base model cannot be resumed, whatever
        ``allow_changed_settings`` says: the checkpoint's tensors would not fit or not mean the same."""
        from megatron_rlfp16.checkpoint.megatron_ckpt import base_fingerprint, check_lora_matches, read_meta

        meta = read_meta(self.ckpt_dir)
        check_lora_matches(meta, self.model, self.ckpt_dir)
        saved = meta.get("lora")
        if saved and saved.get("base_fingerprint") not in (None, base_fingerprint(self.config.hf_dir)):
            raise ValueError(f"{self.ckpt_dir} holds LoRA adapters trained on the base {saved.get('base_hf_dir')!r}, "
                             f"whose weight files differ from {self.config.hf_dir!r} ({saved['base_fingerprint']} "
                             f"vs {base_fingerprint(self.config.hf_dir)}); resume with the same base model")

    def _recover_checkpoint(self) -> None:
        """Rank 0 puts the last complete checkpoint back in place after a save was killed (and
        removes the temporary directories of killed writes); every rank then sees the same."""
        from megatron_rlfp16.checkpoint import recover_checkpoint

        if self.rank == 0:
            recover_checkpoint(self.ckpt_dir)
        dist.barrier()

    def close(self) -> None:
        self.logger.close()
        self.engine.close()


def informative_groups(batch, rewards: torch.Tensor):
    """``(kept, dropped)``: ``(0, prompt index)`` of each group (the samples of one prompt, in order of
    appearance) whose rewards differ, and of each whose rewards are all equal."""
    kept, dropped = [], []
    order = list(dict.fromkeys(batch.prompt_index))
    for prompt in order:
        values = rewards[[i for i, p in enumerate(batch.prompt_index) if p == prompt]]
        (kept if bool((values != values[0]).any()) else dropped).append((0, prompt))
    return kept, dropped


def kept_checkpoints(ckpt_dir: str) -> List[str]:
    """The older checkpoints kept beside ``ckpt_dir`` (``--keep-checkpoints``), oldest first."""
    parent, base = os.path.split(os.path.abspath(ckpt_dir))
    prefix = base + ".step-"
    names = [n for n in os.listdir(parent) if n.startswith(prefix) and n[len(prefix):].isdigit()]
    return [os.path.join(parent, n) for n in sorted(names)]


def resume_settings(plan) -> Dict[str, object]:
    """What a checkpoint cannot change on resume: precision on both sides, the model, the loss
    family and the model-parallel layout (the optimizer state reshards over data parallelism only)."""
    a, p, loss = plan.arch, plan.parallel, plan.rl_loss
    return {
        "precision.trainer": plan.precision.trainer.value,
        "precision.rollout": plan.precision.rollout_precision.value,
        "model": f"{a.family} L{a.num_layers} H{a.hidden_size} V{a.vocab_size} E{a.num_experts or 0}",
        "loss": loss.loss,
        "layout": f"tp={p.tp} pp={p.pp} ep={p.ep}" + (f" etp={p.etp}" if p.etp != p.tp else ""),
        "routing_replay": plan.routing_replay,
        "critic": f"from {plan.critic.hf_dir}" if plan.critic else "none",
        "lora": (f"rank={plan.lora.rank} alpha={plan.lora.resolved_alpha:g} "
                 f"targets={','.join(plan.lora.target_modules)}") if plan.lora.enabled else "off",
    }


def changed_settings(saved: Dict[str, object], current: Dict[str, object]) -> Dict[str, tuple]:
    """``{setting: (saved, current)}`` for every setting a checkpoint recorded that differs now (a
    checkpoint from before settings were recorded has none to compare)."""
    return {k: (saved[k], current.get(k)) for k in saved if saved[k] != current.get(k)}


class _Offloads:
    """Several ``TrainerOffload``s (the policy's, the critic's) as one. With ``optimizer_apart``
    the optimizer's part of the state (master weights, moments) comes back only for the optimizer
    steps (:meth:`optimizer_on_device`)."""

    def __init__(self, parts, *, optimizer_apart: bool = False):
        self.parts = parts
        self.optimizer_apart = optimizer_apart

    @property
    def offloaded(self) -> bool:
        return any(part.offloaded for part in self.parts)

    def offload(self, kinds=KINDS) -> int:
        """Moves ``kinds`` (those still on the device) to the host; returns the bytes now held there."""
        for part in self.parts:
            part.offload(kinds)
        return self.host_bytes()

    def host_bytes(self) -> int:
        return sum(part.host_bytes() for part in self.parts)

    def reload(self, kinds=None) -> None:
        """Brings ``kinds`` back (default: what training needs: all of it, or all but the
        optimizer's part when it stays apart)."""
        if kinds is None:
            kinds = tuple(k for k in KINDS if not (self.optimizer_apart and k == "optimizer"))
        for part in self.parts:
            part.reload(kinds)

    @contextlib.contextmanager
    def optimizer_on_device(self, index: int):
        if not self.optimizer_apart:
            yield
            return
        part = self.parts[index]
        part.reload(("optimizer",))
        try:
            yield
        finally:
            part.offload(("optimizer",))


class _PhaseTimer:
    """Wall time of the step's phases, as ``time_<phase>`` metrics plus ``time_step``."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.phases: Dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[f"time_{phase}"] = now - self.last
        self.last = now

    def metrics(self) -> Dict[str, float]:
        return dict(self.phases, time_step=self.last - self.start)


def _jsonable(x):
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"cannot serialize {type(x)}")


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
