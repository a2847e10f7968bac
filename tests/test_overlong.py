"""DAPO's overlong handling: the soft punishment against its piecewise formula, and the trainer's use of
it (the penalty reaches the advantages, not the reported reward; truncated responses leave the loss mask
and so the global denominators, while the mismatch is still measured on every response)."""
import types

import pytest
import torch

from megatron_rlfp16.losses.shaping import overlong_penalty
from megatron_rlfp16.megatron.args import RLConfig
from megatron_rlfp16.rollout.batch import RolloutBatch

pytestmark = pytest.mark.unit


def naive(length, max_len, buffer, factor):
    """DAPO's R_length, written from the paper's case list."""
    if buffer == 0 or length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return factor * ((max_len - buffer) - length) / buffer
    return -factor


@pytest.mark.parametrize("max_len,buffer,factor", [(16, 4, 1.0), (16, 16, 0.5), (10, 1, 2.0), (8, 0, 1.0)])
def test_penalty_matches_the_formula(max_len, buffer, factor):
    lengths = torch.arange(0, max_len + 3)
    got = overlong_penalty(lengths, max_len=max_len, buffer=buffer, factor=factor)
    want = torch.tensor([naive(int(n), max_len, buffer, factor) for n in lengths], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match=r"overlong buffer=20; valid: an integer in \[0, max_len=16\]"):
        overlong_penalty(torch.ones(2), max_len=16, buffer=20)
    with pytest.raises(ValueError, match=r"RLConfig.overlong_buffer=-1 is invalid; valid: an int >= 0"):
        RLConfig(overlong_buffer=-1).validate()
    with pytest.raises(ValueError, match=r"RLConfig.overlong_penalty=-0.5 is invalid"):
        RLConfig(overlong_penalty=-0.5).validate()


def _trainer(rl, max_new_tokens=4):
    """The attributes ``Trainer.score`` and ``Trainer.micro_batches`` read, nothing else."""
    from megatron_rlfp16.trainer import TrainerConfig
    from megatron_rlfp16.trainer.config import RunConfig

    config = TrainerConfig(hf_dir="unused", rl=rl, run=RunConfig(max_new_tokens=max_new_tokens))
    source = types.SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)),
                                   score=lambda examples, texts: [1.0 if t.startswith("7") else 0.0 for t in texts])
    plan = types.SimpleNamespace(group_size=2, seq_multiple=1, micro_batch_size=2)
    from megatron_rlfp16.trainer.loop import Trainer

    ns = types.SimpleNamespace(config=config, source=source, plan=plan, _step_metrics={},
                               _dp_slice=lambda n: slice(0, n))
    ns._penalty = lambda batch: Trainer._penalty(ns, batch)
    return ns


def _batch():
    responses = [[7, 1], [5, 1, 2, 3], [7, 1, 2, 3], [5]]  # lengths 2, 4, 4, 1; two hit max_new_tokens=4
    return RolloutBatch(prompts=[[1, 2]] * 4, responses=responses, logprobs=[[-0.5] * len(r) for r in responses],
                        prompt_index=[0, 0, 1, 1], finished=[True, False, False, True])


def test_the_trainer_shapes_the_advantages_and_masks_truncated_responses():
    from megatron_rlfp16.losses import compute_advantages
    from megatron_rlfp16.trainer.loop import Trainer

    rl = RLConfig(group_size=2, overlong_buffer=2, overlong_penalty=0.5, mask_truncated=True)
    trainer = _trainer(rl)
    batch = _batch()
    rewards, advantages = Trainer.score(trainer, [None, None], batch)
    assert rewards.tolist() == [1.0, 0.0, 1.0, 0.0]  # the task reward, reported as it is
    shaped = torch.tensor([1.0 + naive(2, 4, 2, 0.5), naive(4, 4, 2, 0.5), 1.0 + naive(4, 4, 2, 0.5), naive(1, 4, 2, 0.5)],
                          dtype=rewards.dtype)
    torch.testing.assert_close(advantages, compute_advantages(shaped, 2, estimator="grpo"))
    assert float(Trainer._penalty(trainer, batch).mean()) == pytest.approx((2 * naive(4, 4, 2, 0.5)) / 4)
    micro, tensors = Trainer.micro_batches(trainer, batch, advantages)
    loss_mask = torch.cat([m["loss_mask"] for m in micro])
    assert loss_mask.sum(-1).tolist() == [2, 0, 0, 1]  # the truncated responses carry no loss
    assert tensors["response_mask"].sum(-1).tolist() == [2, 4, 4, 1]  # the mismatch still sees them
    off = _trainer(RLConfig(group_size=2))
    _, plain = Trainer.score(off, [None, None], batch)
    torch.testing.assert_close(plain, compute_advantages(rewards, 2, estimator="grpo"))
    assert torch.cat([m["loss_mask"] for m in Trainer.micro_batches(off, batch, plain)[0]]).sum(-1).tolist() == [2, 4, 4, 1]


def test_a_buffer_longer_than_the_responses_is_refused(tmp_path):
    from megatron_rlfp16.plan import resolve_plan
    from megatron_rlfp16.testing.tiny import make_tiny_model
    from megatron_rlfp16.trainer import TrainerConfig
    from megatron_rlfp16.trainer.config import RunConfig

    hf = make_tiny_model("llama", str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"RLConfig.overlong_buffer=32 is longer than the responses "
                                         r"\(RunConfig.max_new_tokens=16\); valid: 0 to 16"):
        resolve_plan(TrainerConfig(hf_dir=hf, rl=RLConfig(overlong_buffer=32), run=RunConfig(max_new_tokens=16)),
                     world_size=1)
