"""Rewards, synthetic tasks, the task tokenizer, the math reward and JSONL datasets (CPU, seconds).

Expected answers are written out by hand or recomputed by an independent reference in the test
(Python slicing / sorted / int arithmetic on the parsed prompt), never captured from the code.
"""
import json
import os
import random
import signal
import threading

import pytest

from megatron_rlfp16.rewards import (
    JsonlReader,
    RewardFn,
    ShuffledIterator,
    TaskConfig,
    TaskTokenizer,
    TokenizerConfig,
    build_task,
    exact_match,
    extract_final_answer,
    get_reward,
    get_task,
    load_jsonl,
    math_reward,
    register_reward,
    register_task,
    train_tokenizer,
)
from megatron_rlfp16.rewards import base as reward_base
from megatron_rlfp16.rewards import tokenizer as tokenizer_module
from megatron_rlfp16.rewards.base import Registry
from megatron_rlfp16.rewards.tasks import Task

ALL_TASKS = ("copy", "reverse", "sort", "add")


# ---- tasks ----------------------------------------------------------------------------------------

# (task, config, prompt, correct answer, wrong answers), worked out by hand.
HAND_CASES = [
    ("reverse", dict(min_len=3, max_len=3, num_symbols=5), "reverse: 3 1 4 =", "4 1 3", ["4 1 4", "3 1 4", "4 1", "413"]),
    ("sort", dict(min_len=3, max_len=3, num_symbols=5), "sort: 3 1 4 =", "1 3 4", ["3 1 4", "4 3 1", "1 3 4 4"]),
    ("copy", dict(min_len=2, max_len=2, num_symbols=4), "copy: 0 3 =", "0 3", ["3 0", "0", "0 3 0"]),
    ("add", dict(add_digits=1), "add: 9 + 8 =", "1 7", ["7 1", "17", "1 8"]),
    ("add", dict(add_digits=1), "add: 0 + 0 =", "0", ["0 0", ""]),
]


def _find(task, prompt, tries=20000):
    rng = random.Random(0)
    for _ in range(tries):
        example = task.sample(rng)
        if example.prompt == prompt:
            return example
    raise AssertionError(f"{prompt!r} never sampled")


@pytest.mark.parametrize("name,knobs,prompt,answer,wrong", HAND_CASES)
def test_task_answers_and_rewards_by_hand(name, knobs, prompt, answer, wrong):
    task = build_task(TaskConfig(names=(name,), **knobs))
    example = _find(task, prompt)
    assert example.answer == answer and example.meta["answer"] == answer
    assert example.meta["task"] == name
    json.dumps(example.meta)  # rollouts get logged
    assert task.reward(answer, example.meta) == 1.0
    assert task.reward(f"  {answer} </s>", example.meta) == 1.0  # whitespace and eos marker stripped
    assert task.reward(f"{answer}</s>9 9", example.meta) == 1.0  # nothing after eos counts
    for response in wrong:
        assert task.reward(response, example.meta) == 0.0, response
    assert get_reward("task")(prompt, answer, example.meta) == 1.0
    assert get_reward("exact_match")(prompt, wrong[0], example.meta) == 0.0


def _reference_answer(prompt: str) -> str:
    """Independent of tasks.py: parse the prompt text and compute the answer with plain Python."""
    head, body = prompt.split(": ", 1)
    assert body.endswith(" =")
    words = body[:-2].split()
    if head == "add":
        plus = words.index("+")
        total = int("".join(words[:plus])) + int("".join(words[plus + 1:]))
        return " ".join(str(total))
    return " ".join({"copy": words, "reverse": words[::-1], "sort": sorted(words)}[head])


