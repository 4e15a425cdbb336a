"""Mixtures of experts: counts against hand routing, exact denominators, merge and DDP, planted
experts, unobserved neurons, and interventions against hand-computed MoE blocks.

Tiny random models of each family (2 layers, 4 experts, top-2) are built from configs and cast
to float64, so the hand computations (other matmul shapes) cannot flip a sign near zero.
"""

from __future__ import annotations

import json
import math

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from langneurons import moe
from langneurons.arch import ExpertSites, is_moe, locate_activations, locate_experts
from langneurons.corpus import Corpus, Example
from langneurons.errors import ArchitectureError, LangNeuronsError, NeuronMapError, StatsError
from langneurons.identify import identify
from langneurons.intervene import deactivate
from langneurons.record import RecordConfig, Recorder, record
from langneurons.stats import ActivationStats, LanguageStats, merge_runs
from tiny import SAMPLE_TEXTS, make_tokenizer

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
E, I, TOP_K, SHARED = 4, 16, 2, 24


def moe_config(family: str, vocab_size: int, layers: int = 2):
    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=TOP_K, max_position_embeddings=256, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if family == "mixtral":
        return transformers.MixtralConfig(num_local_experts=E, intermediate_size=I, **common)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(num_experts=E, moe_intermediate_size=I, shared_expert_intermediate_size=SHARED,
                                           **common)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(num_experts=E, moe_intermediate_size=I, head_dim=8, **common)
    if family == "olmoe":
        return transformers.OlmoeConfig(num_experts=E, intermediate_size=I, **common)
    raise ValueError(family)


def make_moe(family: str, vocab_size: int, seed: int = 0, dtype=torch.float64):
    """float64 needs the eager experts kernel of transformers (grouped_mm takes float32/bf16 only)."""
    torch.manual_seed(seed)
    kernel = "eager" if dtype == torch.float64 else None
    model = transformers.AutoModelForCausalLM.from_config(moe_config(family, vocab_size), attn_implementation="eager",
                                                          experts_implementation=kernel)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def family_model(request, tok):
    return request.param, make_moe(request.param, len(tok))


def corpus(langs=("en", "de", "zh")) -> Corpus:
    return Corpus({lang: [Example(lang, text=f"{t} ({i})") for i in range(2) for t in SAMPLE_TEXTS[lang]]
                   for lang in langs})


# -- the independent computation: route by hand ---------------------------------------------------
def block_inputs(model, ids):
    """The input of every layer's MoE block for one unpadded sequence (plain pre-hooks)."""
    got = {}
    layers = model.model.layers
    hs = [layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: got.__setitem__(i, args[0].reshape(-1, args[0].shape[-1])))
          for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in hs:
        h.remove()
    return [got[i] for i in range(len(layers))]


def hand_counts(model, tokenizer, examples, config=RecordConfig()):
    """positive [L, E*I+S], routed [L, E], mass [L, E], tokens: one sequence at a time, the router's
    top-k taken by hand from softmax(h W_r^T), each expert's gate h W_gate[e]^T computed by hand
    (its sign is the SiLU's sign)."""
    rec = Recorder(model, tokenizer, RecordConfig(scope=config.scope, batch_size=1, buckets=0),
                   sites=locate_experts(model))
    L = len(model.model.layers)
    S = SHARED if hasattr(model.model.layers[0].mlp, "shared_expert") else 0
    pos = torch.zeros(L, E * I + S, dtype=torch.int64)
    routed = torch.zeros(L, E, dtype=torch.int64)
    mass = torch.zeros(L, E, dtype=torch.float64)
    tokens = 0
    for enc in rec.encode(examples):
        keep = torch.tensor(enc.counted)
        tokens += int(keep.sum())
        for layer, h in enumerate(block_inputs(model, enc.input_ids)):
            block = model.model.layers[layer].mlp
            h = h[keep]
            probs = torch.softmax((h @ block.gate.weight.T).float(), -1)
            mass[layer] += probs.sum(0).double()
            top = probs.topk(TOP_K, -1).indices
            for e in range(E):
                rows = (top == e).any(-1)
                routed[layer, e] += int(rows.sum())
                gate = h[rows] @ block.experts.gate_up_proj[e, :I].T
                pos[layer, e * I:(e + 1) * I] += (gate > 0).sum(0)
            if S:
                pos[layer, E * I:] += ((h @ block.shared_expert.gate_proj.weight.T) > 0).sum(0)
    return pos, routed, mass, tokens


def hand_block(block, h, masked=(), forced=(), strength=1.0):
    """A MoE block's output computed token by token from its weights (optionally with experts
    removed from the router, or forced: logit := the token's best + log strength, picked first):
    the reference for the eager loop, `mask_experts` and `route_experts`."""
    logits = h @ block.gate.weight.T
    best = logits.max(-1).values.clone()
    for e in masked:
        logits[:, e] = -torch.inf
    for e in forced:
        logits[:, e] = best + math.log(strength)
    probs = torch.softmax(logits.float(), -1)
    val, idx = probs.topk(TOP_K, -1)
    for t in range(h.shape[0]):  # forced experts first (the most probable of them), then the rest
        order = sorted(forced, key=lambda e: -float(probs[t, e]))[:TOP_K]
        rest = [int(e) for e in probs[t].argsort(descending=True) if int(e) not in order]
        pick = torch.tensor((order + rest)[:TOP_K])
        idx[t], val[t] = pick, probs[t, pick]
    if getattr(block.gate, "norm_topk_prob", True):
        val = val / val.sum(-1, keepdim=True)
    val = val.to(h.dtype)
    out = torch.zeros_like(h)
    ex = block.experts
    for t in range(h.shape[0]):
        for s in range(TOP_K):
            e = int(idx[t, s])
            g, u = (ex.gate_up_proj[e] @ h[t]).chunk(2)
            out[t] += val[t, s] * (ex.down_proj[e] @ (F.silu(g) * u))
    if hasattr(block, "shared_expert"):
        sh = block.shared_expert
        out += torch.sigmoid(h @ block.shared_expert_gate.weight.T) * sh.down_proj(F.silu(sh.gate_proj(h)) * sh.up_proj(h))
    return out


