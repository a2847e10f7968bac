"""Sleep/wake around training is a GPU feature (vLLM's sleep mode needs CUDA's allocator), so here the
engine's bookkeeping runs against a recorder standing in for ``vllm.LLM``: which parts are released,
in which order they come back, and that a level-2 sleep cannot be woken for generation before a
refit has rewritten the discarded weights."""
from types import SimpleNamespace

import pytest
import torch

from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine


class RecordingLLM:
    def __init__(self):
        self.calls = []
        model = SimpleNamespace(parameters=lambda: [], modules=lambda: [], load_weights=self._load)
        runner = SimpleNamespace(model=model)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=runner))))

    def _load(self, weights):
        self.calls.append(("load", [name for name, _ in weights]))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def engine_with(level, enabled=True):
    engine = RolloutEngine.__new__(RolloutEngine)
    engine.config = RolloutConfig(sleep_level=level)
    engine.llm = RecordingLLM()
    engine.sleep_enabled = enabled
    engine._asleep = set()
    engine._weights_discarded = False
    return engine


def test_level2_cycle_wakes_weights_for_the_refit_and_kv_cache_for_the_rollout():
    engine = engine_with(2)
    engine.sleep()
    engine.sleep()  # idempotent
    assert engine.sleeping and engine.llm.calls == [("sleep", 2)]
    with pytest.raises(RuntimeError, match="update_weights"):
        engine.generate([[5, 6]])
    stats = engine.update_weights([("w", torch.zeros(4))])
    assert stats["tensors"] == 1 and stats["bytes"] == 16
    assert engine.llm.calls[1:] == [("wake_up", ("weights",)), ("load", ["w"]), ("reset_prefix_cache",)]
    assert engine.sleeping  # the KV cache is still released
    assert len(engine.generate([])) == 0
    assert engine.llm.calls[-1] == ("wake_up", ("kv_cache",)) and not engine.sleeping


def test_level1_keeps_weights_so_generate_wakes_everything():
    engine = engine_with(1)
    engine.sleep()
    engine.generate([])
    assert engine.llm.calls == [("sleep", 1), ("wake_up", ("kv_cache", "weights"))]


def test_without_sleep_mode_nothing_is_released():
    engine = engine_with(2, enabled=False)
    engine.sleep()
    engine.generate([])
    assert engine.llm.calls == [] and not engine.sleeping


def test_bad_sleep_settings_are_named():
    with pytest.raises(ValueError, match="sleep_level=3; valid: 1, 2"):
        RolloutConfig(sleep_level=3).validate()
    with pytest.raises(ValueError, match="tags"):
        engine_with(2).wake_up(tags=["weight"])
