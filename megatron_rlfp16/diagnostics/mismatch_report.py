"""Measures the training-inference mismatch of a checkpoint in several precisions.

For each dtype, on every rank: the checkpoint goes into Megatron through the bridge (the trainer
path) and, through the same refit the trainer runs, into a colocated vLLM engine (the rollout path)
in that dtype; vLLM samples responses with
their log-probs, Megatron re-scores the same tokens (same temperature), and ``mismatch_metrics``
compares the two. Each dtype runs in fresh processes so that engines never share state.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch

def parse_dtypes(text: str) -> List[str]:
    """``--dtypes``: comma-separated precisions in any spelling ``Precision.parse`` reads, returned
    as vLLM's long names (the report's column titles), without duplicates."""
    from megatron_rlfp16.precision import Precision

    out = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        try:
            name = Precision.parse(raw, field="--dtypes").vllm_dtype
        except ValueError as err:
            valid = ", ".join(p.vllm_dtype for p in Precision)
            raise ValueError(f"--dtypes: {raw.strip()!r} is not a dtype; valid: {valid} ({err})") from None
        if name not in out:
            out.append(name)
    if not out:
        example = ",".join(p.vllm_dtype for p in Precision)
        raise ValueError(f"--dtypes is empty; give e.g. {example}")
    return out


def make_prompts(vocab_size: int, num_prompts: int, prompt_len: int, seed: int) -> List[List[int]]:
    """Random token-id prompts of varying length (the tool needs no tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (num_prompts,), generator=g)
    return [torch.randint(0, vocab_size, (int(n),), generator=g).tolist() for n in lengths]


def read_prompts(path: str, hf_dir: str, *, num_prompts: int, prompt_field: str = "prompt",
                 chat_template: bool = True, max_prompt_tokens: Optional[int] = None) -> Dict:
    """The first ``num_prompts`` rows of a JSONL file (``{prompt_field: text}`` or ``{"messages":
    [...]}`` per line), tokenized as the trainer would: the checkpoint's own tokenizer and chat
    template (``prompts.PromptBuilder``). Returns ``ids`` (token lists), ``stop_ids`` (the checkpoint's
    end-of-turn tokens), ``lines`` and ``skipped``: ``(line, tokens)`` of the prompts longer than
    ``max_prompt_tokens`` (what the engine can take besides the response), left out and not counted
    towards ``num_prompts``. Errors name the file and line."""
    from megatron_rlfp16.prompts import PromptBuilder, PromptConfig, load_tokenizer, stop_token_ids

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path!r} is not a file")
    tokenizer = load_tokenizer(hf_dir)
    builder = PromptBuilder(tokenizer, PromptConfig(chat_template=chat_template))
    ids, lines, skipped = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict) or (prompt_field not in row and "messages" not in row):
                raise ValueError(f"{where}: no field {prompt_field!r} or 'messages' (choose the field with "
                                 "--prompt-field)")
            prompt = row.get(prompt_field)
            if row.get("messages") is None and not (isinstance(prompt, str) and prompt.strip()):
                raise ValueError(f"{where}: field {prompt_field!r} must be a non-empty string")
            try:
                tokens = builder.encode(prompt or "", row.get("messages"))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            if max_prompt_tokens is not None and len(tokens) > max_prompt_tokens:
                skipped.append((lineno, len(tokens)))
                continue
            ids.append(tokens)
            lines.append(lineno)
            if len(ids) == num_prompts:
                break
    if not ids and skipped:
        raise ValueError(f"--prompts {path!r}: every prompt is longer than the engine takes ({max_prompt_tokens} "
                         f"tokens besides the response), e.g. line {skipped[0][0]} with {skipped[0][1]} tokens; "
                         "use shorter prompts or a smaller --max-tokens")
    if not ids:
        raise ValueError(f"--prompts {path!r}: no prompt in the file")
    return dict(ids=ids, lines=lines, skipped=skipped, stop_ids=stop_token_ids(hf_dir, tokenizer),
                chat_template=builder.uses_chat_template)


