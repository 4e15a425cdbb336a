"""Steering: modes against weight edits and hand computations, positions on a planted bigram
model, DiffMean against output_hidden_states, and the stage end to end on a tiny run."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import transformers

from langneurons.errors import LangNeuronsError
from langneurons.intervene import add_to_residual, deactivate
from langneurons.lm import generate
from langneurons.steer import (SteerConfig, best_settings, chrf, diffmean_vectors, harmonic_mean, layer_ranges,
                               merge_steer_rows, neuron_values, output_nll, residual_means, steer_prompts)
from tiny import SAMPLE_TEXTS, make_model


def _batch(tok, texts=("The cat sat on the mat.", "Кошка сидела на коврике.")):
    enc = tok(list(texts), return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------------------------------------
# modes on GPT-2 (plain MLP: c_proj(act(c_fc x)) + b) against weight edits
# ---------------------------------------------------------------------------------------------
def _gpt2_mask_values(model, seed=0):
    L, N = len(model.transformer.h), model.config.n_inner
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(L, N, dtype=torch.bool)
    for layer in range(L):
        mask[layer, torch.randperm(N, generator=g)[:6]] = True
    values = torch.randn(L, N, generator=g) * 2
    return mask, values


@pytest.mark.parametrize("mode", ["set", "add", "scale"])
def test_modes_equal_weight_edits_on_gpt2(tokenizer, mode):
    """set: a := v  <=> c_fc row zeroed (gelu(0) = 0) and c_proj bias += v @ W_proj[idx];
    add: a := a + v <=> c_proj bias += v @ W_proj[idx]; scale: a := c a <=> W_proj[idx] *= c."""
    model = make_model("gpt2", vocab_size=len(tokenizer))
    mask, values = _gpt2_mask_values(model)
    batch = _batch(tokenizer)
    base = _logits(model, batch)
    kw = {"factor": 1.7} if mode == "scale" else {"values": values}
    with deactivate(model, mask, mode=mode, **kw) as iv:
        hooked = _logits(model, batch)
    iv.check_fired()
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for layer, row in enumerate(mask):
            idx = row.nonzero().flatten()
            mlp = edited.transformer.h[layer].mlp
            if mode == "scale":
                mlp.c_proj.weight[idx] *= 1.7
                continue
            if mode == "set":
                mlp.c_fc.weight[:, idx] = 0
                mlp.c_fc.bias[idx] = 0
            mlp.c_proj.bias += values[layer, idx] @ mlp.c_proj.weight[idx]
    expected = _logits(edited, batch)
    assert not torch.allclose(hooked, base, atol=1e-3)
    torch.testing.assert_close(hooked, expected, atol=1e-4, rtol=1e-4)


def test_neuron_values_are_the_documented_statistics():
    means = torch.randn(3, 2, 5, dtype=torch.float64)
    langs = ["en", "de", "zh"]
    mode, _, v = neuron_values("set", 2.0, means, langs, "en", "zh")
    assert mode == "set" and torch.allclose(v, (2.0 * means[2]).float())
    mode, _, v = neuron_values("add", 0.5, means, langs, "en", "zh")
    assert mode == "add" and torch.allclose(v, (0.5 * (means[2] - means[0])).float())
    mode, factor, v = neuron_values("scale", 3.0, means, langs, "en", "zh")
    assert (mode, factor, v) == ("scale", 3.0, None)


def test_residual_add_equals_mlp_bias_edit_on_gpt2(tokenizer):
    """The block's output + v equals the same block with v added to its MLP's output bias."""
    model = make_model("gpt2", vocab_size=len(tokenizer))
    v = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(3))
    batch = _batch(tokenizer)
    with add_to_residual(model, {0: v}) as iv:
        hooked = _logits(model, batch)
    iv.check_fired()
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.transformer.h[0].mlp.c_proj.bias += v
    torch.testing.assert_close(hooked, _logits(edited, batch), atol=1e-4, rtol=1e-4)
    assert torch.equal(_logits(model, batch), _logits(copy.deepcopy(model), batch))  # hooks removed


def test_residual_add_checks_its_input(tokenizer, llama):
    with pytest.raises(LangNeuronsError, match="hidden size"):
        with add_to_residual(llama, {0: torch.zeros(5)}):
            pass
    with pytest.raises(LangNeuronsError, match="out of range"):
        with add_to_residual(llama, {7: torch.zeros(llama.config.hidden_size)}):
            pass
    with pytest.raises(LangNeuronsError, match="positions"):
        with add_to_residual(llama, {0: torch.zeros(llama.config.hidden_size)}, positions="middle"):
            pass


# ---------------------------------------------------------------------------------------------
# a planted bigram model: one Llama block whose attention writes nothing (o_proj = 0), so the
# next token depends only on the current one and every logit can be computed by hand
# ---------------------------------------------------------------------------------------------
V, H, N = 24, 16, 12
ZH = 7  # the planted "target-language" token
PLANTED = [0, 1, 2]  # the planted target-language neurons


def _bigram_model():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=N, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5)
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()  # attention writes nothing: a bigram model
        model.model.embed_tokens.weight[:, 0] = 3.0  # every token carries a constant coordinate
        mlp = layer.mlp
        mlp.up_proj.weight[PLANTED] = 0.0
        mlp.up_proj.weight[PLANTED, 0] = 1.0  # the planted neurons' up projection reads that coordinate
        model.lm_head.weight[ZH] = torch.linspace(-1, 1, H)
        mlp.down_proj.weight[:, PLANTED] = model.lm_head.weight[ZH].view(H, 1) * 0.5  # they write the ZH direction
    return model


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _hand_table(model, act_fn=lambda a: a, extra=None):
    """[V, V] next-token logits of every current token, computed from the weights by hand."""
    m = model.model
    eps = model.config.rms_norm_eps
    with torch.no_grad():
        e = m.embed_tokens.weight  # [V, H]; attention adds exactly 0 (o_proj = 0)
        mlp = m.layers[0].mlp
        x = _rms(e, m.layers[0].post_attention_layernorm.weight, eps)
        a = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T)
        h = e + (act_fn(a) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        if extra is not None:
            h = h + extra
        return _rms(h, m.norm.weight, eps) @ model.lm_head.weight.T


class _Tok:
    """A minimal tokenizer over ids: text 'a b c' <-> ids [a, b, c] (what lm.generate needs)."""

    pad_token_id, eos_token_id, chat_template = 0, 2, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {int(i)}" for i in ids)

    def get_added_vocab(self):
        return {}


def _chain(table_prompt, table_gen, last, steps, first_from_prompt=True):
    out = []
    tok = int(table_prompt[last].argmax()) if first_from_prompt else None
    out.append(tok)
    for _ in range(steps - 1):
        tok = int(table_gen[tok].argmax())
        out.append(tok)
    return out


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_planted_neurons_switch_the_output_exactly(positions):
    model = _bigram_model()
    tok = _Tok()
    base_table = _hand_table(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=torch.arange(3, V).view(1, -1)).logits[0], base_table[3:],
                                   atol=1e-4, rtol=1e-4)
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[0, PLANTED] = True
    means = torch.zeros(2, 1, N, dtype=torch.float64)
    means[1, 0, PLANTED] = 4.0  # the "zh" mean activation of the planted neurons
    mode, _, values = neuron_values("set", 2.0, means, ["en", "zh"], "en", "zh")
    keep = torch.tensor([n not in PLANTED for n in range(N)])

    def steer_act(a):
        return torch.where(keep, a, values[0].to(a.dtype))

    steered_table = _hand_table(model, steer_act)
    assert not (base_table.argmax(-1) == ZH).all()
    assert (steered_table.argmax(-1) == ZH).all(), "the planted set does not force the planted token"
    # the steered next-token distribution equals the hand computation
    with deactivate(model, mask, mode=mode, values=values):
        with torch.no_grad():
            got = model(input_ids=torch.arange(3, V).view(1, -1)).logits[0]
    torch.testing.assert_close(got, steered_table[3:], atol=1e-4, rtol=1e-4)

    prompt = [5, 9, 11]
    steps = 5
    gens = generate(model, tok, [" ".join(map(str, prompt))], max_new_tokens=steps, rendered=True,
                    add_special_tokens=False,
                    batch_context=lambda w: deactivate(model, mask, mode=mode, values=values, positions=positions,
                                                       prompt_length=w))
    first_table = steered_table if positions in ("all", "prompt") else base_table
    later_table = steered_table if positions in ("all", "generated") else base_table
    expected = _chain(first_table, later_table, prompt[-1], steps)
    assert gens[0].token_ids and gens[0].token_ids == expected[:len(gens[0].token_ids)]
    if positions == "all":
        assert expected == [ZH] * steps


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_residual_positions_on_the_bigram_model(positions):
    model = _bigram_model()
    tok = _Tok()
    v = model.lm_head.weight[ZH].detach() * 10.0
    base_table, steered_table = _hand_table(model), _hand_table(model, extra=v)
    assert (steered_table.argmax(-1) == ZH).all()
    prompt, steps = [4, 6], 4
    gens = generate(model, tok, [" ".join(map(str, prompt))], max_new_tokens=steps, rendered=True,
                    add_special_tokens=False,
                    batch_context=lambda w: add_to_residual(model, {0: v}, positions=positions, prompt_length=w))
    first_table = steered_table if positions in ("all", "prompt") else base_table
    later_table = steered_table if positions in ("all", "generated") else base_table
    expected = _chain(first_table, later_table, prompt[-1], steps)
    assert gens[0].token_ids == expected[:len(gens[0].token_ids)] and gens[0].token_ids


# ---------------------------------------------------------------------------------------------
# DiffMean against an independent computation
# ---------------------------------------------------------------------------------------------
def test_residual_means_equal_output_hidden_states_by_hand(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer), layers=3)
    texts = {"en": SAMPLE_TEXTS["en"], "de": SAMPLE_TEXTS["de"]}
    got = residual_means(model, tokenizer, texts, [0, 1], batch_size=3)
    for lang, ts in texts.items():
        total, count = torch.zeros(2, model.config.hidden_size, dtype=torch.float64), 0
        for t in ts:  # one text at a time, no padding
            enc = tokenizer(t, return_tensors="pt", return_special_tokens_mask=True)
            keep = enc["special_tokens_mask"][0] == 0
            with torch.no_grad():
                hs = model(input_ids=enc["input_ids"], output_hidden_states=True).hidden_states
            for i, layer in enumerate([0, 1]):
                total[i] += hs[layer + 1][0][keep].double().sum(0)
            count += int(keep.sum())
        torch.testing.assert_close(got[lang], total / count, atol=1e-5, rtol=1e-5)
    vecs = diffmean_vectors(got, [0, 1], "en", "de", 2.5)
    torch.testing.assert_close(vecs[1], (2.5 * (got["de"][1] - got["en"][1])).float())


# ---------------------------------------------------------------------------------------------
# measures and helpers
# ---------------------------------------------------------------------------------------------
def test_output_nll_equals_a_per_sequence_loop(tokenizer, llama):
    gens = generate(llama, tokenizer, ["The cat", "Кошка сидела на", "猫"], max_new_tokens=5, rendered=True)
    got = output_nll(llama, tokenizer, gens, batch_size=2)
    for g, (nll, n) in zip(gens, got):
        ids = torch.tensor([g.prompt_ids + g.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(llama(input_ids=ids).logits.float(), -1)[0]
        p = len(g.prompt_ids)
        ref = -sum(float(logp[p - 1 + i, t]) for i, t in enumerate(g.token_ids))
        assert n == len(g.token_ids)
        assert math.isclose(nll, ref, rel_tol=1e-4, abs_tol=1e-4)


def test_chrf_and_harmonic():
    assert chrf("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert chrf("", "the cat sat") == 0.0
    assert 0 < chrf("the cat sits", "the cat sat") < 1
    assert harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_mean(1.0, 0.0) == 0.0
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)


def test_prompts_are_parallel_prefixes():
    docs = {"en": ["one two three four five six seven eight nine ten"], "zh": ["一二三四五六七八九十"]}
    p = steer_prompts(docs, 5, 0.3)
    assert p["en"][0]["prompt"] == "one two three" and p["en"][0]["continuation"].startswith("four")
    assert p["zh"][0]["prompt"] == "一二三" and p["zh"][0]["continuation"] == "四五六七八九十"
    assert p["en"][0]["doc"] == p["zh"][0]["doc"] == 0


def test_layer_ranges_and_config_errors():
    assert layer_ranges("all;0-1;3", 4) == [("all", [0, 1, 2, 3]), ("0-1", [0, 1]), ("3", [3])]
    with pytest.raises(LangNeuronsError, match="layers"):
        layer_ranges("2-9", 4)
    for bad in (dict(mode="zero"), dict(positions="middle"), dict(strengths="x"), dict(methods=("magic",)),
                dict(prompt_fraction=1.5), dict(neurons="all")):
        with pytest.raises(LangNeuronsError):
            SteerConfig(**bad).validate()
    assert SteerConfig(strengths="best").validate().strengths == "best"


def test_best_settings_and_merge():
    import pandas as pd

    rows = [dict(method="neurons", mode="set", classes="specific", neurons="target", positions="both", layers="all",
                 strength=s, seed=None, src="en", tgt=t, harmonic=h, setting="x")
            for s, t, h in ((1.0, "de", 0.1), (1.0, "zh", 0.3), (2.0, "de", 0.4), (2.0, "zh", 0.4))]
    df = pd.DataFrame(rows)
    df["seed"] = df["seed"].astype("Int64")
    assert best_settings(df, "neurons") == (2.0, "all")
    assert best_settings(df, "diffmean") is None
    new = df.iloc[[0]].copy()
    new["harmonic"] = 0.9
    merged = merge_steer_rows(df, new)
    assert len(merged) == 4 and sorted(merged["harmonic"].tolist()) == [0.3, 0.4, 0.4, 0.9]
    other = new.copy()
    other["setting"] = "y"
    assert len(merge_steer_rows(df, other)) == 1  # rows of another setting are dropped


# ---------------------------------------------------------------------------------------------
# the stage on a tiny run directory
# ---------------------------------------------------------------------------------------------
def _tiny_run(tmp_path, tokenizer, model):
    from langneurons.neurons import NeuronMap
    from langneurons.runs import RunDir
    from langneurons.stats import ActivationStats

    langs = ["en", "de", "ru"]
    L, Nn = len(model.model.layers), model.config.intermediate_size
    g = torch.Generator().manual_seed(1)
    tokens = torch.full((3,), 1000, dtype=torch.int64)
    positive = torch.randint(0, 1000, (3, L, Nn), generator=g)
    sums = torch.randn(3, L, Nn, generator=g, dtype=torch.float64) * 100
    ActivationStats(langs, positive, tokens, sums, {"model": "tiny"}).save(tmp_path)
    classes = torch.zeros(L, Nn, dtype=torch.int8)
    active = torch.zeros(3, L, Nn, dtype=torch.bool)
    selected = torch.zeros(L, Nn, dtype=torch.bool)
    for k in range(3):
        for layer in range(L):
            idx = torch.arange(k * 4, k * 4 + 4)
            classes[layer, idx], active[k, layer, idx], selected[layer, idx] = 1, True, True
    NeuronMap(langs, classes, active, selected, None, {"model": "tiny"}).save(tmp_path / "neurons.safetensors")
    lines = [json.dumps({"lang": k, "text": t}) for k in langs for t in SAMPLE_TEXTS[k]]
    (tmp_path / "eval_corpus.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    RunDir(tmp_path).update_manifest({"model": {"model": "tiny", "model_fingerprint": "fp"}})
    return langs


def test_steer_stage_writes_table_generations_figures_and_section(tmp_path, tokenizer, llama):
    import pandas as pd

    from langneurons.report.steer import render_section
    from langneurons.stages import SteerStage

    langs = _tiny_run(tmp_path, tokenizer, llama)
    loaded = SimpleNamespace(model=llama, tokenizer=tokenizer, fingerprint="fp")
    cfg = SteerConfig(sources=["en"], targets=["de", "ru"], strengths=(1.0, 3.0), diffmean_strengths=(2.0,),
                      diffmean_layers=(0,), prompts=2, max_new_tokens=4, batch_size=4)
    resid = {k: SAMPLE_TEXTS[k] for k in langs}
    stage = SteerStage(tmp_path, cfg, loaded=loaded, resid_docs=resid)
    df = stage.run_stage()
    # none (2 pairs) + neurons 2 strengths x 2 pairs + random 2 x 2 + diffmean 1 x 2
    assert sorted(df.groupby("method").size().items()) == [("diffmean", 2), ("neurons", 4), ("none", 2),
                                                           ("random", 4)]
    assert (df["n_neurons"][df["method"].isin(["neurons", "random"])] == 4 * len(llama.model.layers)).all()
    gens = [json.loads(x) for x in (tmp_path / "steer_generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 * len(df)
    # every row's success and chrF equal a recount from its generations
    for r in df.itertuples():
        mine = [g for g in gens if (g["method"], g["layers"], g["strength"], g["src"], g["tgt"])
                == (r.method, r.layers, r.strength, r.src, r.tgt)]
        assert len(mine) == r.n_prompts == 2
        assert r.success == pytest.approx(sum(g["detected"] == r.tgt for g in mine) / 2)
        assert r.chrf == pytest.approx(sum(g["chrf"] for g in mine) / 2)
        assert r.harmonic == pytest.approx(harmonic_mean(r.success, r.chrf), nan_ok=True)
    # the unsteered outputs have no fluency cost; the diffmean rows differ from them
    assert (df[df["method"] == "none"]["fluency_cost"].abs() < 1e-12).all()
    none_out = {g["output"] for g in gens if g["method"] == "none"}
    assert {g["output"] for g in gens if g["method"] == "neurons" and g["strength"] == 3.0} != none_out
    assert (tmp_path / "figures" / "steer_strength.png").is_file()
    assert pd.read_parquet(tmp_path / "steer.parquet").shape[0] == len(df)
    assert stage.fresh()
    html = render_section(tmp_path)
    assert "Forcing success" in html or "forcing success" in html
    # a later run at the best strength adds to the table instead of replacing it
    best = SteerConfig(sources=["en"], targets=["de"], strengths="best", diffmean_strengths="best",
                       diffmean_layers=(0,), prompts=2, max_new_tokens=4, batch_size=4, methods=("neurons",))
    stage2 = SteerStage(tmp_path, best, loaded=loaded, resid_docs=resid)
    assert stage2.strengths()["neurons"] == [best_settings(df, "neurons")]
    df2 = stage2.run_stage()
    assert len(df2) == len(df)  # same keys, same setting: rows replaced, nothing lost


def test_stage_errors(tmp_path, tokenizer, llama):
    from langneurons.stages import SteerStage

    _tiny_run(tmp_path, tokenizer, llama)
    with pytest.raises(LangNeuronsError, match="--to"):
        SteerStage(tmp_path, SteerConfig(targets=["xx"]))
    with pytest.raises(LangNeuronsError, match="no \\(from, to\\) pair"):
        SteerStage(tmp_path, SteerConfig(sources=["en"], targets=["en"]))
    stage = SteerStage(tmp_path, SteerConfig(sources=["en"], targets=["de"], strengths="best"))
    with pytest.raises(LangNeuronsError, match="best"):
        stage.strengths()


def test_stage_diffmean_rows_equal_one_prompt_at_a_time(tmp_path, tokenizer, llama):
    """The DiffMean rows batch every source's prompts with a vector per row; each output must
    equal the prompt generated alone with its own source's vector."""
    from langneurons.stages import SteerStage

    langs = _tiny_run(tmp_path, tokenizer, llama)
    loaded = SimpleNamespace(model=llama, tokenizer=tokenizer, fingerprint="fp")
    cfg = SteerConfig(sources=["en", "de"], targets=["ru"], methods=("diffmean",), diffmean_strengths=(3.0,),
                      diffmean_layers=(0,), prompts=2, max_new_tokens=5, batch_size=3)
    resid = {k: SAMPLE_TEXTS[k] for k in langs}
    SteerStage(tmp_path, cfg, loaded=loaded, resid_docs=resid).run_stage()
    means = residual_means(llama, tokenizer, resid, [0])
    gens = [json.loads(x) for x in (tmp_path / "steer_generations.jsonl").read_text().splitlines()]
    mine = [g for g in gens if g["method"] == "diffmean"]
    assert len(mine) == 4
    for g in mine:
        vec = diffmean_vectors(means, [0], g["src"], "ru", 3.0)
        alone = generate(llama, tokenizer, [g["prompt"]], max_new_tokens=5,
                         batch_context=lambda w: add_to_residual(llama, vec, prompt_length=w))
        assert alone[0].text == g["output"]