def test_every_sampled_example_matches_reference():
    cfg = TaskConfig(names=ALL_TASKS, min_len=2, max_len=6, num_symbols=7, add_digits=3)
    task = build_task(cfg)
    examples = task.dataset(800, seed=3)
    assert {e.meta["task"] for e in examples} == set(ALL_TASKS)
    for prompt, answer, meta in examples:
        assert answer == _reference_answer(prompt), prompt
        words = prompt.split()
        if meta["task"] == "add":
            assert len(words[1:words.index("+")]) <= 3
        else:
            assert 2 <= len(words) - 2 <= 6 and all(int(w) < 7 for w in words[1:-1])
        assert task.reward(answer, meta) == 1.0
        assert set(words) | set(answer.split()) <= set(task.symbols())


def test_dataset_is_deterministic_per_seed():
    task = build_task(TaskConfig(names=("reverse", "add")))
    assert task.dataset(50, seed=1) == task.dataset(50, seed=1)
    assert task.dataset(50, seed=1) != task.dataset(50, seed=2)


def test_task_config_errors_name_field_value_and_valid():
    with pytest.raises(ValueError, match=r"unknown task 'revers'.*'reverse'"):
        TaskConfig(names=("revers",)).validate()
    with pytest.raises(ValueError, match=r"TaskConfig.names='reverse'.*tuple"):
        TaskConfig(names="reverse").validate()
    with pytest.raises(ValueError, match=r"TaskConfig.max_len=2 .*\[3, 32\]"):
        TaskConfig(min_len=3, max_len=2).validate()
    with pytest.raises(ValueError, match=r"TaskConfig.num_symbols=11 .*\[2, 10\]"):
        TaskConfig(num_symbols=11).validate()
    with pytest.raises(ValueError, match="repeats"):
        TaskConfig(names=("sort", "sort")).validate()


def test_mixture_and_task_reward_reject_unknown_task_names():
    mixture = build_task(TaskConfig(names=("copy", "sort")))
    with pytest.raises(ValueError, match=r"'reverse' is not part of this mixture.*'copy', 'sort'"):
        mixture.reward("1", {"task": "reverse", "answer": "1"})
    with pytest.raises(ValueError, match=r"'nope' is not a registered task; valid: \('add', 'copy'"):
        get_reward("task")("", "1", {"task": "nope", "answer": "1"})


def test_exact_match():
    assert exact_match("4 1 3\n", "4 1 3") == 1.0
    assert exact_match("4 1 3 <eos>", "4 1 3") == 1.0
    assert exact_match("4  1 3", "4 1 3") == 0.0  # exact: inner whitespace counts
    assert exact_match("", "4 1 3") == 0.0


# ---- registries -----------------------------------------------------------------------------------

@pytest.fixture
def scratch_registries():
    """Lets a test register names without leaking them into other tests."""
    from megatron_rlfp16.rewards.tasks import TASKS

    saved = dict(reward_base.REWARDS._entries), dict(TASKS._entries)
    yield
    reward_base.REWARDS._entries, TASKS._entries = saved


def test_reward_registry(scratch_registries):
    with pytest.raises(ValueError, match=r"unknown reward 'mth'; valid: \('exact_match', 'math', 'task'\)"):
        get_reward("mth")
    with pytest.raises(ValueError, match=r"reward 'math' is already registered .*MathReward"):
        register_reward("math")(lambda p, r, m: 0.0)

    @register_reward("length_test")
    def length(prompt, response, meta):
        return len(response)

    reward = get_reward("length_test")
    assert isinstance(reward, RewardFn) and reward.name == "length_test"
    assert reward.score([("p", "ab", {}), ("p", "abcd", {})]) == [2.0, 4.0]
    with pytest.raises(TypeError, match="takes no options"):
        get_reward("length_test", scale=2)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length_test")(length)


def test_task_registry(scratch_registries):
    with pytest.raises(ValueError, match=r"unknown task 'nope'; valid: \('add', 'copy', 'reverse', 'sort'\)"):
        get_task("nope")
    with pytest.raises(ValueError, match=r"task 'reverse' is already registered .*ReverseTask"):
        register_task("reverse")(type("Other", (Task,), {}))
    with pytest.raises(TypeError, match="expected a Task subclass"):
        register_task("not_a_task")(int)


