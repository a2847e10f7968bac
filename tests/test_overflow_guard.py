"""OverflowGuard and promote_to_fp32 on small FP16 models with planted blow-ups.

Every expected value is derived by hand from the planted weights (see `planted_model`), not read
back from the guard.
"""
import collections
import copy
import warnings

import pytest
import torch
from torch import nn

from megatron_rlfp16.precision import (
    FP16_MAX,
    FP16HeadroomWarning,
    OverflowGuard,
    promote_to_fp32,
)

WIDTH = 8


def planted_model(hot_scale: float, hot_dense: bool = False) -> nn.Sequential:
    """inp -> act -> hot -> down -> out, in float16, with every activation known exactly.

    With inputs of all ones: ``inp`` (10·I) gives 10, ``act`` (tanh) gives exactly 1.0 in FP16,
    ``hot`` gives hot_scale (diagonal) or WIDTH·hot_scale (dense, all weights hot_scale), ``down``
    (1e-4·I) brings it back to a few units and ``out`` (0.01) to a few hundredths.
    """
    model = nn.Sequential(collections.OrderedDict(
        inp=nn.Linear(WIDTH, WIDTH),
        act=nn.Tanh(),
        hot=nn.Linear(WIDTH, WIDTH),
        down=nn.Linear(WIDTH, WIDTH),
        out=nn.Linear(WIDTH, 2),
    ))
    eye = torch.eye(WIDTH)
    with torch.no_grad():
        model.inp.weight.copy_(10 * eye)
        dense = torch.full((WIDTH, WIDTH), hot_scale)
        model.hot.weight.copy_(dense if hot_dense else hot_scale * eye)
        model.down.weight.copy_(1e-4 * eye)
        model.out.weight.fill_(0.01)
        for layer in (model.inp, model.hot, model.down, model.out):
            layer.bias.zero_()
    return model.half()


def ones(batch: int = 4) -> torch.Tensor:
    return torch.ones(batch, WIDTH, dtype=torch.float16)


def test_planted_blowup_warns_before_overflow_and_names_the_module():
    model = planted_model(hot_scale=30000.0)  # 30000 is exact in FP16 (spacing 16 there)
    with OverflowGuard(model, warn_fraction=0.25) as guard:
        y = model(ones())
        assert torch.isfinite(y).all()  # no overflow yet: the guard must speak before it happens
        with pytest.warns(FP16HeadroomWarning, match=r"hot \(activation\): max \|x\| = 30000"):
            flagged = guard.step()
    assert [(s.name, s.kind) for s in flagged] == [("hot", "activation")]
    worst = guard.report(top_k=3)
    assert worst[0].name == "hot"
    assert worst[0].max_abs == 30000.0
    assert worst[0].headroom == pytest.approx(FP16_MAX / 30000.0)
    assert not worst[0].nonfinite
    # The rest of the table, by hand: inp 10, act 1, down 3 (1e-4 in FP16 times 30000), out ~0.24.
    by_name = {s.name: s for s in guard.report(top_k=None)}
    assert by_name["inp"].max_abs == 10.0
    assert by_name["act"].max_abs == 1.0
    assert by_name["down"].max_abs == pytest.approx(3.0, rel=1e-3)
    assert by_name["out"].max_abs == pytest.approx(WIDTH * 0.01 * 3.0, rel=1e-2)
    headrooms = [s.headroom for s in guard.report(top_k=None)]
    assert headrooms == sorted(s.headroom for s in by_name.values())


def test_threshold_is_warn_fraction_of_fp16_max():
    model = planted_model(hot_scale=8192.0)  # headroom 8x: quiet at 1/4, loud at 1/8
    with OverflowGuard(model, warn_fraction=0.25) as quiet:
        model(ones())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert quiet.step() == []
    with OverflowGuard(model, warn_fraction=0.1) as loud:
        model(ones())
        with pytest.warns(FP16HeadroomWarning, match="hot"):
            assert [s.name for s in loud.step()] == ["hot"]


def test_inf_is_flagged_as_nonfinite():
    model = planted_model(hot_scale=30000.0, hot_dense=True)  # 8 * 30000 > 65504: inf
    guard = OverflowGuard(model).attach()
    y = model(ones())
    assert not torch.isfinite(y).all()
    with pytest.warns(FP16HeadroomWarning, match=r"hot \(activation\): produced inf/nan"):
        flagged = guard.step()
    names = {s.name for s in flagged}
    assert "hot" in names and not names & {"inp", "act"}  # upstream of the overflow stays clean
    stats = {s.name: s for s in guard.report(top_k=None)}
    assert stats["hot"].nonfinite and stats["hot"].max_abs == float("inf")
    assert stats["hot"].headroom == 0.0
    assert not stats["act"].nonfinite
    guard.detach()


