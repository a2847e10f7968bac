"""Real checkpoints and real prompts: chat templates, several end ids, stop strings, visible samples.

Unit tests check the prompt builder against the tokenizer's own ``apply_chat_template`` and the
stop-string cut against a naive prefix scan. The trainer test runs a tiny tied-embedding Llama saved
the way instruct checkpoints ship (fast tokenizer with a Jinja chat template, a
``generation_config.json`` with two end ids besides the tokenizer's eos) through JSONL -> template ->
engine -> reward, and reads what the run wrote.
"""
import json

import pytest

from megatron_rlfp16.testing.distributed import run_on_ranks


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    from megatron_rlfp16.testing.tiny import make_chat_model

    return make_chat_model(str(tmp_path_factory.mktemp("chat")), seed=2)


@pytest.fixture(scope="module")
def tokenizer(chat_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_dir)


def _template_ids(tokenizer, messages):
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


# -- the prompt builder ---------------------------------------------------------------------------


def test_prompt_ids_are_the_tokenizers_chat_template(tokenizer):
    from megatron_rlfp16.prompts import PromptBuilder, PromptConfig

    user = [{"role": "user", "content": "what is 1 + 2 ?"}]
    assert PromptBuilder(tokenizer).encode("what is 1 + 2 ?") == _template_ids(tokenizer, user)
    system = [{"role": "system", "content": "be brief"}] + user
    assert PromptBuilder(tokenizer, PromptConfig(system_prompt="be brief")).encode("what is 1 + 2 ?") == \
        _template_ids(tokenizer, system)
    # A row's own chat list is used as it is (its system message wins over --system-prompt).
    chat = [{"role": "system", "content": "answer"}, {"role": "user", "content": "what is 3 ?"}]
    assert PromptBuilder(tokenizer, PromptConfig(system_prompt="be brief")).encode("ignored", chat) == \
        _template_ids(tokenizer, chat)
    templated = PromptBuilder(tokenizer, PromptConfig(prompt_template="{prompt} answer"))
    assert templated.encode("what is 4 ?") == _template_ids(tokenizer, [{"role": "user", "content": "what is 4 ? answer"}])


def test_without_a_chat_template_prompts_are_plain_text(tokenizer):
    from megatron_rlfp16.prompts import PromptBuilder, PromptConfig

    plain = PromptBuilder(tokenizer, PromptConfig(chat_template=False, prompt_template="{prompt} answer",
                                                  system_prompt="be brief"))
    assert not plain.uses_chat_template
    assert plain.encode("what is 5 ?") == tokenizer.encode("be brief\n\nwhat is 5 ? answer")
    with pytest.raises(ValueError, match="multi-turn 'messages' list needs a tokenizer with a chat template"):
        plain.encode("x", [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"},
                           {"role": "user", "content": "3"}])


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt_template="no placeholder"), r"prompt_template='no placeholder' is invalid; valid: a string with one '\{prompt\}'"),
    (dict(prompt_template="{prompt} {other}"), r"does not format"),
    (dict(stop=("",)), r"PromptConfig.stop=\('',\) is invalid; valid: non-empty strings"),
])
def test_bad_prompt_settings_are_named(kwargs, message):
    from megatron_rlfp16.prompts import PromptConfig

    with pytest.raises(ValueError, match=message):
        PromptConfig(**kwargs).validate()


def test_stop_ids_come_from_generation_config_and_the_tokenizer(chat_dir, tokenizer, tmp_path):
    from megatron_rlfp16.prompts import stop_token_ids
    from megatron_rlfp16.testing.tiny import CHAT_END_IDS

    assert stop_token_ids(chat_dir, tokenizer) == [*CHAT_END_IDS, tokenizer.eos_token_id]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert stop_token_ids(str(tmp_path), None) == [7]
    (tmp_path / "generation_config.json").write_text("{bad")
    with pytest.raises(ValueError, match="generation_config.json: not valid JSON"):
        stop_token_ids(str(tmp_path), None)