def test_residual_add_per_row_vectors_equal_separate_rows(tokenizer, llama):
    enc = tokenizer(["The cat sat on the mat.", "Кошка сидела."], return_tensors="pt", padding=True)
    H = llama.config.hidden_size
    vs = torch.randn(2, H, generator=torch.Generator().manual_seed(5))
    with add_to_residual(llama, {1: vs}):
        both = _logits(llama, dict(enc))
    for r in range(2):
        n = int(enc["attention_mask"][r].sum())
        with add_to_residual(llama, {1: vs[r]}):
            one = _logits(llama, {"input_ids": enc["input_ids"][r:r + 1, :n]})
        torch.testing.assert_close(both[r, :n], one[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("args, msg", [(["--mode", "zero"], "--mode"), (["--positions", "x"], "--positions"),
                                       (["--strength", "a,b"], "--strength"), (["--layers", "0-99"], None),
                                       (["--to", "xx"], "--to")])
def test_cli_bad_options_give_one_error_line(tmp_path, tokenizer, llama, capsys, args, msg):
    from langneurons.cli import main

    _tiny_run(tmp_path, tokenizer, llama)
    with pytest.raises(SystemExit) as exc:
        main(["steer", str(tmp_path), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error:")
    if msg:
        assert msg in err[0]