def test_nan_counts_as_nonfinite():
    model = nn.Sequential(collections.OrderedDict(ident=nn.Identity()))
    with OverflowGuard(model) as guard:
        model(torch.tensor([1.0, float("nan")], dtype=torch.float16))
    (stat,) = guard.report()
    assert stat.nonfinite and stat.headroom == 0.0


def test_each_module_warns_once_until_reset():
    model = planted_model(hot_scale=30000.0)
    with OverflowGuard(model) as guard:
        model(ones())
        with pytest.warns(FP16HeadroomWarning):
            guard.step()
        model(ones())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert guard.step() == []
        guard.reset()
        assert guard.report() == []
        model(ones())
        with pytest.warns(FP16HeadroomWarning):
            assert [s.name for s in guard.step()] == ["hot"]


def test_check_every_defers_the_host_sync(monkeypatch):
    model = planted_model(hot_scale=30000.0)
    guard = OverflowGuard(model, check_every=3).attach()

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync on a step that should not check")

    with monkeypatch.context() as patched:
        for name in ("item", "tolist", "cpu", "numpy"):
            patched.setattr(torch.Tensor, name, no_sync)
        for _ in range(2):
            model(ones())
            assert guard.step() == []
    model(ones())
    with pytest.warns(FP16HeadroomWarning):
        assert [s.name for s in guard.step()] == ["hot"]
    assert guard.report(top_k=1)[0].count == 3
    guard.detach()


def test_gradients_are_tracked_against_fp16_too():
    model = planted_model(hot_scale=1.0)
    with OverflowGuard(model, track_grads=True) as guard:
        x = ones().requires_grad_(True)
        loss = model(x).float().sum() * 20000.0  # a loss scale that leaves 3.3x headroom
        loss.backward()
        with pytest.warns(FP16HeadroomWarning, match=r"out \(grad\)"):
            flagged = guard.step()
    assert [(s.name, s.kind) for s in flagged] == [("out", "grad")]
    grads = {s.name: s for s in guard.report(top_k=None) if s.kind == "grad"}
    assert grads["out"].max_abs == 20000.0
    # d loss / d down = out.weight^T · 20000 = 2 · 0.01 · 20000, exactly representable here.
    assert grads["down"].max_abs == pytest.approx(400.0, rel=1e-3)


def test_tracks_min_nonzero_and_subnormal_outputs():
    model = nn.Sequential(collections.OrderedDict(big=nn.Identity(), tiny=nn.Identity()))
    guard = OverflowGuard(model, track_min=True, modules=["big"]).attach()
    model(torch.tensor([0.0, 3e-5, -2.0], dtype=torch.float16))
    (stat,) = guard.report()
    assert stat.min_nonzero_abs == pytest.approx(3e-5, rel=1e-2)
    assert not stat.below_normal
    guard.detach()
    guard = OverflowGuard(model, modules=["tiny"]).attach()
    model(torch.tensor([0.0, 3e-5], dtype=torch.float16))
    (stat,) = guard.report()
    assert stat.below_normal and stat.min_nonzero_abs is None


class TupleAndDict(nn.Module):
    """Megatron-style ``(hidden, bias)`` outputs with a None, and a dict output."""

    def __init__(self):
        super().__init__()
        self.pair = nn.Identity()

    def forward(self, x):
        hidden, _ = self.pair((x, None))
        return {"hidden": hidden * 2, "ids": torch.arange(3)}


def test_nested_outputs_and_module_filters():
    model = TupleAndDict()
    x = torch.tensor([1.0, -5.0], dtype=torch.float16)
    with OverflowGuard(model, modules=lambda name, m: True) as guard:  # root included
        model(x)
    stats = {s.name: s.max_abs for s in guard.report()}
    assert stats == {"": 10.0, "pair": 5.0}
    only = OverflowGuard(model, modules="pair")
    assert only.module_names == ["pair"]
    default = OverflowGuard(model)
    assert default.module_names == ["pair"]  # the root is left out by default


class Double(nn.Module):
    def forward(self, x):
        return x * 2


class InPlaceShift(nn.Module):
    """Returns its child's output object after changing it in place."""

    def __init__(self):
        super().__init__()
        self.twice = Double()

    def forward(self, x):
        y = self.twice(x)
        y.add_(1000.0)
        return y


def test_shared_output_objects_are_measured_correctly():
    model = nn.Sequential(collections.OrderedDict(shift=InPlaceShift()))
    x = torch.tensor([1.0, -3.0], dtype=torch.float16)
    with OverflowGuard(model, modules=lambda name, m: True) as guard:
        model(x)
    stats = {s.name: s.max_abs for s in guard.report(top_k=None)}
    # shift.twice saw [2, -6]; shift and the root return that same object after += 1000.
    assert stats == {"shift.twice": 6.0, "shift": 1002.0, "": 1002.0}


