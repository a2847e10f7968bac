"""``tools/compare_runs.py`` on hand-written metrics files, its figures worked out by hand."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write(path, rows):
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tool(*args):
    return subprocess.run([sys.executable, "tools/compare_runs.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_figures_and_table(tmp_path):
    a = [dict(step=1, reward=0.5, skipped_steps=1, **{"mismatch/prob_diff_mean": 4e-4, "mismatch/kl_k3": 2e-6}),
         dict(step=2, reward=0.9, skipped_steps=1, **{"mismatch/prob_diff_mean": 2e-4, "mismatch/kl_k3": 1e-6}),
         dict(step=3, reward=1.0, skipped_steps=2, **{"mismatch/prob_diff_mean": 1e-4, "mismatch/kl_k3": 0.0})]
    _write(tmp_path / "a", a)
    _write(tmp_path / "b", [dict(step=1, reward=0.25, **{"mismatch/prob_diff_mean": 1e-3})])
    done = _tool(tmp_path / "a", tmp_path / "b" / "metrics.jsonl", "--window", "2", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    ra = got[str(tmp_path / "a")]
    assert ra["steps"] == 3 and ra["skipped_steps"] == 2
    assert abs(ra["prob_diff_mean"] - 7e-4 / 3) < 1e-15 and abs(ra["kl_k3"] - 1e-6) < 1e-15
    assert ra["matched_steps"] == 2 and abs(ra["matched_prob_diff_mean"] - 1.5e-4) < 1e-15  # rewards 0.9 and 1.0
    assert ra["reward_windows"] == [0.7, 1.0]
    rb = got[str(tmp_path / "b" / "metrics.jsonl")]
    assert rb["matched_steps"] == 0 and rb["skipped_steps"] == 0 and rb["reward_windows"] == [0.25]
    done = _tool(tmp_path / "a", tmp_path / "b", "--window", "2")
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| run | steps | skipped |") and len(lines) == 4
    assert lines[2] == f"| {tmp_path / 'a'} | 3 | 2 | 2.33e-04 | 1.0e-06 | 1.50e-04 (2) | 0.70, 1.00 |"
    assert lines[3] == f"| {tmp_path / 'b'} | 1 | 0 | 1.00e-03 | - | - (0) | 0.25 |"


def test_bad_input_is_named(tmp_path):
    done = _tool(tmp_path / "missing")
    assert done.returncode == 2 and f"'{tmp_path / 'missing'}': no metrics.jsonl" in done.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "reward": 1.0}\n{"step": 2, "rew\n')
    done = _tool(bad)
    assert done.returncode == 2 and f"{bad / 'metrics.jsonl'}:2: not a JSON line" in done.stderr
    (bad / "metrics.jsonl").write_text('{"step": 1}\n')
    done = _tool(bad)
    assert done.returncode == 2 and ":1: has no 'reward'" in done.stderr
