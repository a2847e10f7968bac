"""DAPO's dynamic sampling, the bookkeeping: which groups are kept, how many more rollouts run, how the
batch is filled when they run out. The rollouts here are scripted (prompt ids whose samples score a
known pattern); the real engine runs it in tests/test_trainer_lora.py."""
import types

import pytest
import torch

from megatron_rlfp16.megatron.args import RLConfig
from megatron_rlfp16.rollout.batch import RolloutBatch
from megatron_rlfp16.trainer.loop import Trainer, informative_groups

pytestmark = pytest.mark.unit
G = 2


def _batch(tags):
    """One group of G samples per tag; a tag "mix" scores (1, 0), "same" scores (1, 1)."""
    responses, index = [], []
    for p, tag in enumerate(tags):
        for k in range(G):
            responses.append([p, 1 if tag == "same" or k == 0 else 0])
            index.append(p)
    return RolloutBatch(prompts=[[9]] * len(responses), responses=responses, logprobs=[[-1.0, -1.0]] * len(responses),
                        prompt_index=index, finished=[True] * len(responses))


def _rewards(batch):
    return torch.tensor([float(r[1]) for r in batch.responses], dtype=torch.float64)


def _trainer(script, rounds):
    """``rollout(want, round_)`` returns the scripted round's groups, cut to ``want`` prompts."""
    calls = []

    def rollout(want, round_=0):
        calls.append((want, round_))
        tags = script[round_][:want]
        return [f"r{round_}p{i}" for i in range(len(tags))], _batch(tags), 0

    def score(examples, batch):
        r = _rewards(batch)
        return r, r - r.view(-1, G).mean(-1).repeat_interleave(G)

    ns = types.SimpleNamespace(config=types.SimpleNamespace(rl=RLConfig(group_size=G, dynamic_sampling=True,
                                                                       dynamic_sampling_rounds=rounds)),
                               plan=types.SimpleNamespace(group_size=G), _step_metrics={}, rollout=rollout, score=score)
    return ns, calls


def test_informative_groups():
    kept, dropped = informative_groups(_batch(["mix", "same", "mix"]), _rewards(_batch(["mix", "same", "mix"])))
    assert kept == [(0, 0), (0, 2)] and dropped == [(0, 1)]


def test_more_rollouts_fill_the_batch_with_informative_groups():
    script = {0: ["mix", "same", "same", "mix"], 1: ["same", "mix"], 2: ["mix"]}
    ns, calls = _trainer(script, rounds=3)
    examples, batch, _ = ns.rollout(4)
    calls.clear()
    examples, batch, rewards, advantages = Trainer.resample(ns, examples, batch, *ns.score(examples, batch))
    assert calls == [(2, 1), (1, 2)]  # two groups missing, then one
    assert examples == ["r0p0", "r0p3", "r1p1", "r2p0"]
    assert len(batch) == 4 * G and batch.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(rewards.view(-1, G).std(-1) > 0)
    assert ns._step_metrics == {"dynamic_sampling/filtered_frac": 3 / 7, "dynamic_sampling/rounds": 2.0,
                                "dynamic_sampling/filled": 0.0}


def test_when_rounds_run_out_dropped_groups_fill_the_rest():
    script = {0: ["same", "mix", "same"], 1: ["same", "same"]}
    ns, calls = _trainer(script, rounds=1)
    examples, batch, _ = ns.rollout(3)
    examples, batch, rewards, advantages = Trainer.resample(ns, examples, batch, *ns.score(examples, batch))
    assert examples == ["r0p0", "r0p1", "r0p2"]  # the informative one, then dropped ones in order
    assert len(batch) == 3 * G and torch.all(advantages.view(-1, G)[[0, 2]] == 0)
    assert ns._step_metrics["dynamic_sampling/filled"] == 2.0 and ns._step_metrics["dynamic_sampling/rounds"] == 1.0


def test_config_checks():
    with pytest.raises(ValueError, match=r"RLConfig.dynamic_sampling needs groups to compare: group_size=1"):
        RLConfig(group_size=1, dynamic_sampling=True).validate()
    with pytest.raises(ValueError, match=r"RLConfig.dynamic_sampling_rounds=-1 is invalid"):
        RLConfig(dynamic_sampling_rounds=-1).validate()