# -- architecture ------------------------------------------------------------------------------
def test_sites_of_every_family(family_model):
    family, model = family_model
    assert is_moe(model)
    sites = locate_activations(model)  # MoE models get ExpertSites from the common entry point
    assert isinstance(sites, ExpertSites) and sites.family == family
    S = SHARED if family == "qwen2_moe" else 0
    assert (sites.num_layers, sites.num_experts, sites.expert_size, sites.shared_size, sites.top_k) == (2, E, I, S, TOP_K)
    assert sites.num_neurons == E * I + S
    assert (sites.shared_acts is not None) == (family == "qwen2_moe")
    assert sites.expert_of(torch.tensor([0, I - 1, I, E * I - 1])).tolist() == [0, 0, 1, E - 1]
    with pytest.raises(ArchitectureError, match="mixture of experts"):
        sites.add_hooks(lambda layer, out: None)  # a dense hook would count nonsense: refused


def test_logit_lens_reads_moe_models(family_model, tok):
    """The lens's unembedding of a MoE family: the last block's output through it = the logits."""
    from langneurons.arch import locate_unembedding

    _, model = family_model
    un = locate_unembedding(model)
    got = {}
    h = un.layers[-1].register_forward_hook(lambda _m, _i, out: got.update(h=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok("How many apples are left?")["input_ids"]])).logits
        h.remove()
        torch.testing.assert_close(un.logits(got["h"]), logits, rtol=1e-10, atol=1e-10)


def test_mixed_dense_and_moe_layers_refused(tok):
    cfg = moe_config("qwen3_moe", len(tok))
    cfg.mlp_only_layers = [1]
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ArchitectureError, match=r"layers \[1\] are dense"):
        locate_experts(model)


def test_eager_loop_equals_hand_block_and_the_model(family_model, tok):
    """The experts loop langneurons runs (with a callback attached) gives the block output of the
    hand formula and of the model's own kernel."""
    family, model = family_model
    ids = tok("Die Katze saß auf der warmen Matte.")["input_ids"]
    h = block_inputs(model, ids)[0]
    block = model.model.layers[0].mlp
    with torch.no_grad():
        own = block(h.unsqueeze(0)).reshape(h.shape)
        sites = locate_experts(model)

        class Nop:
            calls = 0

            def start(self, layer, rows):
                Nop.calls += 1

            def expert(self, layer, e, token_idx, act):
                return None

        with moe._attached(sites, Nop()):
            ours = block(h.unsqueeze(0)).reshape(h.shape)
        assert Nop.calls == 1
        assert "forward" not in sites.modules[0].__dict__  # restored
        torch.testing.assert_close(ours, hand_block(block, h.clone()), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours, own, rtol=1e-10, atol=1e-10)


def test_eager_loop_matches_the_default_fused_kernel(tok):
    """float32 with transformers' default experts kernel (grouped_mm): the same block output
    up to float32 rounding, and recording leaves the kernel in place afterwards."""
    model = make_moe("qwen3_moe", len(tok), dtype=torch.float32)
    assert model.config._experts_implementation != "eager"
    ids = torch.tensor([tok("Es regnete den ganzen Tag in der Stadt.")["input_ids"]])
    with torch.no_grad():
        own = model(input_ids=ids).logits
        mask = torch.zeros(2, E * I, dtype=torch.bool)
        mask[0, 0] = True
        with moe.deactivate_neurons(model, mask):
            pass
        assert torch.equal(model(input_ids=ids).logits, own)
        sites = locate_experts(model)

        class Nop:
            def start(self, layer, rows):
                pass

            def expert(self, layer, e, token_idx, act):
                return None

        with moe._attached(sites, Nop()):
            ours = model(input_ids=ids).logits
    torch.testing.assert_close(ours, own, rtol=1e-4, atol=1e-4)


# -- recording -----------------------------------------------------------------------------------
def test_counts_equal_hand_routing(family_model, tok, tmp_path):
    """Batched, right-padded recording (batch 3) = one sequence at a time routed by hand:
    positives, routed-token denominators, router mass, tokens; plus the MoE invariants."""
    family, model = family_model
    c = corpus()
    stats = record(model, tok, c, tmp_path / "run", RecordConfig(batch_size=3), progress=False)
    assert moe.is_moe_stats(stats) and stats.meta["moe"]["top_k"] == TOP_K
    for k, lang in enumerate(c.languages):
        pos, routed, mass, tokens = hand_counts(model, tok, c.by_lang[lang])
        assert int(stats.tokens[k]) == tokens
        assert torch.equal(stats.extra[moe.ROUTED][k], routed), (family, lang)
        assert torch.equal(stats.positive[k], pos), (family, lang)
        torch.testing.assert_close(stats.extra[moe.MASS][k], mass, rtol=1e-6, atol=1e-6)
        assert torch.equal(routed.sum(-1), torch.full((2,), TOP_K * tokens))  # every token chose top_k experts
    moe.check_moe_stats(stats)
    # p uses the expert's routed tokens; the shared expert's denominator is every token
    denom = moe.neuron_denominators(stats)
    assert torch.equal(denom[:, :, :I], stats.extra[moe.ROUTED][:, :, :1].expand(-1, -1, I))
    if family == "qwen2_moe":
        assert torch.equal(denom[:, :, E * I:], stats.tokens.view(-1, 1, 1).expand(-1, 2, SHARED))
    # what was written is what was returned, and it resumes (nothing recorded again)
    again = ActivationStats.load(tmp_path / "run")
    assert torch.equal(again.extra[moe.ROUTED], stats.extra[moe.ROUTED])
    before = (tmp_path / "run" / "stats" / "en.safetensors").read_bytes()
    record(model, tok, c, tmp_path / "run", RecordConfig(batch_size=2), progress=False)
    assert (tmp_path / "run" / "stats" / "en.safetensors").read_bytes() == before