def test_detach_removes_every_hook():
    model = planted_model(hot_scale=30000.0)

    def hook_counts():
        modules = model.named_modules()
        return {n: (len(m._forward_hooks), len(m._backward_hooks)) for n, m in modules}

    before = hook_counts()
    guard = OverflowGuard(model, track_grads=True).attach()
    assert all(len(m._forward_hooks) == before[n][0] + 1 for n, m in model.named_modules() if n)
    x = ones().requires_grad_(True)
    y = model(x)  # tensor hooks now sit on this graph
    guard.detach()
    assert not guard.attached
    assert hook_counts() == before
    counts = {(s.name, s.kind): s.count for s in guard.report(top_k=None)}
    y.float().sum().backward()  # gradient hooks from before detach() record nothing
    model(ones())
    assert {(s.name, s.kind): s.count for s in guard.report(top_k=None)} == counts
    with pytest.raises(RuntimeError, match="already attached"):
        guard.attach().attach()
    guard.detach()


def test_bad_arguments_are_errors_naming_valid_choices():
    model = planted_model(hot_scale=1.0)
    with pytest.raises(ValueError, match=r"\['hott'\].*did you mean \['hot'\].*'inp'"):
        OverflowGuard(model, modules=["hott"])
    with pytest.raises(ValueError, match=r"\['nope'\].*Valid names include \['inp', 'act'"):
        promote_to_fp32(model, ["inp", "nope"])
    with pytest.raises(ValueError, match="warn_fraction"):
        OverflowGuard(model, warn_fraction=4.0)
    with pytest.raises(ValueError, match="check_every"):
        OverflowGuard(model, check_every=0)


def overflowing_block_model() -> nn.Sequential:
    """An FP16 model whose ``block`` overflows inside (8·30000) but returns 24, within range."""
    model = planted_model(hot_scale=30000.0, hot_dense=True)
    return nn.Sequential(collections.OrderedDict(
        pre=nn.Sequential(model.inp, model.act),
        block=nn.Sequential(collections.OrderedDict(up=model.hot, down=model.down)),
    ))


def test_fp32_island_keeps_an_inside_overflow_finite():
    model = overflowing_block_model()
    assert not torch.isfinite(model(ones())).all()  # plain FP16: inf, then 0·inf = nan
    reference = copy.deepcopy(model).float()(ones().float())
    assert promote_to_fp32(model, ["block"]) == ["block"]
    y = model(ones())
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all()
    # 8 · 30000 · fp16(1e-4), computed in FP32 then rounded once to FP16.
    expected = 8 * 30000.0 * float(torch.tensor(1e-4, dtype=torch.float16))
    assert y.float().allclose(torch.full_like(y.float(), expected), rtol=1e-3)
    assert y.float().allclose(reference, rtol=1e-3)


def test_fp32_island_computes_in_fp32_and_returns_the_input_dtype():
    model = overflowing_block_model()
    seen = {}
    model.block.up.register_forward_hook(
        lambda m, args, out: seen.update(input=args[0].dtype, output=out.dtype)
    )
    promote_to_fp32(model, "block")
    assert all(p.dtype == torch.float32 for p in model.block.parameters())
    assert all(p.dtype == torch.float16 for p in model.pre.parameters())
    x = ones().requires_grad_(True)
    y = model(x)
    assert seen == {"input": torch.float32, "output": torch.float32}
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()
    assert model.block.up.weight.grad.dtype == torch.float32
    # Idempotent, and a deep copy's island calls the copy's own weights.
    promote_to_fp32(model, ["block"])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.block.down.weight.zero_()
    assert torch.equal(twin(ones()), torch.zeros_like(y))
    assert not torch.equal(model(ones()), twin(ones()))


def test_fp32_island_disables_autocast_and_handles_token_ids():
    model = nn.Sequential(collections.OrderedDict(
        embed=nn.Embedding(10, WIDTH),
        proj=nn.Sequential(collections.OrderedDict(fc=nn.Linear(WIDTH, WIDTH))),
    )).half()
    seen = {}
    model.proj.fc.register_forward_hook(lambda m, args, out: seen.update(fc=out.dtype))
    promote_to_fp32(model, ["embed", "proj"])
    ids = torch.tensor([[1, 2, 3]])
    assert model.embed(ids).dtype == torch.float16  # int inputs: back to the pre-promotion dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(ids)
    assert seen["fc"] == torch.float32  # autocast would have made this bfloat16
    assert y.dtype == torch.float16