def test_registry_rejects_empty_names():
    with pytest.raises(ValueError, match="non-empty string"):
        Registry("thing").add("", object())


# ---- tokenizer ------------------------------------------------------------------------------------

def test_tokenizer_round_trip_one_token_per_symbol(tmp_path):
    task = build_task(TaskConfig(names=ALL_TASKS, max_len=5, add_digits=2))
    tok = train_tokenizer(task, TokenizerConfig(vocab_size=64), str(tmp_path))
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    for prompt, answer, _ in task.dataset(300, seed=7):
        prompt_ids, answer_ids = tok.encode_prompt(prompt), tok.encode_answer(answer)
        assert prompt_ids[0] == tok.bos_id and answer_ids[-1] == tok.eos_id
        assert len(prompt_ids) == 1 + len(prompt.split())  # one token per symbol
        assert len(answer_ids) == len(answer.split()) + 1
        assert tok.unk_id not in prompt_ids + answer_ids
        assert tok.decode(prompt_ids) == prompt
        assert tok.decode(answer_ids) == answer
        # The response a policy samples after the prompt is the answer ids; decoding stops at eos.
        assert tok.decode(answer_ids + tok.encode("9 9")) == answer
    assert tok.encode("reverse: 3 1 4 =") == [tok.encode(w)[0] for w in ("reverse:", "3", "1", "4", "=")]
    assert tok.decode([tok.vocab_size + 5, tok.encode("7")[0]]).endswith("7")  # out-of-vocab ids: no crash


def test_tokenizer_vocab_size_as_configured():
    task = get_task("reverse")
    # Word model for "reverse": 4 specials + 10 digits + "reverse:" + "=" = 16 pieces at least.
    assert train_tokenizer(task, TokenizerConfig(vocab_size=16)).vocab_size == 16
    assert train_tokenizer(task, TokenizerConfig(vocab_size=100)).vocab_size == 100
    with pytest.raises(ValueError, match=r"vocab_size=15 is too small .*at least 16"):
        train_tokenizer(task, TokenizerConfig(vocab_size=15))
    # Char model: 4 specials + "▁" + 10 digits + r e v s : = -> 21; "4 1 3" is ▁4▁1▁3.
    char = train_tokenizer(task, TokenizerConfig(model_type="char", vocab_size=21))
    assert char.vocab_size == 21 and len(char.encode("4 1 3")) == 6 and char.decode(char.encode("4 1 3")) == "4 1 3"
    with pytest.raises(ValueError, match=r"TokenizerConfig.model_type='bpe' .*\('word', 'char'\)"):
        TokenizerConfig(model_type="bpe").validate()


def test_tokenizer_is_deterministic_and_reloads(tmp_path):
    task = build_task(TaskConfig(names=("reverse", "add")))
    first = train_tokenizer(task, TokenizerConfig(seed=5), str(tmp_path / "a"))
    second = train_tokenizer(task, TokenizerConfig(seed=5), str(tmp_path / "b"))
    a, b = (tmp_path / "a" / "tokenizer.model").read_bytes(), (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert a == b == first.model_bytes == second.model_bytes
    loaded = TaskTokenizer.load(str(tmp_path / "a"))
    text = "add: 4 2 + 9 = 5 1"
    assert loaded.encode(text) == first.encode(text) and loaded.vocab_size == first.vocab_size
    with pytest.raises(FileNotFoundError, match="no task tokenizer"):
        TaskTokenizer.load(str(tmp_path / "missing"))


def test_tokenizer_failures_leave_no_files(tmp_path, monkeypatch):
    task = get_task("reverse")
    out = tmp_path / "tok"
    with pytest.raises(ValueError):
        train_tokenizer(task, TokenizerConfig(vocab_size=10), str(out))
    with pytest.raises(ValueError):
        train_tokenizer(task, TokenizerConfig(model_type="unigram"), str(out))
    assert not out.exists()
    # A failure while writing keeps the previous model intact and leaves no temp file.
    train_tokenizer(task, TokenizerConfig(seed=1), str(out))
    before = (out / "tokenizer.model").read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        train_tokenizer(task, TokenizerConfig(seed=2, vocab_size=40), str(out))
    assert os.listdir(out) == ["tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == before


# ---- math reward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("response,gold,expected", [
    (r"\frac{1}{2}", "0.5", 1.0),
    ("0.5", r"\frac{1}{2}", 1.0),
    (r"\boxed{3}", "3", 1.0),
    (r"So the total is 4 + 5, which gives \boxed{9}. Done.", "9", 1.0),
    (r"First 4, then $\frac{3}{4}$.", "0.75", 1.0),
    ("We count 4 apples, then 7", "7", 1.0),
    ("We count 4 apples, then 7", "4", 0.0),
    ("There are 12,345 of them.", "12345", 1.0),
    (r"\boxed{2}", "3", 0.0),
    ("garbage )(*& no answer", "3", 0.0),
    (r"\boxed{{{", "3", 0.0),
    ("", "3", 0.0),
    ("9" * 3000, "1", 0.0),
    (r"\boxed{x^2+1}", "1 + x^2", 1.0),
])
def test_math_reward(response, gold, expected):
    assert math_reward(response, gold) == expected