def test_response_scope_counts_only_responses(tok, tmp_path):
    model = make_moe("mixtral", len(tok))
    pairs = [("What is two plus two?", "Four."), ("Name a colour.", "Blue, like the sky.")]
    c = Corpus({"en": [Example("en", prompt=p, response=r) for p, r in pairs],
                "de": [Example("de", prompt=p, response=r) for p, r in [("Wie heißt du?", "Ich heiße Anna.")]]})
    cfg = RecordConfig(scope="response", batch_size=2)
    stats = record(model, tok, c, tmp_path / "r", cfg, progress=False)
    for k, lang in enumerate(c.languages):
        pos, routed, _, tokens = hand_counts(model, tok, c.by_lang[lang], cfg)
        assert int(stats.tokens[k]) == tokens and torch.equal(stats.positive[k], pos)
        assert torch.equal(stats.extra[moe.ROUTED][k], routed)


def test_shard_merge_is_exact(tok, tmp_path):
    model = make_moe("qwen2_moe", len(tok))
    c = corpus(("en", "zh"))
    full = record(model, tok, c, tmp_path / "full", RecordConfig(batch_size=4), progress=False)
    for i in range(2):
        record(model, tok, c, tmp_path / f"s{i}", RecordConfig(batch_size=2, shard=(i, 2)), progress=False)
    merged = merge_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert torch.equal(merged.positive, full.positive) and torch.equal(merged.tokens, full.tokens)
    assert torch.equal(merged.extra[moe.ROUTED], full.extra[moe.ROUTED])
    torch.testing.assert_close(merged.extra[moe.MASS], full.extra[moe.MASS], rtol=1e-12, atol=1e-9)
    on_disk = ActivationStats.load(tmp_path / "merged")
    assert torch.equal(on_disk.extra[moe.ROUTED], full.extra[moe.ROUTED])
    moe.check_moe_stats(on_disk)


def test_stats_without_routed_counts_do_not_merge_with_moe_stats():
    a = LanguageStats("en", torch.zeros(2, 8, dtype=torch.int64), 5, extra={moe.ROUTED: torch.zeros(2, 4, dtype=torch.int64)})
    b = LanguageStats("en", torch.zeros(2, 8, dtype=torch.int64), 5)
    with pytest.raises(StatsError, match="different extra counts"):
        a + b
    bad = LanguageStats("en", torch.zeros(2, 8, dtype=torch.int64), 5,
                        extra={moe.ROUTED: torch.tensor([[1, 2, 3, -1]] * 2)})
    with pytest.raises(StatsError, match="negative"):
        bad.validate()


def test_inconsistent_moe_stats_refused():
    routed = torch.tensor([[3, 1, 2, 0]])  # 1 layer, top-2 of 4 experts, 3 tokens
    good = LanguageStats("en", torch.zeros(1, 4 * 2, dtype=torch.int64), 3, meta={"moe": {"top_k": 2, "expert_size": 2,
                                                                                         "num_experts": 4}},
                         extra={moe.ROUTED: routed})
    moe.check_moe_stats(good)
    over = LanguageStats("en", good.positive.clone(), 3, meta=good.meta, extra={moe.ROUTED: routed})
    over.positive[0, 2] = 2  # expert 1 received 1 token
    with pytest.raises(StatsError, match="more tokens than its expert received"):
        moe.check_moe_stats(over)
    short = LanguageStats("en", good.positive, 3, meta=good.meta, extra={moe.ROUTED: torch.tensor([[3, 1, 1, 0]])})
    with pytest.raises(StatsError, match="top_k"):
        moe.check_moe_stats(short)


DDP_SCRIPT = r'''
import sys, torch
sys.path.insert(0, sys.argv[3])
from test_moe import make_moe, corpus
from tiny import make_tokenizer
from langneurons.record import RecordConfig, record
from langneurons import distributed
tok = make_tokenizer()
model = make_moe("qwen2_moe", len(tok))
record(model, tok, corpus(("en", "zh")), sys.argv[1], RecordConfig(batch_size=int(sys.argv[2])), progress=False)
distributed.shutdown()
'''


def test_ddp_two_gloo_ranks_equal_one_process(tok, tmp_path):
    """torchrun, 2 CPU ranks on gloo: the all-reduced counts (positives, routed, mass, tokens)
    equal a single-process run."""
    from test_scale import child_env

    model = make_moe("qwen2_moe", len(tok))
    single = record(model, tok, corpus(("en", "zh")), tmp_path / "one", RecordConfig(batch_size=3), progress=False)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "two"), "2", str(Path(__file__).parent)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = ActivationStats.load(tmp_path / "two")
    assert torch.equal(got.positive, single.positive) and torch.equal(got.tokens, single.tokens)
    assert torch.equal(got.extra[moe.ROUTED], single.extra[moe.ROUTED])
    torch.testing.assert_close(got.extra[moe.MASS], single.extra[moe.MASS], rtol=1e-12, atol=1e-9)
    assert '"processes": 2' in (tmp_path / "two" / "manifest.json").read_text()


