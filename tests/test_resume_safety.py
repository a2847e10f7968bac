"""Nothing lost, nothing corrupted: checkpoints swapped in with renames (a complete one exists at
every instant), a killed save recovered on the next start, settings a checkpoint cannot change
refused on resume, and parallel sizes checked before any rank starts."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from megatron_rlfp16.testing.distributed import RankFailure, run_on_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _complete(path, tag):
    os.makedirs(path)
    pathlib.Path(path, "rlfp16.json").write_text(json.dumps({"tag": tag}))


def _tag(path):
    return json.loads(pathlib.Path(path, "rlfp16.json").read_text())["tag"]


def test_a_save_killed_between_its_renames_leaves_a_checkpoint_that_is_put_back(tmp_path):
    from megatron_rlfp16.checkpoint import recover_checkpoint
    from megatron_rlfp16.checkpoint.megatron_ckpt import _swap_in

    target = str(tmp_path / "checkpoint")
    _complete(target, "step-2")
    _complete(target + ".tmp-111", "step-4")
    # Killed after moving the old checkpoint aside, before the new one was renamed in.
    os.rename(target, target + ".old-111")
    assert not os.path.exists(target)
    done = recover_checkpoint(target)
    assert _tag(target) == "step-2" and sorted(map(os.path.basename, done)) == ["checkpoint.old-111",
                                                                              "checkpoint.tmp-111"]
    # A complete swap: the new checkpoint in place, nothing of the old one or the temp left.
    _complete(target + ".tmp-222", "step-4")
    _swap_in(target + ".tmp-222", target)
    assert _tag(target) == "step-4" and sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_recovery_touches_only_its_own_names(tmp_path):
    from megatron_rlfp16.checkpoint import recover_checkpoint

    target = str(tmp_path / "checkpoint")
    _complete(target, "now")
    _complete(target + ".old-5", "older")      # left by a swap killed after the rename: removed
    for other in ("checkpoint.tmp-notes", "checkpoint-backup", "checkpoint.old"):
        os.makedirs(tmp_path / other)
    recover_checkpoint(target)
    assert _tag(target) == "now"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "checkpoint-backup", "checkpoint.old",
                                            "checkpoint.tmp-notes"]


def test_settings_a_checkpoint_cannot_change_are_compared():
    from megatron_rlfp16.trainer.loop import changed_settings

    saved = {"precision.trainer": "fp16", "layout": "tp=2 pp=1 ep=1", "loss": "ppo_clip"}
    now = {"precision.trainer": "bf16", "layout": "tp=2 pp=1 ep=1", "loss": "ppo_clip"}
    assert changed_settings(saved, now) == {"precision.trainer": ("fp16", "bf16")}
    assert changed_settings({}, now) == {}  # a checkpoint from before settings were recorded


def test_the_checkpoint_interval_defaults_to_a_tenth_of_the_run():
    from megatron_rlfp16.trainer import RunConfig

    assert RunConfig(steps=100).checkpoint_interval == 10
    assert RunConfig(steps=4).checkpoint_interval == 1
    assert RunConfig(steps=100, save_every=0).checkpoint_interval == 0
    with pytest.raises(ValueError, match=r"RunConfig.save_every=-1: must be None or an integer >= 0"):
        RunConfig(save_every=-1).validate()


@pytest.mark.parametrize("argv,message", [
    (["import", "--hf-dir", "H", "--megatron-dir", "M", "--tp", "0"], "argument --tp: 0 is invalid; valid: an integer >= 1"),
    (["export", "--hf-dir", "H", "--megatron-dir", "M", "--ep", "-1"], "argument --ep: -1 is invalid"),
    (["import", "--hf-dir", "H", "--megatron-dir", "M", "--pp", "x"], "argument --pp: 'x' is not an integer"),
])
def test_parallel_sizes_below_one_are_refused_when_parsed(argv, message):
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_conversion_may_not_replace_its_own_source(tmp_path):
    from megatron_rlfp16.testing.tiny import make_tiny_model

    hf = make_tiny_model("llama", str(tmp_path / "hf"))
    before = sorted(os.listdir(hf))
    proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "import", "--hf-dir", hf,
                           "--megatron-dir", hf + "/", "--overwrite"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "are the same directory" in proc.stderr, proc.stderr
    assert sorted(os.listdir(hf)) == before


def _resume_job(out_dir, precision, allow, stop_after):
    from megatron_rlfp16.megatron.args import RLConfig
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime
    from megatron_rlfp16.trainer import RunConfig, TaskSource, Trainer, TrainerConfig
    from megatron_rlfp16.trainer.embedded import embedded_setup

    init_runtime(ParallelConfig())
    task, tokenizer, hf_dir = embedded_setup(out_dir)
    config = TrainerConfig(
        hf_dir=hf_dir, out_dir=out_dir, tensorboard=False, progress=False, allow_changed_settings=allow,
        precision=PrecisionConfig(trainer=precision), rl=RLConfig(group_size=4),
        run=RunConfig(steps=2, prompts_per_step=4, max_new_tokens=4, micro_batch_size=16, save_every=1),
    )
    trainer = Trainer(config, TaskSource(task, tokenizer))
    start = trainer.step
    trainer.fit(stop_after=stop_after)
    trainer.close()
    return start


@pytest.mark.vllm
def test_a_resume_with_another_precision_is_refused_unless_allowed(tmp_path):
    out = str(tmp_path / "run")
    assert run_on_ranks(_resume_job, 1, out, "fp32", False, 1, timeout=600) == [0]
    with pytest.raises(RankFailure, match=r"precision.trainer: checkpoint 'fp32', this run 'bf16'.*"
                                          r"--allow-changed-settings"):
        run_on_ranks(_resume_job, 1, out, "bf16", False, 1, timeout=600)
    assert run_on_ranks(_resume_job, 1, out, "bf16", True, 1, timeout=600) == [1]  # resumed at step 1
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    assert "resumed_with_changed_settings" not in rows[0]
    assert rows[1]["resumed_with_changed_settings"] == (
        "precision.trainer: fp32 -> bf16; precision.rollout: fp32 -> bf16; "
        "optimizer: state reset (the trainer precision changed)")


def _is_rank(process) -> bool:
    """Not multiprocessing's resource tracker, and still alive."""
    import psutil

    try:
        command = " ".join(process.cmdline())
    except psutil.Error:  # ended (or a zombie) since it was listed
        return False
    return "resource_tracker" not in command


