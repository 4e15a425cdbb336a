"""Interventions: hooks against independent weight edits and hand computations."""

from __future__ import annotations

import copy

import pytest
import torch

from langneurons.arch import locate_activations
from langneurons.errors import LangNeuronsError, NeuronMapError
from langneurons.intervene import (activity_from_probs, activity_strata, as_indices, deactivate, matched_control,
                                   random_control)
from tiny import make_model


def _batch(tokenizer, texts=("The cat sat on the mat.", "Кошка сидела на коврике.")):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _some_mask(L: int, N: int, per_layer: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(L, N, dtype=torch.bool)
    for layer in range(L):
        mask[layer, torch.randperm(N, generator=g)[:per_layer]] = True
    return mask


def _zero_weights(model, family: str, mask: torch.Tensor) -> None:
    """The independent path: make neuron (l, n)'s activation exactly 0 by editing weights (the
    activations in these families are 0 at input 0: SiLU, GELU, GELU-tanh, gelu_new, ReLU)."""
    with torch.no_grad():
        for layer, row in enumerate(mask):
            idx = row.nonzero().flatten()
            if family in ("llama", "gemma3_text", "mistral", "qwen2"):
                model.model.layers[layer].mlp.gate_proj.weight[idx] = 0
            elif family == "phi3":  # fused [gate; up]: the gate is the first half of the rows
                model.model.layers[layer].mlp.gate_up_proj.weight[idx] = 0
            elif family == "gpt2":  # Conv1D: weight [hidden, inter], y = x @ W + b
                fc = model.transformer.h[layer].mlp.c_fc
                fc.weight[:, idx] = 0
                fc.bias[idx] = 0
            elif family == "opt":
                fc = model.model.decoder.layers[layer].fc1
                fc.weight[idx] = 0
                fc.bias[idx] = 0
            elif family == "gpt_neox":
                fc = model.gpt_neox.layers[layer].mlp.dense_h_to_4h
                fc.weight[idx] = 0
                fc.bias[idx] = 0
            else:
                raise AssertionError(family)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3", "gpt2", "opt", "gpt_neox"])
def test_zero_hook_equals_zeroed_weights(tokenizer, family):
    model = make_model(family, vocab_size=len(tokenizer))
    sites = locate_activations(model)
    mask = _some_mask(sites.num_layers, sites.num_neurons)
    batch = _batch(tokenizer)
    base = _logits(model, batch)
    with deactivate(model, mask) as iv:
        hooked = _logits(model, batch)
    iv.check_fired()
    edited = copy.deepcopy(model)
    _zero_weights(edited, family, mask)
    expected = _logits(edited, batch)
    assert not torch.allclose(hooked, base, atol=1e-4), "the intervention changed nothing"
    torch.testing.assert_close(hooked, expected, atol=1e-5, rtol=1e-5)
    # unpatched again after the block
    assert torch.equal(_logits(model, batch), base)


def test_index_list_mask_equals_bool_mask(tokenizer, llama):
    sites = locate_activations(llama)
    mask = _some_mask(sites.num_layers, sites.num_neurons, seed=3)
    batch = _batch(tokenizer)
    with deactivate(llama, mask):
        a = _logits(llama, batch)
    with deactivate(llama, [row.nonzero().flatten() for row in mask]):
        b = _logits(llama, batch)
    assert torch.equal(a, b)


def test_empty_mask_is_bit_identical_and_registers_nothing(tokenizer, llama):
    sites = locate_activations(llama)
    batch = _batch(tokenizer)
    base = _logits(llama, batch)
    for empty in (torch.zeros(sites.num_layers, sites.num_neurons, dtype=torch.bool),
                  [torch.empty(0, dtype=torch.long)] * sites.num_layers):
        with deactivate(llama, empty) as iv:
            assert all(len(m._forward_hooks) == 0 for m in sites.modules)
            out = _logits(llama, batch)
        assert iv.num_neurons == 0
        assert torch.equal(out, base)


def test_hooks_removed_after_exception(tokenizer, llama):
    sites = locate_activations(llama)
    before = [len(m._forward_hooks) for m in sites.modules]
    batch = _batch(tokenizer)
    base = _logits(llama, batch)
    with pytest.raises(RuntimeError, match="boom"):
        with deactivate(llama, _some_mask(sites.num_layers, sites.num_neurons), positions="generated"):
            assert sum(len(m._forward_hooks) for m in sites.modules) > sum(before)
            raise RuntimeError("boom")
    assert [len(m._forward_hooks) for m in sites.modules] == before
    assert len(llama._forward_hooks) == 0 and len(llama._forward_pre_hooks) == 0
    assert torch.equal(_logits(llama, batch), base)


def test_nesting_applies_both(tokenizer, llama):
    sites = locate_activations(llama)
    a = _some_mask(sites.num_layers, sites.num_neurons, seed=1)
    b = _some_mask(sites.num_layers, sites.num_neurons, seed=2)
    batch = _batch(tokenizer)
    with deactivate(llama, a | b):
        union = _logits(llama, batch)
    with deactivate(llama, a):
        only_a = _logits(llama, batch)
    with deactivate(llama, a):
        with deactivate(llama, b):
            nested = _logits(llama, batch)
        after_inner = _logits(llama, batch)
    torch.testing.assert_close(nested, union, atol=1e-6, rtol=1e-6)
    assert torch.equal(after_inner, only_a)
    # scale inside scale multiplies
    one = torch.zeros_like(a)
    one[0, 7] = True
    mlp = llama.model.layers[0].mlp
    x = torch.randn(1, 3, llama.config.hidden_size)
    with torch.no_grad(), deactivate(llama, one, mode="scale", factor=0.5), \
            deactivate(llama, one, mode="scale", factor=3.0):
        got = mlp(x)
    with torch.no_grad(), deactivate(llama, one, mode="scale", factor=1.5):
        want = mlp(x)
    torch.testing.assert_close(got, want)


def _manual_gated_mlp(mlp, x, edit):
    act = mlp.act_fn(mlp.gate_proj(x))
    act = edit(act.clone())
    return mlp.down_proj(act * mlp.up_proj(x))


def test_scale_and_set_match_manual_mlp(llama):
    sites = locate_activations(llama)
    L, N = sites.num_layers, sites.num_neurons
    mask = _some_mask(L, N, per_layer=4, seed=5)
    values = torch.randn(L, N)
    mlp = llama.model.layers[1].mlp
    idx = mask[1].nonzero().flatten()
    x = torch.randn(2, 5, llama.config.hidden_size)
    with torch.no_grad():
        with deactivate(llama, mask, mode="scale", factor=-0.7):
            got_scale = mlp(x)
        want_scale = _manual_gated_mlp(mlp, x, lambda a: a.index_copy(-1, idx, a[..., idx] * -0.7))
        with deactivate(llama, mask, mode="set", values=values):
            got_set = mlp(x)

        def put(a):
            a[..., idx] = values[1, idx]
            return a
        want_set = _manual_gated_mlp(mlp, x, put)
    torch.testing.assert_close(got_scale, want_scale, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_set, want_set, atol=1e-6, rtol=1e-6)


def test_scale_equals_scaled_down_proj_columns(tokenizer, llama):
    """Independent path for 'scale': down_proj is linear in the activation."""
    sites = locate_activations(llama)
    mask = _some_mask(sites.num_layers, sites.num_neurons, seed=7)
    batch = _batch(tokenizer)
    with deactivate(llama, mask, mode="scale", factor=2.5):
        hooked = _logits(llama, batch)
    edited = copy.deepcopy(llama)
    with torch.no_grad():
        for layer, row in enumerate(mask):
            edited.model.layers[layer].mlp.down_proj.weight[:, row] *= 2.5
    torch.testing.assert_close(hooked, _logits(edited, batch), atol=1e-5, rtol=1e-5)


def test_bad_masks_fail_loudly(llama):
    sites = locate_activations(llama)
    L, N = sites.num_layers, sites.num_neurons
    with pytest.raises(NeuronMapError, match="another model"):
        with deactivate(llama, torch.zeros(L + 1, N, dtype=torch.bool)):
            pass
    with pytest.raises(NeuronMapError, match="another model"):
        with deactivate(llama, torch.zeros(L, N + 3, dtype=torch.bool)):
            pass
    with pytest.raises(NeuronMapError, match="out of range"):
        with deactivate(llama, [torch.tensor([0]), torch.tensor([N])]):
            pass
    with pytest.raises(NeuronMapError, match="layers"):
        with deactivate(llama, [torch.tensor([0])] * (L + 1)):
            pass
    with pytest.raises(NeuronMapError, match="bool"):
        with deactivate(llama, torch.zeros(L, N, dtype=torch.int64)):
            pass
    with pytest.raises(LangNeuronsError, match="values"):
        with deactivate(llama, torch.ones(L, N, dtype=torch.bool), mode="set"):
            pass
    with pytest.raises(NeuronMapError):
        with deactivate(llama, torch.ones(L, N, dtype=torch.bool), mode="set", values=torch.zeros(L, N - 1)):
            pass
    with pytest.raises(LangNeuronsError, match="mode"):
        with deactivate(llama, torch.ones(L, N, dtype=torch.bool), mode="drop"):  # type: ignore[arg-type]
            pass
    # all hooks gone after the failures
    assert all(len(m._forward_hooks) == 0 for m in sites.modules)


def test_check_fired_catches_a_bypassed_intervention(llama):
    sites = locate_activations(llama)
    with deactivate(llama, _some_mask(sites.num_layers, sites.num_neurons)) as iv:
        pass  # the model never ran
    with pytest.raises(LangNeuronsError, match="never ran"):
        iv.check_fired()


def test_gradients_flow_through_relu_intervention(tokenizer):
    """Out-of-place patching: autograd through ReLU (whose backward reads its output) still works."""
    model = make_model("opt", vocab_size=len(tokenizer)).train()
    sites = locate_activations(model)
    batch = _batch(tokenizer)
    with deactivate(model, _some_mask(sites.num_layers, sites.num_neurons)):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert model.model.decoder.layers[0].fc1.weight.grad is not None


# -- positions="generated" ----------------------------------------------------------------
def _reference_greedy(model, ids, steps, prompt_len, idx_per_layer):
    """Greedy decoding without a KV cache and with a hand-written hook that zeroes the masked
    neurons at positions >= prompt_len (the reference for positions='generated')."""
    sites = locate_activations(model)
    handles = []
    for layer, idx in enumerate(idx_per_layer):
        def hook(_m, _i, out, idx=idx):
            out = out.clone()
            out[:, prompt_len:, idx] = 0
            return out
        handles.append(sites.modules[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for _ in range(steps):
                nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
    finally:
        for h in handles:
            h.remove()
    return ids


def test_generated_positions_match_reference(tokenizer, llama):
    sites = locate_activations(llama)
    mask = _some_mask(sites.num_layers, sites.num_neurons, per_layer=24, seed=11)
    idx = as_indices(mask, sites.num_layers, sites.num_neurons)
    ids = tokenizer("The cat sat", return_tensors="pt")["input_ids"]
    P, steps = ids.shape[1], 8
    gen_kw = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None)
    reference = _reference_greedy(llama, ids, steps, P, idx)
    with torch.no_grad():
        plain = llama.generate(ids, **gen_kw)
        with deactivate(llama, mask, positions="generated") as iv:  # KV cache: detected from the cache
            cached = llama.generate(ids, **gen_kw)
        with deactivate(llama, mask, positions="generated", prompt_length=P):  # no cache: explicit length
            uncached = llama.generate(ids, use_cache=False, **gen_kw)
        with deactivate(llama, mask, positions="all"):
            everywhere = llama.generate(ids, **gen_kw)
    assert torch.equal(cached, reference)
    assert torch.equal(uncached, reference)
    assert iv.patched_positions == steps - 1  # every new token except the last one fed back
    # the first new token comes from the unpatched prompt; later ones change
    assert cached[0, P] == plain[0, P]
    assert not torch.equal(cached, plain)
    assert not torch.equal(cached, everywhere)


def test_generated_positions_leave_a_plain_forward_alone(tokenizer, llama):
    sites = locate_activations(llama)
    batch = _batch(tokenizer)
    base = _logits(llama, batch)
    with pytest.warns(UserWarning, match="no position after the prompt"):
        with deactivate(llama, _some_mask(sites.num_layers, sites.num_neurons), positions="generated"):
            out = _logits(llama, batch)
    assert torch.equal(out, base)
    # with a prompt length, positions from there on are patched, earlier ones are not
    P = 4
    with deactivate(llama, _some_mask(sites.num_layers, sites.num_neurons), positions="generated", prompt_length=P):
        part = _logits(llama, batch)
    assert torch.equal(part[:, :P], base[:, :P])
    assert not torch.allclose(part[:, P:], base[:, P:], atol=1e-4)


def test_generated_needs_the_patched_model(llama):
    sites = locate_activations(llama)
    with pytest.raises(LangNeuronsError, match="positions='generated'"):
        with deactivate(llama, _some_mask(sites.num_layers, sites.num_neurons), positions="generated"):
            with torch.no_grad():
                llama.model(input_ids=torch.tensor([[1, 5, 6]]))  # the body, not the patched model


# -- random controls ----------------------------------------------------------------------
def test_random_control_matches_counts_and_is_seeded():
    L, N = 4, 50
    mask = torch.zeros(L, N, dtype=torch.bool)
    mask[0, :7] = True
    mask[2, [3, 9, 40]] = True
    mask[3, 10:35] = True  # half the layer: exactly enough others to draw from
    a = random_control(mask, seed=0, exclude=mask)
    b = random_control(mask, seed=0, exclude=mask)
    c = random_control(mask, seed=1, exclude=mask)
    assert torch.equal(a.sum(1), mask.sum(1))
    assert torch.equal(c.sum(1), mask.sum(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not (a & mask).any() and not (c & mask).any()
    # no exclusion: may overlap, counts still matched
    d = random_control(mask, seed=2)
    assert torch.equal(d.sum(1), mask.sum(1))
    # index-list form
    lists = [row.nonzero().flatten() for row in mask]
    e = random_control(lists, seed=0, exclude=lists, num_neurons=N)
    assert [int(x.numel()) for x in e] == mask.sum(1).tolist()
    assert torch.equal(torch.stack([torch.zeros(N, dtype=torch.bool).index_fill(0, x, True) for x in e]), a)
    with pytest.raises(NeuronMapError, match="cannot draw"):
        random_control(mask, seed=0, exclude=torch.ones(L, N, dtype=torch.bool))
    # a set larger than half a layer: strict=False tops up with excluded neurons, counts still match
    big = torch.zeros(L, N, dtype=torch.bool)
    big[1, :40] = True
    f = random_control(big, seed=0, exclude=big, strict=False)
    assert torch.equal(f.sum(1), big.sum(1))
    assert (f[1] & ~big[1]).sum() == 10  # every neuron outside the set, then 30 from inside it
    with pytest.raises(LangNeuronsError, match="num_neurons"):
        random_control(lists, seed=0)


def test_generated_positions_on_opt_flattened_activation(tokenizer):
    """OPT's activation is [B*T, N]: the 'generated' logic must still patch only new tokens."""
    opt = make_model("opt", vocab_size=len(tokenizer))
    sites = locate_activations(opt)
    mask = _some_mask(sites.num_layers, sites.num_neurons, per_layer=24, seed=3)
    ids = tokenizer("The cat sat", return_tensors="pt")["input_ids"]
    P, steps = ids.shape[1], 6
    idx = as_indices(mask, sites.num_layers, sites.num_neurons)
    flat_ref = []  # the reference hook must handle [B*T, N] too

    def reference() -> torch.Tensor:
        handles = []
        for layer, index in enumerate(idx):
            def hook(_m, _i, out, index=index):
                out = out.clone().view(1, -1, out.shape[-1])
                out[:, P:, index] = 0
                flat_ref.append(1)
                return out.view(-1, out.shape[-1])
            handles.append(sites.modules[layer].register_forward_hook(hook))
        cur = ids
        try:
            with torch.no_grad():
                for _ in range(steps):
                    nxt = opt(input_ids=cur, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                    cur = torch.cat([cur, nxt], 1)
        finally:
            for h in handles:
                h.remove()
        return cur

    gen_kw = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), deactivate(opt, mask, positions="generated"):
        cached = opt.generate(ids, **gen_kw)
    assert torch.equal(cached, reference()) and flat_ref


# -- the activity-matched control ---------------------------------------------------------------
def _naive_strata(act: torch.Tensor, bins: int) -> torch.Tensor:
    """Independent oracle: numpy quantiles per layer, stratum = number of distinct edges strictly
    below the value."""
    import numpy as np

    out = torch.zeros(act.shape, dtype=torch.int64)
    for layer in range(act.shape[0]):
        row = act[layer].double().numpy()
        edges = sorted(set(np.quantile(row, [i / bins for i in range(1, bins)]).tolist()))
        for n, v in enumerate(row):
            out[layer, n] = sum(1 for e in edges if e < v)
    return out


def test_activity_strata_match_a_naive_quantile_rule():
    gen = torch.Generator().manual_seed(3)
    act = torch.rand(3, 60, generator=gen)
    act[1, :25] = 0.0  # ties: a quarter of the layer never fires -> bins merge, equal values share one
    for bins in (1, 4, 10):
        assert torch.equal(activity_strata(act, bins), _naive_strata(act, bins))
    with pytest.raises(LangNeuronsError, match="NaN"):
        activity_strata(torch.full((2, 3), float("nan")))


def test_activity_from_probs():
    p = torch.tensor([[[0.1, 0.9]], [[0.5, 0.0]]])  # K=2, L=1, N=2
    assert torch.allclose(activity_from_probs(p), torch.tensor([[0.5, 0.9]]))
    assert torch.allclose(activity_from_probs(p, "mean"), torch.tensor([[0.3, 0.45]]))
    with pytest.raises(LangNeuronsError, match="max or mean"):
        activity_from_probs(p, "median")


def test_matched_control_is_disjoint_with_matched_layer_and_strata_counts():
    L, N, bins = 3, 200, 10
    gen = torch.Generator().manual_seed(0)
    act = torch.rand(L, N, generator=gen)
    # the real set: mostly very busy neurons (as selected neurons are), a few quiet ones
    mask = torch.zeros(L, N, dtype=torch.bool)
    for layer, k in enumerate((9, 0, 7)):  # the top decile has 20 neurons: enough left to match
        order = torch.argsort(act[layer], descending=True)
        mask[layer, order[:k]] = True
        mask[layer, order[-2:]] = layer != 1
    strata = _naive_strata(act, bins)
    info: dict = {}
    a = matched_control(mask, act, seed=0, exclude=mask, bins=bins, info=info)
    assert not (a & mask).any()
    assert torch.equal(a.sum(1), mask.sum(1))
    for layer in range(L):
        for s in range(bins):
            assert int((a[layer] & (strata[layer] == s)).sum()) == int((mask[layer] & (strata[layer] == s)).sum())
    assert info["shortfall"] == []
    assert info["activity_control"] == pytest.approx(info["activity_real"], abs=0.05)
    # a layer-only control of the same set is far less busy: the bias the matched control removes
    layer_only = random_control(mask, seed=0, exclude=mask)
    assert float(act[layer_only].mean()) < info["activity_real"] - 0.2
    # seeded, and index lists give the same draw
    assert torch.equal(a, matched_control(mask, act, seed=0, exclude=mask, bins=bins))
    assert not torch.equal(a, matched_control(mask, act, seed=1, exclude=mask, bins=bins))
    lists = [row.nonzero().flatten() for row in mask]
    e = matched_control(lists, act, seed=0, exclude=lists, bins=bins)
    assert torch.equal(torch.stack([torch.zeros(N, dtype=torch.bool).index_fill(0, x, True) for x in e]), a)


def test_matched_control_says_when_a_stratum_is_too_small():
    L, N = 1, 40
    act = torch.linspace(0, 1, N).view(1, N)
    mask = torch.zeros(L, N, dtype=torch.bool)
    mask[0, 34:] = True  # the 6 busiest; with 4 bins the top stratum has 10 neurons -> 4 candidates
    with pytest.raises(NeuronMapError, match=r"needs 6 control neurons but has only 4"):
        matched_control(mask, act, seed=0, exclude=mask, bins=4, strict=True)
    info: dict = {}
    with pytest.warns(UserWarning, match=r"2 neuron\(s\) short.*needs 6, has 4"):
        c = matched_control(mask, act, seed=0, exclude=mask, bins=4, info=info)
    assert not (c & mask).any() and int(c.sum()) == 6
    assert info["shortfall"] == [{"layer": 0, "stratum": 3, "needed": 6, "available": 4,
                                  "activity_range": [pytest.approx(0.7692, abs=1e-4), 1.0]}]
    # the 2 stand-ins are the nearest-activity neurons left: 26 and 27 (just below the stratum)
    assert c[0, 30:34].all() and c[0, 28:30].all() and int(c[0, :28].sum()) == 0


@pytest.mark.filterwarnings("ignore:matched control")  # small strata on purpose: sets of 20 in 48
def test_the_matrix_controls_are_disjoint_with_the_same_per_layer_counts():
    """Issue 19 item 12: the controls the matrix actually runs (both kinds) exclude the real set."""
    from langneurons.evaluate import plan_jobs
    from langneurons.neurons import SPECIFIC, NeuronMap

    L, N = 2, 48
    classes = torch.zeros(L, N, dtype=torch.int8)
    active = torch.zeros(2, L, N, dtype=torch.bool)
    classes[0, :20] = SPECIFIC  # large sets: a draw that ignored the real set would overlap it
    active[0, 0, :20] = True
    classes[1, 20:40] = SPECIFIC
    active[1, 1, 20:40] = True
    nmap = NeuronMap(["a", "b"], classes, active, classes > 0)
    act = torch.rand(L, N, generator=torch.Generator().manual_seed(1))
    for kind in ("matched", "layer"):
        jobs = plan_jobs(nmap, ["a", "b"], ("specific",), kind, (0, 1, 2), act, 4)
        real = {j.lang: j.mask for j in jobs if j.control is None}
        ctrl = [j for j in jobs if j.control is not None]
        assert len(ctrl) == 6 and {j.control for j in ctrl} == {kind}
        for j in ctrl:
            assert not (j.mask & real[j.lang]).any()
            assert torch.equal(j.mask.sum(1), real[j.lang].sum(1))