# -- planted: an expert only one language reaches ------------------------------------------------
def planted_model(tok, only: str, others=("en", "de")):
    """Layer 0's expert 0 receives exactly the tokens that occur only in ``only``'s texts.

    Layer 0's attention output is zeroed (o_proj = 0), so its MoE block reads the embeddings;
    those tokens get embedding coordinate 0 = 10, all tokens coordinate 1 = 1; the router
    scores expert 0 with 8·x0 − 8·x1 and every other expert with 4·x1 (+ small noise): the
    marked tokens pick expert 0 first, every other token never picks it."""
    model = make_moe("mixtral", len(tok), seed=1)
    mine = {i for t in SAMPLE_TEXTS[only] for i in tok(f"{t} (0)")["input_ids"] + tok(f"{t} (1)")["input_ids"]}
    theirs = {i for lang in others for t in SAMPLE_TEXTS[lang] for j in range(2) for i in tok(f"{t} ({j})")["input_ids"]}
    marked = sorted(mine - theirs - set(tok.all_special_ids))
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.05)
        emb[:, 1] = 1.0
        emb[marked, 0] = 10.0
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        w = model.model.layers[0].mlp.gate.weight
        w.normal_(0, 0.01)
        w[0, 0], w[0, 1] = 8.0, -8.0
        w[1:, 0], w[1:, 1] = 0.0, 4.0
    return model, marked


def test_planted_expert_is_found_and_its_neurons_are_unobserved_elsewhere(tok, tmp_path):
    model, marked = planted_model(tok, "zh")
    c = corpus(("en", "de", "zh"))
    stats = record(model, tok, c, tmp_path / "run", RecordConfig(batch_size=4), progress=False)
    routed = stats.extra[moe.ROUTED]
    assert routed[0, 0, 0] == 0 and routed[1, 0, 0] == 0  # en, de never reach expert (0, 0)
    assert routed[2, 0, 0] > 20  # zh does

    cfg = moe.MoeIdentifyConfig(min_routed=5)
    nmap = moe.identify_moe(stats, top_rate=0.05, bar=0.9, lam=0.0, moe=cfg)
    emap = moe.experts_map(nmap)
    assert emap.language_mask("zh", ("specific",))[0, 0]  # zh's expert
    for lang in ("en", "de"):
        assert not emap.language_mask(lang, ("specific", "related"))[0, 0]
    summary = moe.moe_summary(nmap)
    assert [0, 0] in summary["specific_experts"]["zh"]

    observed = nmap.extras["observed"]
    block = slice(0, I)  # the neurons of expert 0 in layer 0
    assert not observed[0, 0, block].any() and not observed[1, 0, block].any() and observed[2, 0, block].all()
    assert (nmap.classes[0, block] == 0).all()  # unobserved in en/de: not classified at all
    for lang in c.languages:
        assert not nmap.language_mask(lang, ("specific", "related", "general"))[0, block].any()
    assert nmap.meta["moe"]["unobserved"]["en"] >= I
    # the dense recipe (p over all tokens) would have called them silent in en/de: zh-specific
    dense = identify(ActivationStats(stats.languages, stats.positive, stats.tokens), top_rate=0.05, bar=0.9, lam=0.0)
    assert dense.language_mask("zh", ("specific",))[0, block].any()


def test_planted_stats_specific_neuron_and_rules():
    """Counts built by hand: every expert reached by every language, one neuron of expert 1
    in layer 1 fires for 'de' only -> the top de-specific neuron; p uses the routed tokens."""
    K, L = 3, 2
    langs = ["en", "de", "zh"]
    tokens = torch.tensor([1000, 1000, 1000])
    routed = torch.full((K, L, E), 500, dtype=torch.int64)  # top-2 of 4, uniform
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(200, 300, (K, L, E * I), generator=g)
    pos[:, 1, 1 * I + 3] = torch.tensor([0, 450, 0])
    stats = ActivationStats(langs, pos, tokens, meta={"moe": {"num_experts": E, "expert_size": I, "top_k": 2}},
                            extra={moe.ROUTED: routed, moe.MASS: routed.double() / 2})
    p, observed = moe.neuron_probs(stats)
    assert observed.all() and float(p[1, 1, I + 3]) == pytest.approx(0.9)  # 450 / 500, not 450 / 1000
    nmap = moe.identify_moe(stats, top_rate=0.01, lam=0.0)
    assert nmap.language_mask("de", ("specific",))[1, I + 3]
    assert nmap.invariant_violation() is None
    # below min_routed a language does not observe the expert
    stats.extra[moe.ROUTED][0, 0, 2] = 19
    _, observed = moe.neuron_probs(stats, min_routed=20)
    assert not observed[0, 0, 2 * I:3 * I].any() and observed[1, 0, 2 * I:3 * I].all()
    with pytest.raises(LangNeuronsError, match="min-routed"):
        moe.MoeIdentifyConfig(min_routed=0).validate()


def test_identify_stage_dispatches_and_map_roundtrips(tok, tmp_path):
    from langneurons.config import IdentifyConfig
    from langneurons.neurons import NeuronMap
    from langneurons.stages import IdentifyStage

    model, _ = planted_model(tok, "zh")
    record(model, tok, corpus(("en", "de", "zh")), tmp_path / "run", RecordConfig(batch_size=4), progress=False)
    nmap = IdentifyStage(tmp_path / "run", IdentifyConfig(top_rate=0.05, lam=0.0)).run_stage()
    assert "observed" in nmap.extras and nmap.meta["moe"]["min_routed"] == moe.DEFAULT_MIN_ROUTED
    again = NeuronMap.load(tmp_path / "run")
    assert torch.equal(again.extras["observed"], nmap.extras["observed"])
    moe.experts_map(again)


