"""lm.py: the one batched generator, decoding of new tokens, stop tokens, chat rendering."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny import SAMPLE_TEXTS, make_model
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from langneurons.errors import LangNeuronsError
from langneurons.lm import (
    GenerateConfig,
    decode_new,
    generate,
    input_device,
    pad_id,
    render_prompt,
    stop_token_ids,
    use_chat,
)

PROMPTS = ["The cat sat on", "Кошка", "我们早上去了市场。还剩下", "How many apples are left? We walked to the"]


def make_sp_tokenizer(vocab_size: int = 300) -> transformers.PreTrainedTokenizerFast:
    """A Llama-2 style SentencePiece tokenizer (▁ for spaces, prepended ▁, decoder strips the
    first space): decoding a continuation alone loses its leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([t for ts in SAMPLE_TEXTS.values() for t in ts] * 3, trainer=trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="</s>")


def _one_by_one(model, tok, prompts, **kw):
    return [generate(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_batched_greedy_equals_one_prompt_at_a_time(tokenizer, family):
    model = make_model(family, vocab_size=len(tokenizer))
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4)
    single = _one_by_one(model, tokenizer, PROMPTS, max_new_tokens=8)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.prompt_index for g in batched] == [0, 1, 2, 3]
    stops = stop_token_ids(model, tokenizer)
    for g in batched:
        assert (g.stop == "length" and g.num_tokens == 8 and g.stop_token_id is None) or \
            (g.stop == "eos" and g.num_tokens < 8 and g.stop_token_id in stops)
        assert not set(g.token_ids) & set(stops)


def test_greedy_equals_transformers_generate(tokenizer, llama):
    """An independent decoder: transformers' own greedy search on the unpadded prompt."""
    for p in PROMPTS:
        ids = tokenizer(p)["input_ids"]
        with torch.no_grad():
            ref = llama.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=7, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=None)[0, len(ids):].tolist()
        [g] = generate(llama, tokenizer, [p], max_new_tokens=7)
        eos = tokenizer.eos_token_id
        want = ref[:ref.index(eos)] if eos in ref else ref
        assert g.token_ids == want
        assert g.prompt_ids == ids


def test_stop_reasons_and_early_finishing_rows_in_a_batch(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer))
    free = _one_by_one(model, tokenizer, PROMPTS, max_new_tokens=6)
    # make the 3rd token of prompt 0 a stop token (one that none of its earlier tokens is)
    target = free[0].token_ids[2]
    assert target not in free[0].token_ids[:2]
    model.generation_config.eos_token_id = [target]
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4)
    single = _one_by_one(model, tokenizer, PROMPTS, max_new_tokens=6)
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    g0 = batched[0]
    assert g0.stop == "eos" and g0.stop_token_id == target and g0.token_ids == free[0].token_ids[:2]
    assert g0.num_tokens == 2 and g0.finished
    for g, ref in zip(batched, free):  # every row: cut at its first `target`, else as before
        if target in ref.token_ids:
            assert g.stop == "eos" and g.token_ids == ref.token_ids[:ref.token_ids.index(target)]
        else:
            assert (g.stop, g.token_ids, g.stop_token_id) == (ref.stop, ref.token_ids, ref.stop_token_id)


def test_stop_at_first_token_gives_empty_text(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer))
    first = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=3)[0].token_ids[0]
    model.generation_config.eos_token_id = first
    [g] = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=3)
    assert (g.token_ids, g.text, g.stop, g.stop_token_id) == ([], "", "eos", first)