def test_math_reward_registered_and_batched():
    reward = get_reward("math", timeout_seconds=3)
    batch = [("q", r"\boxed{\frac{1}{2}}", {"answer": "0.5"}), ("q", "7", {"answer": "8"})]
    assert reward.score(batch) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"MathReward.timeout_seconds=-1"):
        get_reward("math", timeout_seconds=-1)


def test_extract_final_answer():
    assert extract_final_answer(r"a \boxed{1} then \boxed{\frac{2}{3}} end") == r"\frac{2}{3}"
    assert extract_final_answer(r"x is $\frac{1}{2}$") == r"\frac{1}{2}"
    assert extract_final_answer("it is 3.") == "3"
    assert extract_final_answer("no answer here") is None


def test_math_reward_off_main_thread_and_keeps_pending_alarm():
    results = []
    worker = threading.Thread(target=lambda: results.append(math_reward(r"\boxed{0.5}", r"\frac{1}{2}")))
    worker.start()
    worker.join()
    assert results == [1.0]  # signal-based timeouts cannot run here; no ValueError either
    outer = signal.alarm(0)  # pytest-timeout's alarm, if any
    try:
        signal.alarm(300)
        assert math_reward("5", "5") == 1.0
        assert 0 < signal.alarm(0) <= 300
    finally:
        signal.alarm(outer)


# ---- JSONL datasets -------------------------------------------------------------------------------

def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_jsonl_good_file_with_blank_lines(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "1+1?", "answer": "2", "source": "hand"}),
        "",
        "   ",
        json.dumps({"prompt": "half of 1?", "answer": 0.5}),
        json.dumps({"prompt": "3*3?", "answer": 9}),
        "",
    ])
    data = load_jsonl(path)
    assert len(data) == 3 and data.num_blank == 3
    assert [e.prompt for e in data.examples] == ["1+1?", "half of 1?", "3*3?"]
    assert [e.answer for e in data.examples] == ["2", "0.5", "9"]
    assert data[0].meta == {"source": "hand", "answer": "2"}


def test_jsonl_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode("utf-8") + (json.dumps({"prompt": "1+1?", "answer": 2}) + "\n").encode("utf-8"))
    data = load_jsonl(str(path))
    assert data[0].prompt == "1+1?" and data[0].answer == "2"


def test_jsonl_custom_field_names(tmp_path):
    path = _write(tmp_path / "q.jsonl", [json.dumps({"question": "q1", "solution": "s1"})])
    data = load_jsonl(path, prompt_field="question", answer_field="solution")
    assert data[0].prompt == "q1" and data[0].meta["answer"] == "s1"