@pytest.mark.ranks
def test_sigterm_to_a_tool_ends_every_rank_and_leaves_nothing(tmp_path):
    """The tool as users run it: ranks started with ``spawn`` (the launcher forwards signals by
    process id either way). Each rank is stopped (SIGSTOP) as soon as it appears, so the conversion
    cannot finish before the signal however fast the machine; continued after it, a rank finds the
    forwarded SIGTERM pending."""
    import signal
    import time

    import psutil

    from megatron_rlfp16.testing.tiny import make_tiny_model

    hf = make_tiny_model("llama", str(tmp_path / "hf"))
    out = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, "tools/convert_checkpoint.py", "import", "--hf-dir", hf,
                             "--megatron-dir", str(out), "--tp", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, RLFP16_RANK_START="spawn"))
    deadline = time.monotonic() + 120
    ranks = []
    while len(ranks) < 2:  # both ranks started (spawned children running this package)
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        for p in psutil.Process(proc.pid).children():
            if p not in ranks and _is_rank(p):
                p.suspend()
                ranks.append(p)
        time.sleep(0.01)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)  # the launcher forwards the signal to the stopped ranks
    for p in ranks:
        p.resume()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM: every rank was ended" in err
    gone, alive = psutil.wait_procs(ranks, timeout=5)
    assert not alive
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # nothing written, no temporary directory left