def test_stop_ids_include_end_of_turn_tokens(tokenizer):
    tok = make_sp_tokenizer()
    assert stop_token_ids(None, tok) == [tok.eos_token_id]
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>", "<|im_end|>"]})
    ids = stop_token_ids(None, tok)
    assert tok.convert_tokens_to_ids("<end_of_turn>") in ids and tok.convert_tokens_to_ids("<|im_end|>") in ids
    model = make_model("llama", vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = [5, 7]
    assert {5, 7, 2} <= set(stop_token_ids(model, tokenizer))


@pytest.mark.parametrize("style", ["sentencepiece", "bytelevel"])
def test_decoding_keeps_the_leading_space(tokenizer, style):
    tok = make_sp_tokenizer() if style == "sentencepiece" else tokenizer
    text = "The cat sat on the warm mat."
    ids = tok(text)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    k = next(i for i in range(3, len(ids)) if pieces[i][0] in "▁Ġ")  # a token that starts a word
    prompt, new = ids[:k], ids[k:]
    got = decode_new(tok, prompt, new)
    assert got.startswith(" ") and text.endswith(got)
    assert tok.decode(prompt, skip_special_tokens=True) + got == text
    if style == "sentencepiece":  # what decoding the new ids alone gives: the space is lost
        assert tok.decode(new, skip_special_tokens=True) == got[1:]


def test_generation_text_with_a_sentencepiece_tokenizer():
    tok = make_sp_tokenizer()
    model = make_model("llama", vocab_size=len(tok))
    gens = generate(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=2)
    for g in gens:
        whole = tok.decode(g.prompt_ids + g.token_ids, skip_special_tokens=True)
        assert tok.decode(g.prompt_ids, skip_special_tokens=True) + g.text == whole
    assert [g.token_ids for g in gens] == [g.token_ids for g in _one_by_one(model, tok, PROMPTS[:2], max_new_tokens=6)]


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(tokenizer, llama):
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, num_return_sequences=3, batch_size=2)
    a = generate(llama, tokenizer, PROMPTS, **kw)
    assert len(a) == 12 and [(g.prompt_index, g.sample) for g in a[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [g.token_ids for g in a] == [g.token_ids for g in generate(llama, tokenizer, PROMPTS, **kw)]
    other = generate(llama, tokenizer, PROMPTS, **{**kw, "seed": 4})
    assert [g.token_ids for g in other] != [g.token_ids for g in a]
    greedy = generate(llama, tokenizer, PROMPTS, max_new_tokens=6)
    nucleus = generate(llama, tokenizer, PROMPTS, max_new_tokens=6, do_sample=True, top_p=1e-6, seed=9)
    assert [g.token_ids for g in nucleus] == [g.token_ids for g in greedy]
    top1 = generate(llama, tokenizer, PROMPTS, max_new_tokens=6, do_sample=True, top_k=1, temperature=3.0)
    assert [g.token_ids for g in top1] == [g.token_ids for g in greedy]


def test_on_step_and_on_batch_see_every_token(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer))
    free = _one_by_one(model, tokenizer, PROMPTS, max_new_tokens=5)
    model.generation_config.eos_token_id = [free[1].token_ids[1]]
    batches: list[list[int]] = []
    steps: list[tuple[int, list[int], list[bool]]] = []
    gens = generate(model, tokenizer, PROMPTS, max_new_tokens=5, batch_size=4, on_batch=batches.append,
                    on_step=lambda s, ids, fin: steps.append((s, ids.tolist(), fin.tolist())))
    [rows] = batches
    assert sorted(rows) == [0, 1, 2, 3]
    assert [s for s, _, _ in steps] == list(range(len(steps)))
    for r, out in enumerate(rows):
        g = gens[out]
        seen = [ids[r] for _, ids, _ in steps]
        fin = [f[r] for _, _, f in steps]
        n = g.num_tokens + (g.stop == "eos")
        assert seen[:g.num_tokens] == g.token_ids
        assert fin[:n] == [False] * (n - 1) + [g.stop == "eos"] or g.stop == "length"
        if g.stop == "eos":
            assert seen[g.num_tokens] == g.stop_token_id and all(fin[g.num_tokens:])


def test_chat_rendering_and_errors(tokenizer, llama):
    assert use_chat(tokenizer, None) is False
    with pytest.raises(LangNeuronsError, match="no chat template"):
        use_chat(tokenizer, True)
    assert render_prompt(tokenizer, "hi", False) == ("hi", True)
    tok = make_sp_tokenizer()
    tok.chat_template = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}[assistant]{% endif %}"
    text, special = render_prompt(tok, "hi", True)
    assert text == "<s>[user] hi\n[assistant]" and special is False
    model = make_model("llama", vocab_size=len(tok))
    [g] = generate(model, tok, ["hi"], max_new_tokens=2, chat=None)
    assert g.prompt == text and g.prompt_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert g.prompt_ids.count(tok.bos_token_id) == 1
    assert pad_id(tokenizer) == tokenizer.pad_token_id and input_device(llama) == torch.device("cpu")
    for bad, msg in [({"max_new_tokens": 0}, "max-new-tokens"), ({"batch_size": 0}, "batch-size"),
                     ({"top_p": 0.0}, "top-p"), ({"temperature": 0}, "temperature"),
                     ({"num_return_sequences": 2}, "needs sampling")]:
        with pytest.raises(LangNeuronsError, match=msg):
            GenerateConfig(**bad).validate()