# -- interventions -------------------------------------------------------------------------------
def block_io(model, ids, layer=0):
    got = {}
    block = model.model.layers[layer].mlp
    h = block.register_forward_hook(lambda _m, args, out: got.update(x=args[0].reshape(-1, args[0].shape[-1]),
                                                                      y=out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    h.remove()
    return got["x"], got["y"]


def test_zeroing_all_neurons_of_an_expert_equals_zeroing_its_down_projection(family_model, tok):
    family, model = family_model
    sites = locate_experts(model)
    ids = tok("Wir gingen am Morgen zum Markt.")["input_ids"]
    emask = torch.zeros(2, E, dtype=torch.bool)
    emask[1, 2] = True
    mask = moe.expert_neuron_mask(sites, emask)  # every neuron of expert 2 in layer 1
    assert mask.sum() == I and mask[1, 2 * I:3 * I].all()
    with torch.no_grad():
        base = model(input_ids=torch.tensor([ids])).logits
        with deactivate(model, mask) as iv:  # the common entry point dispatches to moe
            ours = model(input_ids=torch.tensor([ids])).logits
        iv.check_fired()
        assert iv.calls == [0, 1]
        down = model.model.layers[1].mlp.experts.down_proj
        saved = down[2].clone()
        down[2].zero_()
        ref = model(input_ids=torch.tensor([ids])).logits
        down[2].copy_(saved)
    assert not torch.allclose(ours, base)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    with torch.no_grad(), deactivate(model, torch.zeros_like(mask)):  # empty mask: the model untouched
        assert torch.equal(model(input_ids=torch.tensor([ids])).logits, base)


def test_single_neuron_scale_and_shared_neurons(tok):
    model = make_moe("qwen2_moe", len(tok))
    sites = locate_experts(model)
    ids = tok("Утром мы пошли на рынок.")["input_ids"]
    mask = torch.zeros(2, sites.num_neurons, dtype=torch.bool)
    mask[0, E * I + 5] = True  # shared-expert neuron 5 of layer 0
    mask[0, 1 * I + 7] = True  # expert 1, neuron 7
    with torch.no_grad():
        with moe.deactivate_neurons(model, mask, mode="scale", factor=0.0):
            ours = model(input_ids=torch.tensor([ids])).logits
        blk = model.model.layers[0].mlp
        saved_sh, saved_ex = blk.shared_expert.down_proj.weight[:, 5].clone(), blk.experts.down_proj[1][:, 7].clone()
        blk.shared_expert.down_proj.weight[:, 5] = 0
        blk.experts.down_proj[1][:, 7] = 0
        ref = model(input_ids=torch.tensor([ids])).logits
        blk.shared_expert.down_proj.weight[:, 5] = saved_sh
        blk.experts.down_proj[1][:, 7] = saved_ex
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    with pytest.raises(NeuronMapError, match="another model"):
        with moe.deactivate_neurons(model, torch.zeros(2, 7, dtype=torch.bool)):
            pass


def test_mask_experts_equals_hand_routing_without_them(family_model, tok):
    family, model = family_model
    ids = tok("The cat sat on the warm mat.")["input_ids"]
    x, y = block_io(model, ids)
    emask = torch.zeros(2, E, dtype=torch.bool)
    emask[0, 1] = emask[0, 3] = True
    seen = []
    with moe.mask_experts(model, emask) as iv:
        hook = model.model.layers[0].mlp.gate.register_forward_hook(lambda _m, _i, out: seen.append(out[2]))
        xm, ym = block_io(model, ids)
        hook.remove()
    assert iv.calls[0] == 1 and not any(((s == 1) | (s == 3)).any() for s in seen)
    torch.testing.assert_close(xm, x)  # layer 0's input is before the mask
    with torch.no_grad():
        torch.testing.assert_close(ym, hand_block(model.model.layers[0].mlp, x.clone(), masked=(1, 3)),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y, hand_block(model.model.layers[0].mlp, x.clone()), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ym, y)
    crowded = torch.zeros(2, E, dtype=torch.bool)
    crowded[1, :3] = True
    with pytest.raises(NeuronMapError, match="fewer than top_k"):
        with moe.mask_experts(model, crowded):
            pass


def test_force_experts_equals_hand_routing(family_model, tok):
    """route_experts(force=...): the forced experts take the token's best logit + log strength and
    are picked first; with remove= as well, removed ones are never picked."""
    family, model = family_model
    ids = tok("Wir gingen am Morgen zum Markt.")["input_ids"]
    x, y = block_io(model, ids)
    force = torch.zeros(2, E, dtype=torch.bool)
    force[0, 2] = True
    remove = torch.zeros(2, E, dtype=torch.bool)
    remove[0, 0] = True
    block = model.model.layers[0].mlp
    for strength, rm in ((1.0, None), (4.0, None), (0.5, remove)):
        seen = []
        with moe.route_experts(model, force=force, remove=rm, strength=strength) as iv:
            hook = block.gate.register_forward_hook(lambda _m, _i, out: seen.append(out[2]))
            _, yf = block_io(model, ids)
            hook.remove()
        assert iv.calls[0] == 1 and (seen[0] == 2).any(-1).all()  # every token reaches the forced expert
        if rm is not None:
            assert not (seen[0] == 0).any()
        with torch.no_grad():
            want = hand_block(block, x.clone(), masked=(0,) if rm is not None else (), forced=(2,), strength=strength)
        torch.testing.assert_close(yf, want, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(yf, y)
    with pytest.raises(LangNeuronsError, match="strength"):
        with moe.route_experts(model, force=force, strength=0):
            pass


def test_prompt_positions_patch_only_the_prompt(tok):
    """positions='prompt' with prompt_length: logits before it change, the rest of a prefill reads
    a changed cache but its own routing is the router's."""
    model = make_moe("mixtral", len(tok))
    ids = torch.tensor([tok("Die Katze saß auf der warmen Matte.")["input_ids"]])
    force = torch.zeros(2, E, dtype=torch.bool)
    force[:, 1] = True
    seen = []
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        hook = gate.register_forward_hook(lambda _m, _i, out: seen.append(out[2]))
        base = model(input_ids=ids).logits
        hook.remove()
        with moe.route_experts(model, force=force, positions="prompt", prompt_length=3):
            hook = gate.register_forward_hook(lambda _m, _i, out: seen.append(out[2]))  # after the router edit
            got = model(input_ids=ids).logits
            hook.remove()
    natural, edited = seen
    assert (edited[:3] == 1).any(-1).all()
    assert torch.equal(edited[3:], natural[3:])  # layer 0 after the prompt: the router's own choice
    assert not (natural[:3] == 1).any(-1).all()  # (the forcing changed something)
    assert not torch.allclose(got[:, :3], base[:, :3])
    # expert neurons at prompt positions: layer 0's block output changes below 3 only
    outs = []
    block = model.model.layers[0].mlp
    mask = torch.zeros(2, E * I, dtype=torch.bool)
    mask[0, :] = True
    with torch.no_grad():
        h = block.register_forward_hook(lambda _m, _i, out: outs.append(out.reshape(-1, out.shape[-1])))
        model(input_ids=ids)
        with moe.deactivate_neurons(model, mask, positions="prompt", prompt_length=3):
            model(input_ids=ids)
        h.remove()
    torch.testing.assert_close(outs[1][3:], outs[0][3:], rtol=0, atol=0)
    assert not torch.allclose(outs[1][:3], outs[0][:3])


def test_generated_positions_patch_only_new_tokens(tok):
    """positions='generated' with prompt_length: the prompt's logits stay, later ones change."""
    model = make_moe("mixtral", len(tok))
    ids = torch.tensor([tok("Die Katze saß auf der warmen Matte.")["input_ids"]])
    mask = torch.zeros(2, E * I, dtype=torch.bool)
    mask[:, :] = True
    emask = torch.zeros(2, E, dtype=torch.bool)
    emask[:, 0] = True
    with torch.no_grad():
        base = model(input_ids=ids).logits
        for ctx in (moe.deactivate_neurons(model, mask, positions="generated", prompt_length=4),
                    moe.mask_experts(model, emask, positions="generated", prompt_length=4)):
            with ctx:
                got = model(input_ids=ids).logits
            torch.testing.assert_close(got[:, :4], base[:, :4], rtol=0, atol=0)
            assert not torch.allclose(got[:, 4:], base[:, 4:])


def test_ablation_matrix_runs_on_a_moe_map(tok, tmp_path):
    """The ablation matrix (evaluate.ablation_matrix) takes a MoE neuron map unchanged: its
    deactivate calls reach the experts."""
    from langneurons.evaluate import ablation_matrix

    model, _ = planted_model(tok, "zh")
    c = corpus(("en", "de", "zh"))
    stats = record(model, tok, c, tmp_path / "run", RecordConfig(batch_size=4), progress=False)
    nmap = moe.identify_moe(stats, top_rate=0.1, bar=0.7, lam=0.0, moe=moe.MoeIdentifyConfig(min_routed=5))
    texts = {lang: [e.text for e in c.by_lang[lang][:2]] for lang in c.languages}
    df = ablation_matrix(model, tok, nmap, texts, neuron_sets=("specific",), control=None, progress=False)
    ablated = df[(df.neuron_set == "specific") & (df.metric == "ppl")]
    assert len(ablated) == 9 and (ablated.ablated != ablated.base).any()


def test_meta_and_errors(tok, tmp_path):
    model = make_moe("olmoe", len(tok))
    with pytest.raises(LangNeuronsError, match="mlp-act-path"):
        record(model, tok, corpus(("en",)), tmp_path / "x", RecordConfig(act_path="model.layers.{i}.mlp"),
               progress=False)
    with pytest.raises(StatsError, match="no routed-token counts"):
        moe.neuron_probs(ActivationStats(["en", "de"], torch.zeros(2, 1, 4, dtype=torch.int64), torch.tensor([1, 1])))


def test_report_section_and_heatmap(tok, tmp_path):
    """The full report of a MoE run: anatomy as for dense models plus the MoE section with the
    per-layer table (unobserved neurons) and the layer x expert heatmap per language."""
    from langneurons.config import IdentifyConfig
    from langneurons.report.html import build_report
    from langneurons.report.moe import specialisation
    from langneurons.stages import IdentifyStage

    model, _ = planted_model(tok, "zh")
    run = tmp_path / "run"
    stats = record(model, tok, corpus(("en", "de", "zh")), run, RecordConfig(batch_size=4), progress=False)
    IdentifyStage(run, IdentifyConfig(top_rate=0.1, bar=0.7, lam=0.0)).run_stage()
    page = build_report(run).read_text(encoding="utf-8")
    assert 'id="section-moe"' in page and "unobserved en" in page and "Language-specific experts" in page
    assert (run / "figures" / "moe_experts.png").is_file()
    q = specialisation(moe.routing_shares(stats))
    assert float(q[2, 0, 0]) == 1.0 and float(q[0, 0, 0]) == 0.0  # only zh reaches expert (0, 0)
    torch.testing.assert_close(q.sum(0), torch.ones(2, E))


def test_whole_expert_sets_in_the_ablation_matrix(tok, tmp_path):
    """`experts:specific` removes a language's specific experts (router logits masked) inside the
    ablation matrix: each cell equals a perplexity computed by hand under moe.mask_experts, and
    its control draws the same number of other experts per layer, outside every selected one."""
    from langneurons.config import parse_class_sets
    from langneurons.evaluate import plan_jobs, ablation_matrix, perplexity

    model, _ = planted_model(tok, "zh")
    c = corpus(("en", "de", "zh"))
    stats = record(model, tok, c, tmp_path / "run", RecordConfig(batch_size=4), progress=False)
    nmap = moe.identify_moe(stats, top_rate=0.1, bar=0.7, lam=0.0, moe=moe.MoeIdentifyConfig(min_routed=5))
    emap = moe.experts_map(nmap)
    assert parse_class_sets("experts:specific;specific") == ("experts:specific", "specific")
    texts = {lang: [e.text for e in c.by_lang[lang][:2]] for lang in c.languages}
    df = ablation_matrix(model, tok, nmap, texts, neuron_sets=("experts:specific",), control="layer",
                         control_seeds=(0,), metrics=("nll",), progress=False)
    real = df[df.neuron_set == "experts:specific"]
    assert len(real) == 9
    for lang in c.languages:
        mask = emap.language_mask(lang, ("specific",))
        for j in c.languages:
            row = real[(real.deactivated_lang == lang) & (real.eval_lang == j)].iloc[0]
            base = perplexity(model, tok, texts[j]).nll
            if mask.any():
                with moe.mask_experts(model, mask):
                    want = perplexity(model, tok, texts[j]).nll
            else:
                want = base
            assert row.ablated == pytest.approx(want, rel=1e-9, abs=1e-12), (lang, j)
    assert bool(emap.language_mask("zh", ("specific",)).any())  # the planted expert is removed for zh
    jobs = plan_jobs(nmap, c.languages, ("experts:specific",), "layer", (0, 1))
    for job in jobs:
        if job.neuron_set.startswith("random:"):
            real_mask = emap.language_mask(job.lang, ("specific",))
            assert torch.equal(job.mask.sum(1), real_mask.sum(1))
            excluded = real_mask | emap.selected
            for layer in range(job.mask.shape[0]):
                if int((~excluded[layer]).sum()) >= int(real_mask[layer].sum()):  # enough others to draw from
                    assert not (job.mask[layer] & excluded[layer]).any(), (job.lang, layer)


def test_whole_expert_sets_in_the_multiple_choice_matrix(tok, tmp_path):
    """Multiple-choice accuracy under `experts:specific`: each question's chosen letter equals
    the one scored by hand under moe.mask_experts."""
    from langneurons.choice import ChoiceQuestion, choice_accuracy_matrix, score_choices

    model, _ = planted_model(tok, "zh")
    c = corpus(("en", "de", "zh"))
    stats = record(model, tok, c, tmp_path / "run", RecordConfig(batch_size=4), progress=False)
    nmap = moe.identify_moe(stats, top_rate=0.1, bar=0.7, lam=0.0, moe=moe.MoeIdentifyConfig(min_routed=5))
    emap = moe.experts_map(nmap)
    questions = {lang: [ChoiceQuestion(lang, e.text, tuple(x.text for x in c.by_lang[lang][i:i + 3]), 1)
                        for i, e in enumerate(c.by_lang[lang][:3])] for lang in c.languages}
    preds: list[dict] = []
    df = choice_accuracy_matrix(model, tok, nmap, questions, neuron_sets=("experts:specific",), control=None,
                                progress=False, predictions=preds)
    assert set(df.metric) == {"choice_accuracy"} and len(df) == 9
    mask = emap.language_mask("zh", ("specific",))
    assert mask.any()
    changed = 0
    for j in c.languages:
        with moe.mask_experts(model, mask):
            want = score_choices(model, tok, questions[j])
        changed += want.loglik != score_choices(model, tok, questions[j]).loglik
        got = [p["predicted"] for p in preds if p["neuron_set"] == "experts:specific" and p["deactivated_lang"] == "zh"
               and p["eval_lang"] == j]
        assert got == ["ABC"[i] for i in want.predicted]
        row = df[(df.deactivated_lang == "zh") & (df.eval_lang == j)].iloc[0]
        assert row.ablated == pytest.approx(want.accuracy)
    assert changed  # the masked expert changes some scores: the comparison can tell


def test_whole_expert_sets_in_the_generated_accuracy_matrix(tok, tmp_path):
    """MGSM-style accuracy under `experts:specific`: every generation equals greedy decoding by
    hand under moe.mask_experts (the router is masked at the prompt and at every new token)."""
    from langneurons.evaluate import MathExample, accuracy_matrix, generate

    model, _ = planted_model(tok, "zh")
    c = corpus(("en", "de", "zh"))
    stats = record(model, tok, c, tmp_path / "run", RecordConfig(batch_size=4), progress=False)
    nmap = moe.identify_moe(stats, top_rate=0.1, bar=0.7, lam=0.0, moe=moe.MoeIdentifyConfig(min_routed=5))
    mask = moe.experts_map(nmap).language_mask("zh", ("specific",))
    assert mask.any()
    problems = {lang: [MathExample(lang, prompt=e.text, response="3", answer="3") for e in c.by_lang[lang][:2]]
                for lang in c.languages}
    gens: list[dict] = []
    changed = 0
    accuracy_matrix(model, tok, nmap, problems, neuron_sets=("experts:specific",), control=None, progress=False,
                    max_new_tokens=4, chat=False, generations=gens, langs=["zh"])
    for j in c.languages:
        prompts = [e.prompt for e in problems[j]]
        plain = generate(model, tok, prompts, max_new_tokens=4, chat=False)
        with moe.mask_experts(model, mask):
            want = generate(model, tok, prompts, max_new_tokens=4, chat=False)
        got = [g["output"] for g in gens if g["neuron_set"] == "experts:specific" and g["requested_lang"] == j]
        assert got == want
        assert [g["output"] for g in gens if g["neuron_set"] == "none" and g["requested_lang"] == j] == plain
        changed += want != plain
    assert changed  # the masked expert changes some generation: the comparison can tell


def _moe_steer_run(tok, tmp_path):
    """A run directory of the planted model: stats, a MoE neuron map with its expert-level map,
    held-out documents for the prompts."""
    import json

    from langneurons.runs import RunDir

    model, _ = planted_model(tok, "zh")
    c = corpus(("en", "de", "zh"))
    run = tmp_path / "run"
    stats = record(model, tok, c, run, RecordConfig(batch_size=4), progress=False)
    nmap = moe.identify_moe(stats, top_rate=0.1, bar=0.7, lam=0.0, moe=moe.MoeIdentifyConfig(min_routed=5))
    nmap.save(run / "neurons.safetensors")
    lines = [json.dumps({"lang": k, "text": t}) for k in ("en", "de", "zh") for t in SAMPLE_TEXTS[k]]
    (run / "eval_corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    fp = RunDir(run).read_manifest()["model"]["model_fingerprint"]
    return model, nmap, run, fp


def test_steering_with_whole_experts(tok, tmp_path):
    """`experts` steering forces the target's experts into the router's top-k: each generation
    equals greedy decoding by hand under moe.route_experts; `random-experts` forces as many other
    experts per layer; a dense map refuses the methods in one line."""
    from types import SimpleNamespace

    from langneurons.lm import GenerateConfig, generate
    from langneurons.stages import SteerStage
    from langneurons.steer import SteerConfig

    model, nmap, run, fp = _moe_steer_run(tok, tmp_path)
    emap = moe.experts_map(nmap)
    force = emap.language_mask("zh", ("specific",))
    assert force.any()
    loaded = SimpleNamespace(model=model, tokenizer=tok, fingerprint=fp)
    cfg = SteerConfig(sources=["en"], targets=["zh"], methods=("experts", "random-experts"), strengths=(1.0, 8.0),
                      prompts=2, max_new_tokens=4, batch_size=4, control_seeds=(0,))
    stage = SteerStage(run, cfg, loaded=loaded)
    df = stage.run_stage()
    assert sorted(df.groupby("method").size().items()) == [("experts", 2), ("none", 1), ("random-experts", 2)]
    assert set(df.loc[df.method == "experts", "n_neurons"]) == {int(force.sum())}  # forced experts
    assert set(df.loc[df.method.str.contains("experts"), "mode"]) == {"force"}
    gens = [json.loads(x) for x in (run / "steer_generations.jsonl").read_text().splitlines()]
    gcfg = GenerateConfig(max_new_tokens=4, batch_size=4).validate()
    for strength in (1.0, 8.0):
        mine = [g for g in gens if g["method"] == "experts" and g["strength"] == strength]
        assert len(mine) == 2
        want = generate(model, tok, [g["prompt"] for g in mine], gcfg,
                        batch_context=lambda w, s=strength: moe.route_experts(model, force=force, strength=s,
                                                                              prompt_length=w))
        assert [g["output"] for g in mine] == [w.text for w in want]
    plain = [g["output"] for g in gens if g["method"] == "none"]
    assert [g["output"] for g in gens if g["method"] == "experts" and g["strength"] == 8.0] != plain
    # the neuron methods on the same MoE map: set to the target's means over routed tokens
    both = SteerStage(run, SteerConfig(sources=["en"], targets=["zh"], methods=("neurons", "random"),
                                       strengths=(2.0,), prompts=2, max_new_tokens=4, batch_size=4),
                      loaded=loaded).run_stage()
    assert {"neurons", "random", "experts"} <= set(both.method)
    from langneurons.errors import NeuronMapError

    dense = nmap.__class__(nmap.languages, nmap.classes, nmap.active, nmap.selected, None, {})
    with pytest.raises(NeuronMapError, match="mixture-of-experts run: this neuron map has no expert-level"):
        SteerStage(run, SteerConfig(sources=["en"], targets=["zh"], methods=("experts",), prompts=1,
                                    max_new_tokens=2), loaded=loaded, nmap=dense).run_stage()


def test_means_of_expert_neurons_are_over_their_routed_tokens(tok, tmp_path):
    """ActivationStats.means() of MoE stats: an expert neuron's mean activation act_fn(h W_gate)
    over the tokens routed to its expert (by hand, one sequence at a time), not over all tokens."""
    model = make_moe("mixtral", len(tok))
    c = corpus(("en",))
    stats = record(model, tok, c, tmp_path / "run", RecordConfig(batch_size=3), progress=False)
    rec = Recorder(model, tok, RecordConfig(batch_size=1, buckets=0), sites=locate_experts(model))
    L = len(model.model.layers)
    sums = torch.zeros(L, E, I, dtype=torch.float64)
    routed = torch.zeros(L, E, dtype=torch.float64)
    for enc in rec.encode(c.by_lang["en"]):
        keep = torch.tensor(enc.counted)
        for layer, h in enumerate(block_inputs(model, enc.input_ids)):
            block = model.model.layers[layer].mlp
            h = h[keep]
            top = torch.softmax((h @ block.gate.weight.T).float(), -1).topk(TOP_K, -1).indices
            for e in range(E):
                rows = (top == e).any(-1)
                routed[layer, e] += float(rows.sum())
                sums[layer, e] += F.silu(h[rows] @ block.experts.gate_up_proj[e, :I].T).double().sum(0)
    want = sums / routed.clamp(min=1).unsqueeze(-1)
    got = stats.means()[0].reshape(L, E, I)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(got, (stats.sums[0] / stats.tokens[0]).reshape(L, E, I))