@pytest.mark.parametrize("bad_line,message", [
    (json.dumps({"prompt": "p"}), r"missing field 'answer' \(fields present: \['prompt'\]\)"),
    (json.dumps({"answer": "a"}), "missing field 'prompt'"),
    ('{"prompt": "p", "answer": ', "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"prompt": 3, "answer": "a"}), "field 'prompt' must be a string"),
    (json.dumps({"prompt": "  ", "answer": "a"}), "field 'prompt' is empty"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "p", "answer": "a"})
    path = _write(tmp_path / "bad.jsonl", [good, "", bad_line, good])  # the bad record is on line 3
    with pytest.raises(ValueError, match=f"bad.jsonl:3: {message}"):
        load_jsonl(path)


def test_bad_lines_are_skipped_and_counted_when_asked(tmp_path):
    good = [json.dumps({"prompt": f"p{i}", "answer": str(i)}) for i in range(3)]
    path = _write(tmp_path / "mixed.jsonl", [good[0], "{broken", json.dumps({"prompt": "", "answer": "1"}), "",
                                              good[1], json.dumps({"answer": "x"}), good[2]])
    data = load_jsonl(path, on_bad="skip")
    assert [e.prompt for e in data.examples] == ["p0", "p1", "p2"]
    assert data.lines == [1, 5, 7] and data.where(1) == f"{path}:5"
    assert [line for line, _ in data.skipped] == [2, 3, 6]
    assert data.skipped[1][1] == "field 'prompt' is empty"
    with pytest.raises(ValueError, match="mixed.jsonl:2: invalid JSON"):
        load_jsonl(path)  # the default policy stops at the first bad line
    with pytest.raises(ValueError, match=r"on_bad='ignore'; valid: \['error', 'skip'\]"):
        load_jsonl(path, on_bad="ignore")
    only_bad = _write(tmp_path / "bad.jsonl", ["{broken", json.dumps({"prompt": "", "answer": "1"})])
    with pytest.raises(ValueError, match=r"bad.jsonl: no usable records \(0 blank lines, 2 left out: line 1: "
                                         r"invalid JSON"):
        load_jsonl(only_bad, on_bad="skip")


def test_jsonl_streams_and_empty_file_is_an_error(tmp_path):
    path = _write(tmp_path / "s.jsonl", [json.dumps({"prompt": "p", "answer": "a"}), "{broken"])
    reader = iter(JsonlReader(path))
    assert next(reader).prompt == "p"  # the first record arrives before the bad line is read
    with pytest.raises(ValueError, match="s.jsonl:2"):
        next(reader)
    with pytest.raises(ValueError, match=r"e.jsonl: no usable records \(2 blank lines, 0 left out\)"):
        load_jsonl(_write(tmp_path / "e.jsonl", ["", ""]))


def test_shuffled_iterator_epochs_are_permutations():
    items = list(range(20))
    it = ShuffledIterator(items, seed=3)
    first, second = it.take(20), it.take(20)
    assert sorted(first) == items and sorted(second) == items
    assert first != items and first != second
    assert ShuffledIterator(items, seed=3).take(40) == first + second
    assert ShuffledIterator(items, seed=4).take(20) != first
    assert ShuffledIterator(items, shuffle=False).take(25) == items + items[:5]


def test_shuffled_iterator_resumes_from_saved_position(tmp_path):
    items = [f"item{i}" for i in range(7)]
    it = ShuffledIterator(items, seed=11)
    it.take(9)  # into the second epoch
    state = json.loads(json.dumps(it.state_dict()))  # survives a checkpoint file
    assert (state["epoch"], state["index"]) == (1, 2)
    expected = it.take(12)
    resumed = ShuffledIterator(items, seed=11)
    resumed.load_state_dict(state)
    assert resumed.take(12) == expected
    with pytest.raises(ValueError, match=r"num_items=7 but this iterator has num_items=6"):
        ShuffledIterator(items[:6], seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed=11 but this iterator has seed=12"):
        ShuffledIterator(items, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing \['epoch'\]"):
        ShuffledIterator(items, seed=11).load_state_dict({k: v for k, v in state.items() if k != "epoch"})