def test_jsonl_rows_may_hold_a_chat_list(tmp_path):
    from megatron_rlfp16.rewards import load_jsonl

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "what is 2 ?"}], "answer": 2}) + "\n"
                    + json.dumps({"prompt": "what is 3 ?", "answer": "3"}) + "\n")
    chat, plain = load_jsonl(str(path)).examples
    assert chat.prompt == "what is 2 ?" and chat.answer == "2" and chat.meta["messages"][0]["role"] == "system"
    assert plain.prompt == "what is 3 ?" and "messages" not in plain.meta
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}], "answer": 1}) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:1: field 'messages'\[0\]=.*expected \{'role': one of"):
        load_jsonl(str(path))


def _source(tokenizer, chat_dir, path, on_bad):
    from megatron_rlfp16.rewards import get_reward, load_jsonl
    from megatron_rlfp16.trainer import JsonlSource

    return JsonlSource(load_jsonl(str(path), on_bad=on_bad), tokenizer, get_reward("math"), hf_dir=chat_dir,
                       on_bad=on_bad)


def test_over_long_prompts_are_named_or_left_out_before_the_run(chat_dir, tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "what is 2 ?", "answer": 2}, {"prompt": " ".join(["1 + 1"] * 40), "answer": 2},
            {"prompt": "what is 3 ?", "answer": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    limit = 30
    long_ids = len(_template_ids(tokenizer, [{"role": "user", "content": rows[1]["prompt"]}]))
    assert long_ids > limit >= len(_template_ids(tokenizer, [{"role": "user", "content": rows[0]["prompt"]}]))
    with pytest.raises(ValueError, match=rf"data.jsonl:2: the prompt has {long_ids} tokens, over the engine's "
                                         rf"limit of {limit} .*--on-bad-prompt skip"):
        _source(tokenizer, chat_dir, path, "error").check_prompts(limit)
    source = _source(tokenizer, chat_dir, path, "skip")
    assert source.check_prompts(limit) == 2
    assert [where for where, _ in source.skipped] == [f"{path}:2"]
    drawn = source.prompts(0, 6)  # an epoch is the two usable prompts, in a seeded order
    assert sorted({e.prompt for e in drawn}) == ["what is 2 ?", "what is 3 ?"]
    assert source.encode_prompt(drawn[0]) == _template_ids(tokenizer, [{"role": "user", "content": drawn[0].prompt}])


class _Source:
    """Prompts of given token lengths, drawn in order."""

    def __init__(self, lengths):
        from megatron_rlfp16.rewards import Example

        self.queue = [Example(f"p{i}-{n}", "", {"n": n}) for i, n in enumerate(lengths)]

    def prompts(self, step, n):
        out, self.queue = self.queue[:n], self.queue[n:]
        return out

    def encode_prompt(self, example):
        return [5] * example.meta["n"]


def test_a_step_tops_up_prompts_that_do_not_fit_the_engine():
    from types import SimpleNamespace

    from megatron_rlfp16.trainer import RunConfig, Trainer

    def trainer(lengths):
        return SimpleNamespace(source=_Source(lengths), step=0, config=SimpleNamespace(run=RunConfig(prompts_per_step=3)),
                               plan=SimpleNamespace(rollout=SimpleNamespace(max_model_len=10)))

    examples, ids, left_out = Trainer.step_prompts(trainer([4, 0, 9, 10, 3, 2]))
    assert [len(x) for x in ids] == [4, 9, 3] and left_out == 2  # 0 and 10 tokens do not fit
    assert [e.prompt for e in examples] == ["p0-4", "p2-9", "p4-3"]
    with pytest.raises(ValueError, match=r"step 1: only 1 of 3 prompts fit the engine \(1 to 9 tokens\) after 8 draws"):
        Trainer.step_prompts(trainer([4] + [50] * 30))


def test_stop_strings_cut_where_the_string_completes():
    from megatron_rlfp16.rollout import RolloutBatch
    from megatron_rlfp16.rollout.batch import apply_stop_strings

    words = {1: "a", 2: "b", 3: "END", 4: "c"}
    decode = lambda ids: " ".join(words[i] for i in ids)  # noqa: E731
    responses = [[1, 2, 3, 4, 1], [1, 2, 4], [3], [1, 1, 2, 3]]
    batch = RolloutBatch(prompts=[[9]] * 4, responses=[list(r) for r in responses],
                         logprobs=[[-0.1 * (k + 1) for k in range(len(r))] for r in responses],
                         prompt_index=[0, 1, 2, 3], finished=[False, False, False, True])
    assert apply_stop_strings(batch, ("END", "b c"), decode) == 3
    # Naive reference: the shortest prefix whose text contains a stop string.
    for got, response in zip(batch.responses, responses):
        want = next((response[:n] for n in range(1, len(response) + 1)
                     if any(s in decode(response[:n]) for s in ("END", "b c"))), response)
        assert got == want
    assert batch.finished == [True, True, True, True]
    assert [len(lp) for lp in batch.logprobs] == [len(r) for r in batch.responses]


# -- the trainer, end to end ------------------------------------------------------------------------


def _train_job(hf_dir, data, out_dir):
    from transformers import AutoTokenizer

    from megatron_rlfp16.megatron.args import RLConfig
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.prompts import PromptConfig
    from megatron_rlfp16.rewards import load_jsonl
    from megatron_rlfp16.rewards.base import FunctionReward
    from megatron_rlfp16.trainer import JsonlSource, RunConfig, Trainer, TrainerConfig

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    reward = FunctionReward(lambda prompt, response, meta: float(meta["answer"] in response.split()), "has_answer")
    source = JsonlSource(load_jsonl(data), tokenizer, reward, hf_dir=hf_dir,
                         prompt_config=PromptConfig(system_prompt="be brief"))
    config = TrainerConfig(
        hf_dir=hf_dir, out_dir=out_dir, tensorboard=True, progress=False,
        precision=PrecisionConfig(trainer="fp32"), rl=RLConfig(group_size=8),
        run=RunConfig(steps=2, prompts_per_step=4, max_new_tokens=12, micro_batch_size=32, lr=1e-3,
                      log_samples=1, samples_per_log=32),
    )
    trainer = Trainer(config, source)
    history = trainer.fit()
    examples = {e.prompt: source.encode_prompt(e) for e in source.iterator.items}
    trainer.close()
    return dict(history=history, examples=examples, stop_ids=source.stop_ids)


@pytest.mark.vllm
def test_trainer_uses_the_chat_template_every_end_id_and_logs_samples(chat_dir, tokenizer, tmp_path):
    from megatron_rlfp16.testing.tiny import CHAT_END_IDS

    rows = [{"prompt": f"what is {a} + {b} ?", "answer": str((a + b) % 10)} for a in range(4) for b in range(2)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_on_ranks(_train_job, 1, chat_dir, str(data), str(tmp_path / "run"), timeout=600)[0]
    stops = set(out["stop_ids"])
    assert stops == {*CHAT_END_IDS, tokenizer.eos_token_id}
    system = [{"role": "system", "content": "be brief"}]
    for prompt, ids in out["examples"].items():
        assert ids == _template_ids(tokenizer, system + [{"role": "user", "content": prompt}])
    samples = [json.loads(l) for l in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 2] and len(samples) == 64
    enders = set()
    for s in samples:
        ids = s["response_ids"]
        # generation stopped at the first end id, whichever it was; a response without one hit the limit
        assert not any(t in stops for t in ids[:-1]), s
        if s["truncated"]:
            assert len(ids) == 12 and ids[-1] not in stops
        else:
            assert ids[-1] in stops
            enders.add(ids[-1])
        assert s["response"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert s["reward"] == float(s["answer"] in s["response"].split())
        assert s["response_length"] == len(ids)
    assert enders == stops, f"end ids never seen ending a response: {stops - enders}"
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0.0 <= m["truncated_frac"] <= 1.0 and m["mismatch/prob_diff_mean"] < 1e-3
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_prompt_flags_of_the_training_script(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
    import grpo_train

    args = grpo_train.build_parser().parse_args(
        ["--hf-dir", str(tmp_path), "--system-prompt", "be brief", "--prompt-template", "{prompt} answer",
         "--no-chat-template", "--stop", "END", "--stop", "###", "--log-samples", "5"])
    config = grpo_train.prompt_config(args)
    assert (config.chat_template, config.system_prompt, config.prompt_template, config.stop) == \
        (False, "be brief", "{prompt} answer", ("END", "###"))
    assert grpo_train.build_config(args).run.log_samples == 5
    bad = grpo_train.build_parser().parse_args(["--hf-dir", str(tmp_path), "--prompt-template", "x"])
    with pytest.raises(ValueError, match=r"^--prompt-template: PromptConfig.prompt_template='x' is invalid"):
        grpo_train.prompt_config(bad)
