"""Routing replay in the trainer on real Megatron ranks: every router uses exactly the given experts,
and log-probs and gradients equal an independent reference routed by the same experts.

Routes are random (distinct experts per token and layer: almost never what a router would choose),
with no route at each sequence's last token and on padding. For Qwen3-MoE and Mixtral at TP=1 (with
full activation recompute, so the forward inside backward replays too), TP=2 with sequence
parallelism, PP=2 and EP=2 (one 2-rank job), and TP=2 × EP=2 with whole experts (4 ranks):

- a forward hook on every Megatron ``TopKRouter`` records the routing map it hands to the dispatcher
  in every forward (π_old pass, the update's forward, the recompute in backward); each must equal the
  given routes for this rank's tokens (Megatron's ``[S, B]`` order, the rank's sequence shard);
- π_old log-probs equal transformers' forward with its routers forced to the same experts
  (``megatron_rlfp16.testing.routing``);
- the update's gradients (``main_grad``, gathered by the bridge) equal that transformers model's
  gradients of the same policy loss, the routers' included (replay gathers their scores).
"""
import pytest
import torch
import torch.distributed as dist

from megatron_rlfp16.losses import PolicyLossConfig, policy_loss
from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.routing import checkpoint_named_grads, hf_model_routed_by, random_routes
from megatron_rlfp16.testing.tiny import MOE_FAMILIES, make_tiny_model

pytestmark = pytest.mark.ranks

LAYOUTS = {"tp1_recompute": (1, 1, 1), "tp2_sp": (2, 1, 1), "pp2": (1, 2, 1), "ep2": (1, 1, 2)}
FOLDED = {"tp2_ep2_etp1": (2, 1, 2)}
"""4 ranks: TP=2 with sequence parallelism and EP=2 with whole experts (etp=1), the plan's MoE default."""
B, S, PROMPT = 4, 12, 3
LENGTHS = (12, 9, 7, 12)
CONFIG = PolicyLossConfig(loss="ppo_clip", agg="token-mean")


def batch(num_layers, topk, num_experts):
    ids = (torch.arange(B * S).reshape(B, S) * 37 + 5) % 300
    target_pos = torch.arange(1, S)
    mask = torch.stack([(target_pos >= PROMPT) & (target_pos < n) for n in LENGTHS]).float()
    for b, n in enumerate(LENGTHS):
        ids[b, n:] = 0
    routes = random_routes(B, S, num_layers, topk, num_experts, seed=1, lengths=LENGTHS)
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    return dict(input_ids=ids, routes=routes, loss_mask=mask, advantages=advantages)


def _grads(model, arch):
    from megatron_rlfp16.bridge import Bridge, ShardContext, export_hf_weights

    named = [(name, p.main_grad) for name, p in model.named_parameters()]
    return {n: t.clone() for n, t in export_hf_weights(named, Bridge(arch), ShardContext.from_megatron(model))}