def measure_rank(hf_dir: str, dtype: str, *, tp: int = 1, num_prompts: int = 16, prompt_len: int = 16,
                 max_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
                 routing_replay: bool = False, prompt_ids: Optional[List[List[int]]] = None,
                 stop_ids: Optional[List[int]] = None) -> Dict:
    """One dtype, run on every rank of a world of ``tp`` ranks. Returns metrics and per-token data.

    For an MoE checkpoint the engine also returns its routes and the metrics include router
    agreement; with ``routing_replay`` the same samples are re-scored a second time replaying the
    engine's routes (R3), returned under ``"r3"``. The metrics also hold ``num_prompts`` and
    ``prompt_tokens_mean`` (what was sampled from). ``prompt_ids`` are the prompts to sample from
    (``read_prompts``; generation then stops at ``stop_ids``); without them, random token prompts
    (``make_prompts``)."""
    from megatron_rlfp16.bridge import export_hf
    from megatron_rlfp16.megatron import routing
    from megatron_rlfp16.megatron.recompute import compute_logprobs
    from megatron_rlfp16.plan import build_engine, build_model, resolve_plan
    from megatron_rlfp16.plan.build import init_runtime
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.rollout import RolloutConfig
    from megatron_rlfp16.runtime import ParallelConfig
    from megatron_rlfp16.trainer.config import TrainerConfig

    # The trainer's own plan: one PrecisionConfig drives both sides, FP32 islands included.
    plan = resolve_plan(TrainerConfig(
        hf_dir=hf_dir, parallel=ParallelConfig(tp=tp), precision=PrecisionConfig(trainer=dtype),
        rollout=RolloutConfig(tp=tp, seed=seed, max_model_len=(max(map(len, prompt_ids)) if prompt_ids else prompt_len)
                              + max_tokens + 1),
    ), hf_config=None)
    if routing_replay and not plan.arch.is_moe:
        raise ValueError(f"--routing-replay: {hf_dir} is a dense model ({plan.arch.family}), it has no "
                         "router to replay")
    init_runtime(plan, seed=seed)
    model = build_model(plan)
    model.eval()
    arch = plan.arch
    hub = routing.install(model) if plan.rollout.return_routes else None
    engine = build_engine(plan)
    # As the trainer does: the engine gets Megatron's weights through the refit, so its FP32 islands
    # (LM head, MoE gates) hold the trainer's values, not the checkpoint's unrounded ones.
    engine.update_weights(export_hf(model, arch, dtype=plan.export_dtype, bucket_bytes=plan.sync_bucket_bytes))
    prompts = prompt_ids or make_prompts(arch.vocab_size, num_prompts, prompt_len, seed)
    batch = engine.generate(prompts, temperature=temperature, max_tokens=max_tokens, seed=seed,
                            stop_token_ids=stop_ids or None)
    tokens, mask, rollout = batch.to_tensors(pad_to_multiple=plan.seq_multiple)
    micro = dict(input_ids=tokens)
    if hub is not None:
        micro[routing.ROUTES_KEY] = batch.routes_tensor(tokens.shape[1])

    def score(replay: bool) -> Dict:
        if hub is not None:
            hub.phase(replay=replay, compare=True)
        train = compute_logprobs(model, [micro], vocab_size=arch.vocab_size, temperature=temperature)
        agreement = hub.agreement() if hub is not None else {}
        if hub is not None:
            hub.finish()
        return _result(train, rollout, mask, agreement)

    sampled = dict(num_prompts=float(len(prompts)), prompt_tokens_mean=sum(map(len, prompts)) / len(prompts))
    result = score(replay=False)
    result["metrics"].update(sampled)
    if routing_replay:
        result["r3"] = score(replay=True)
        result["r3"]["metrics"].update(sampled)
    engine.close()  # last: vLLM's teardown also ends the process group
    return result


def _result(train, rollout, mask, agreement) -> Dict:
    from megatron_rlfp16.mismatch import mismatch_metrics

    metrics = {k: float(v) for k, v in mismatch_metrics(train, rollout, mask).items()}
    metrics.update(agreement)
    m = mask.bool()
    seq_ratio = ((train - rollout) * mask).sum(-1)
    return dict(metrics=metrics, train_prob=train[m].exp(), rollout_prob=rollout[m].exp(),
                seq_log_ratio=seq_ratio, tokens=int(m.sum()))


def write_report(results: Dict[str, Dict], out_dir: str, *, title: str = "") -> str:
    """Writes ``mismatch.json``, ``token_probs.png``, ``seq_log_ratio.png``; returns the table text."""
    os.makedirs(out_dir, exist_ok=True)
    summary = {dtype: r["metrics"] for dtype, r in results.items()}
    _atomic_json(summary, os.path.join(out_dir, "mismatch.json"))
    _plot(results, out_dir, title)
    return format_table(summary)


def format_table(summary: Dict[str, Dict[str, float]]) -> str:
    from megatron_rlfp16.precision import Precision

    keys = ["prob_diff_mean", "prob_diff_max", "logprob_diff_abs_mean", "kl_k3", "seq_log_ratio_abs_mean",
            "ratio_max", "pearson_prob"]
    keys += [k for k in ("router/agreement", "router/tokens_disagree") if any(k in m for m in summary.values())]
    dtypes = list(summary)
    width = max([14] + [len(d) + 2 for d in dtypes])
    lines = [f"{'metric':<26}" + "".join(f"{d:>{width}}" for d in dtypes)]
    for k in keys:
        lines.append(f"{k:<26}" + "".join(f"{summary[d].get(k, float('nan')):>{width}.3e}" for d in dtypes))
    fp16, bf16 = Precision.FP16.vllm_dtype, Precision.BF16.vllm_dtype
    if fp16 in summary and bf16 in summary and summary[fp16]["prob_diff_mean"] > 0:
        ratio = summary[bf16]["prob_diff_mean"] / summary[fp16]["prob_diff_mean"]
        lines.append(f"bf16/fp16 prob_diff_mean ratio: {ratio:.1f}x")
    return "\n".join(lines)


def _atomic_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _plot(results: Dict[str, Dict], out_dir: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    for ax, (dtype, r) in zip(axes[0], results.items()):
        ax.scatter(r["rollout_prob"].numpy(), r["train_prob"].numpy(), s=4, alpha=0.5)
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8)
        ax.set_title(f"{dtype}: mean |Δp| {r['metrics']['prob_diff_mean']:.2e}")
        ax.set_xlabel("rollout (vLLM) token probability")
        ax.set_ylabel("trainer (Megatron) token probability")
    fig.suptitle(title or "token probabilities: rollout vs trainer")
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "token_probs.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for dtype, r in results.items():
        v = r["seq_log_ratio"].numpy()
        ax.hist(v, bins=30, alpha=0.5, label=f"{dtype} (mean |.| {abs(v).mean():.2e})")
    ax.set_xlabel("per-sequence log ratio  Σ_t (log π_train − log μ_rollout)")
    ax.set_ylabel("sequences")
    ax.legend()
    fig.tight_layout()
    _save(fig, os.path.join(out_dir, "seq_log_ratio.png"))
    plt.close("all")


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
