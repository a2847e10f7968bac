"""The end-of-run summary and curves (``summary.json``, ``curves.png``) from ``metrics.jsonl``."""
from __future__ import annotations

import json
import os
from typing import Dict

from megatron_rlfp16.trainer.metrics import read_metrics

MISMATCH_KEYS = ("prob_diff_mean", "prob_diff_max", "logprob_diff_abs_mean", "kl_k1", "kl_k3",
                 "seq_log_ratio_abs_mean", "ratio_max", "pearson_prob")


def write_summary(out_dir: str, *, precision: str, seconds: float) -> Dict:
    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    if not rows:
        raise RuntimeError(f"{out_dir}/metrics.jsonl has no steps")
    sync = [r["time_weight_sync"] for r in rows]
    step_time = [r["time_step"] for r in rows]
    last = rows[-1]
    summary = dict(
        initial_reward=rows[0]["reward"],
        final_reward=_tail_mean(rows, "reward", 5),  # the last 5 steps: one step is noisy
        steps=len(rows),
        precision=precision,
        mismatch={k: last[f"mismatch/{k}"] for k in MISMATCH_KEYS if f"mismatch/{k}" in last},
        weight_sync_seconds_mean=sum(sync) / len(sync),
        weight_sync_share_of_step=sum(sync) / max(sum(step_time), 1e-12),
        step_seconds_mean=sum(step_time) / len(step_time),
        skipped_steps=last.get("skipped_steps", 0.0),
        wall_seconds=seconds,
    )
    tmp = os.path.join(out_dir, "summary.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "summary.json"))
    plot_curves(rows, os.path.join(out_dir, "curves.png"), title=f"GRPO ({precision})")
    return summary


def _tail_mean(rows, key, n):
    tail = [r[key] for r in rows[-n:]]
    return sum(tail) / len(tail)


def plot_curves(rows, path: str, *, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["reward"] for r in rows])
    axes[0].set_title("mean reward")
    axes[1].semilogy(steps, [max(r.get("mismatch/prob_diff_mean", 0.0), 1e-12) for r in rows])
    axes[1].set_title("mismatch: mean |p_train - p_rollout|")
    axes[2].semilogy(steps, [r.get("loss_scale", 1.0) for r in rows])
    axes[2].set_title("loss scale")
    for ax in axes:
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)