def _worker(dirs, layouts):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.megatron import compute_logprobs, routing, train_step, wrap_ddp
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    results = {}
    for family in MOE_FAMILIES:
        for layout, (tp, pp, ep) in layouts.items():
            init_runtime(ParallelConfig(tp=tp, pp=pp, ep=ep, etp=1 if ep > 1 else None))
            overrides = (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
                         if layout == "tp1_recompute" else None)
            model, arch = build_model(read_config_json(dirs[family]), config_overrides=overrides)
            load_hf_checkpoint(model, arch, dirs[family])
            ddp = wrap_ddp(model)
            hub = routing.install(ddp)
            cfg = model.config
            mb = batch(cfg.num_layers, cfg.moe_router_topk, cfg.num_moe_experts)
            seen = []  # (layer, in backward, chosen experts sorted) per router call

            def hook(module, args, output):
                chosen = output[1].to(torch.int8).topk(module.topk, dim=1).indices.sort(dim=1).values
                seen.append((module.layer_number - 1, routing._in_backward(), chosen.clone()))

            for m in model.modules():
                if isinstance(m, TopKRouter):
                    m.register_forward_hook(hook)

            hub.phase(replay=True, compare=True)
            old = compute_logprobs(ddp, [dict(input_ids=mb["input_ids"], routes=mb["routes"])],
                                   vocab_size=arch.vocab_size)
            agreement = hub.agreement()
            hub.finish()
            hub.phase(replay=True)
            train_step(ddp, [dict(mb, old_logprobs=old, rollout_logprobs=old)], CONFIG, vocab_size=arch.vocab_size)
            hub.finish()

            rows = mb["routes"].transpose(0, 1)  # the router's [S, B] token order
            if cfg.sequence_parallel:
                per = S // tp
                rows = rows[ps.get_tensor_model_parallel_rank() * per:][:per]
            wrong, checked, kinds, calls = 0, 0, set(), len(seen)
            layers = sorted({c[0] for c in seen})
            for layer, backward, chosen in seen:
                want = rows[:, :, layer].reshape(-1, cfg.moe_router_topk).long()
                given = want[:, 0] >= 0
                wrong += int((chosen[given] != want[given].sort(dim=1).values).any(dim=1).sum())
                checked += int(given.sum())
                kinds.add(backward)
            grads = _grads(model, arch)

            # R2: the π_old pass records the routers' own choice; the update replays it even after the
            # routers have moved (here: their weights shuffled between the two passes).
            hub.phase(record=True)
            compute_logprobs(ddp, [dict(input_ids=mb["input_ids"])], vocab_size=arch.vocab_size)
            recorded = hub.recorded()
            hub.finish()
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, TopKRouter):
                        m.weight.copy_(m.weight.flip(0))
            seen.clear()
            hub.phase(replay=True)
            own = dict(mb, old_logprobs=old, rollout_logprobs=old, own_routes=recorded[0])
            train_step(ddp, [own], CONFIG, vocab_size=arch.vocab_size)
            hub.finish()
            r2_wrong = sum(int((chosen != recorded[0][layer].sort(dim=1).values).any(dim=1).sum())
                           for layer, backward, chosen in seen)
            results[family, layout] = dict(
                old=old.clone(), agreement=agreement, wrong=wrong, checked=checked, calls=calls,
                backward_seen=True in kinds, layers=layers, grads=grads,
                r2_wrong=r2_wrong, r2_calls=len(seen), r2_recorded=len(recorded))
    if dist.get_world_size() == 2:  # a dense model has nothing to replay
        init_runtime(ParallelConfig())
        dense, _ = build_model(read_config_json(dirs["llama"]))
        try:
            routing.install(dense)
            results["dense"] = None
        except ValueError as err:
            results["dense"] = str(err)
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    dirs = {f: make_tiny_model(f, str(root / f), seed=2) for f in (*MOE_FAMILIES, "llama")}
    per_rank = run_on_ranks(_worker, 2, dirs, LAYOUTS, timeout=900)
    folded = run_on_ranks(_worker, 4, dirs, FOLDED, timeout=900)
    cases = {key: [r[key] for r in ranks] for ranks in (per_rank, folded) for key in ranks[0]}
    cases["dense"] = cases["dense"][0]
    reference = {}
    for family in MOE_FAMILIES:
        hf_dir = dirs[family]
        model, set_routes = hf_model_routed_by(hf_dir)
        cfg = model.config
        mb = batch(cfg.num_hidden_layers, cfg.num_experts_per_tok,
                   getattr(cfg, "num_experts", None) or cfg.num_local_experts)
        set_routes(mb["routes"])
        logits = model(mb["input_ids"]).logits.float()
        lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, mb["input_ids"][:, 1:, None]).squeeze(-1)
        loss, _ = policy_loss(lp, lp.detach(), lp.detach(), mb["advantages"], mb["loss_mask"].bool(), CONFIG)
        loss.backward()
        reference[family] = dict(old=lp.detach(), grads=checkpoint_named_grads(model), mask=mb["loss_mask"].bool())
    return cases, reference


CASES = [(f, layout) for f in MOE_FAMILIES for layout in [*LAYOUTS, *FOLDED]]


@pytest.mark.parametrize("family,layout", CASES)
def test_every_router_call_uses_the_given_experts(runs, family, layout):
    cases, _ = runs
    for rank, r in enumerate(cases[family, layout]):
        assert r["checked"] > 0 and r["wrong"] == 0, (rank, r["wrong"], r["checked"])
        # π_old + the update's forward (+ the recompute in backward) on every local layer
        forwards = 3 if layout == "tp1_recompute" else 2
        assert r["calls"] == forwards * len(r["layers"]), (rank, r["calls"], r["layers"])
        assert r["backward_seen"] == (layout == "tp1_recompute")
    assert sorted({l for r in cases[family, layout] for l in r["layers"]}) == [0, 1]


@pytest.mark.parametrize("family,layout", CASES)
def test_replayed_logprobs_and_gradients_equal_the_routed_reference(runs, family, layout):
    cases, reference = runs
    ref = reference[family]
    mask = ref["mask"]
    for r in cases[family, layout]:
        assert (r["old"][mask] - ref["old"][mask]).abs().max() < 2e-5
        # random routes are almost never the routers' own choice
        assert r["agreement"]["router/agreement"] < 0.5
        assert r["agreement"]["router/tokens_disagree"] > 0.5
    grads = cases[family, layout][0]["grads"]
    assert set(grads) == set(ref["grads"]), set(grads) ^ set(ref["grads"])
    for name, g in grads.items():
        want = ref["grads"][name]
        assert torch.allclose(g, want, atol=2e-6, rtol=1e-4), (name, (g - want).abs().max())
    routers = [n for n in grads if n.endswith("gate.weight")]
    assert routers and all(grads[n].abs().sum() > 0 for n in routers)  # the router learns through replay



@pytest.mark.parametrize("family,layout", CASES)
def test_r2_replays_the_routing_recorded_in_the_old_logprob_pass(runs, family, layout):
    cases, _ = runs
    for r in cases[family, layout]:
        assert r["r2_recorded"] == 1  # one micro-batch
        assert r["r2_calls"] == (2 if layout == "tp1_recompute" else 1) * len(r["layers"])  # update (+ recompute)
        assert r["r2_wrong"] == 0


def test_replay_on_a_dense_model_is_refused(runs):
    cases, _ = runs
    assert cases["dense"] == ("routing replay needs a mixture-of-experts model; this model has no MoE router "
                              "(routing_replay: use 'none' for dense models)")
