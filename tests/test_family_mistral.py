"""The Mistral family, added as one file (``bridge/families/mistral.py``): Megatron logits equal
transformers' at TP=1, TP=2 and PP=2, untied and tied, and HF -> Megatron -> HF is bit-exact."""
import pytest
import torch
from safetensors.torch import load_file

from megatron_rlfp16.testing.distributed import run_on_ranks

IDS = (torch.arange(2 * 12).reshape(2, 12) * 37 + 5) % 300
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def _make(path, tie):
    import transformers

    cfg = transformers.MistralConfig(
        vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-6,
        sliding_window=None, tie_word_embeddings=tie, rope_theta=10000.0,
    )
    torch.manual_seed(3)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


def _worker(dirs):
    from test_bridge_parity import pipeline_logits

    from megatron_rlfp16.bridge import export_hf, load_hf_checkpoint
    from megatron_rlfp16.models import build_model, causal_mask, read_config_json
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    out = {}
    for variant, hf_dir in dirs.items():
        for layout, (tp, pp) in LAYOUTS.items():
            init_runtime(ParallelConfig(tp=tp, pp=pp))
            model, arch = build_model(read_config_json(hf_dir), parallel_output=False)
            model.eval()
            load_hf_checkpoint(model, arch, hf_dir)
            with torch.no_grad():
                b, s = IDS.shape
                logits = (model(IDS, torch.arange(s)[None].expand(b, s), causal_mask(s)) if pp == 1
                          else pipeline_logits(model, IDS))
            exported = {n: t.clone() for n, t in export_hf(model, arch, receivers=0)}
            out[variant, layout] = dict(family=arch.family, exported=exported,
                                        logits=None if logits is None else logits[..., :arch.vocab_size].clone())
    return out


@pytest.mark.ranks
def test_mistral_matches_transformers_and_round_trips(tmp_path):
    from megatron_rlfp16.testing.tiny import hf_logits

    dirs = {"untied": _make(tmp_path / "untied", False), "tied": _make(tmp_path / "tied", True)}
    per_rank = run_on_ranks(_worker, 2, dirs, timeout=600)
    for variant, hf_dir in dirs.items():
        reference = hf_logits(hf_dir, IDS)
        original = load_file(f"{hf_dir}/model.safetensors")
        for layout in LAYOUTS:
            assert per_rank[0][variant, layout]["family"] == "mistral"
            got = [r[variant, layout]["logits"] for r in per_rank if r[variant, layout]["logits"] is not None]
            assert got
            for logits in got:
                assert (logits - reference).abs().max().item() <= 1e-4, (variant, layout)
            exported = per_rank[0][variant, layout]["exported"]
            assert sorted(exported) == sorted(original)
            assert all(torch.equal(exported[n], t) for n, t in original.items()), (variant, layout)


def test_mistral_with_a_sliding_window_is_refused():
    from megatron_rlfp16.models import ConfigError, parse_hf_config

    cfg = dict(model_type="mistral", vocab_size=300, hidden_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, sliding_window=4096)
    with pytest.raises(ConfigError, match=r"config field 'sliding_window'=4096 is not supported; supported: null"):
        parse_hf_config(cfg)
    assert parse_hf_config(dict(cfg, sliding_window=None)).family == "mistral"
