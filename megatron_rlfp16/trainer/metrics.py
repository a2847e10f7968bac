"""Per-step metrics: JSONL (the record), TensorBoard (the curves), a progress bar (the console).

Only rank 0 writes. A resumed run first cuts the JSONL back to the checkpoint's step, so the file
never holds steps from a run that was killed after its last checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List


class MetricsLogger:
    def __init__(self, out_dir: str, *, total_steps: int, resume_step: int = 0, tensorboard: bool = True,
                 progress: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.samples_path = os.path.join(out_dir, "samples.jsonl")
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._truncate(resume_step, self.path)
        self._truncate(resume_step, self.samples_path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is optional: JSONL is the record
                self._tb = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step, desc="rl", dynamic_ncols=True)

    @staticmethod
    def _truncate(keep_through: int, path: str) -> None:
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            lines = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= keep_through]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._bar is not None:
            shown = {k: record[k] for k in ("reward", "mismatch/prob_diff_mean", "router/agreement", "loss_scale") if k in record}
            self._bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self._bar.update(1)

    def log_samples(self, step: int, rows: List[Dict]) -> None:
        """Appends ``rows`` (prompt, response, reward, ...) to ``samples.jsonl`` and shows them in
        TensorBoard as a text table."""
        if not self.enabled or not rows:
            return
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")
        if self._tb is not None:
            lines = ["| reward | length | prompt | response |", "| --- | --- | --- | --- |"]
            for row in rows:
                cells = [f"{row['reward']:.3g}", str(row["response_length"]), row["prompt"], row["response"]]
                lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
            self._tb.add_text("samples", "\n".join(lines), step)
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v != v:
        return None  # NaN is not JSON
    return v


def read_metrics(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]
