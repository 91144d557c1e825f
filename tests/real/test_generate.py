"""generate(): greedy equals a manual argmax loop, seeded sampling, left padding, and what a
site's positions mean while decoding (all positions, prompt positions, "last"), with the
KV-cache path checked against recomputing the whole sequence."""

import pytest
import torch

from mechscope.core.generate import generate
from mechscope.core.intervene import Add
from mechscope.core.models import resid_post
from mechscope.core.site import Site

PROMPTS = ["When Mary and John went to the store , John gave a", "When Bob went to the"]


def manual_greedy(model, ids, n):
    ids = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            out.append(int(nxt))
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    return out


def test_greedy_equals_manual_argmax_loop(llama, tokenizer):
    gen = generate(llama, tokenizer, PROMPTS, max_new_tokens=6, stop_at_eos=False)
    assert gen.tokens.shape == (2, 6) and gen.lengths == [6, 6]
    for i, p in enumerate(PROMPTS):  # left padding does not change a row's continuation
        assert gen.tokens[i].tolist() == manual_greedy(llama, tokenizer(p)["input_ids"], 6)
    assert gen.texts[1] == tokenizer.decode(gen.tokens[1].tolist(), skip_special_tokens=True)
    assert gen.prompt["attention_mask"][1, 0] == 0  # the shorter prompt is left-padded


def test_kv_cache_equals_recompute(llama, gemma, tokenizer):
    for model in (llama, gemma):  # gemma: sliding-window layers shorter than the prompt
        a = generate(model, tokenizer, PROMPTS, max_new_tokens=6, stop_at_eos=False, return_logits=True)
        b = generate(model, tokenizer, PROMPTS, max_new_tokens=6, stop_at_eos=False, return_logits=True,
                     use_cache=False)
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_is_reproducible(llama, tokenizer):
    kw = {"max_new_tokens": 8, "do_sample": True, "temperature": 2.0, "stop_at_eos": False}
    a = generate(llama, tokenizer, PROMPTS, seed=3, **kw)
    b = generate(llama, tokenizer, PROMPTS, seed=3, **kw)
    c = generate(llama, tokenizer, PROMPTS, seed=4, **kw)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    k1 = generate(llama, tokenizer, PROMPTS, seed=5, top_k=1, **kw)
    assert torch.equal(k1.tokens, generate(llama, tokenizer, PROMPTS, max_new_tokens=8, stop_at_eos=False).tokens)


def logits_with(model, tokenizer, site, use_cache=True):
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    return generate(model, tokenizer, PROMPTS, [(site, Add(direction, coeff=5.0))], max_new_tokens=5,
                    stop_at_eos=False, return_logits=True, use_cache=use_cache)


class Recorder:
    """An intervention that changes nothing and records the shape of each view it sees."""

    def __init__(self):
        self.calls = []

    def __call__(self, view, call):
        self.calls.append(tuple(view.shape))
        return view


def test_all_positions_change_every_new_token(llama, tokenizer):
    base = generate(llama, tokenizer, PROMPTS, max_new_tokens=5, stop_at_eos=False, return_logits=True)
    steered = logits_with(llama, tokenizer, resid_post(llama, 0))
    for t in range(5):
        assert not torch.allclose(steered.logits[:, t], base.logits[:, t], atol=1e-3)
    rec = Recorder()
    generate(llama, tokenizer, PROMPTS, [(resid_post(llama, 0), rec)], max_new_tokens=4, stop_at_eos=False)
    n = tokenizer(PROMPTS[0], return_tensors=None)["input_ids"].__len__()
    assert rec.calls == [(2, n, 32)] + [(2, 1, 32)] * 3  # the whole prompt, then each new token


def test_prompt_positions_apply_in_the_prefill_only(llama, tokenizer):
    rec = Recorder()
    site = Site(resid_post(llama, 0).path, positions=[0, 1])
    generate(llama, tokenizer, PROMPTS, [(site, rec)], max_new_tokens=4, stop_at_eos=False)
    assert rec.calls == [(2, 2, 32)]  # once, in the prefill
    # the effect still reaches later tokens through the KV cache, and equals recomputing
    steered = logits_with(llama, tokenizer, site)
    base = generate(llama, tokenizer, PROMPTS, max_new_tokens=5, stop_at_eos=False, return_logits=True)
    assert not torch.allclose(steered.logits[:, 1], base.logits[:, 1], atol=1e-3)
    torch.testing.assert_close(steered.logits, logits_with(llama, tokenizer, site, use_cache=False).logits,
                               atol=1e-4, rtol=1e-4)


def test_prompt_positions_count_real_tokens_under_left_padding(llama, tokenizer):
    seen = []

    def grab(view, call):
        seen.append(call.index.clone())
        return view

    generate(llama, tokenizer, PROMPTS, [(Site(resid_post(llama, 0).path, positions=0), grab)], max_new_tokens=2)
    pad = int((tokenizer(PROMPTS[0])["input_ids"].__len__()) - len(tokenizer(PROMPTS[1])["input_ids"]))
    assert seen[0].tolist() == [[0], [pad]]  # each prompt's own first token (BOS)


def test_last_is_each_new_token(llama, tokenizer):
    rec = Recorder()
    site = Site(resid_post(llama, 1).path, positions="last")
    generate(llama, tokenizer, PROMPTS, [(site, rec)], max_new_tokens=4, stop_at_eos=False)
    assert rec.calls == [(2, 1, 32)] * 4  # the last prompt token, then each fed-back token
    base = generate(llama, tokenizer, PROMPTS, max_new_tokens=5, stop_at_eos=False, return_logits=True)
    steered = logits_with(llama, tokenizer, site)
    for t in range(5):
        assert not torch.allclose(steered.logits[:, t], base.logits[:, t], atol=1e-3)
    torch.testing.assert_close(steered.logits, logits_with(llama, tokenizer, site, use_cache=False).logits,
                               atol=1e-4, rtol=1e-4)


def test_all_positions_cached_equals_recompute(gemma, tokenizer):
    site = resid_post(gemma, 1)
    torch.testing.assert_close(logits_with(gemma, tokenizer, site).logits,
                               logits_with(gemma, tokenizer, site, use_cache=False).logits, atol=1e-4, rtol=1e-4)


def test_eos_ends_a_row_and_bad_options(llama, tokenizer):
    eos = tokenizer.eos_token_id
    gen = generate(llama, tokenizer, PROMPTS, max_new_tokens=6, stop_at_eos=False)
    first = int(gen.tokens[0, 0])

    class Tok:  # the same tokenizer with the first greedy token as EOS
        pad_token_id, eos_token_id = tokenizer.pad_token_id, first

        def __call__(self, text):
            return tokenizer(text)

        def decode(self, ids, skip_special_tokens=True):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ended = generate(llama, Tok(), PROMPTS, max_new_tokens=6)
    assert ended.lengths[0] == 1 and (ended.tokens[0, 1:] == tokenizer.pad_token_id).all()
    assert eos is not None
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(llama, tokenizer, PROMPTS, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        generate(llama, tokenizer, PROMPTS, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(llama, tokenizer, [[2, 9999]])
    assert generate(llama, tokenizer, PROMPTS, max_new_tokens=0).tokens.shape == (2, 0)


def test_token_id_prompts(llama, tokenizer):
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    from_text = generate(llama, tokenizer, PROMPTS, max_new_tokens=3, stop_at_eos=False)
    assert torch.equal(generate(llama, tokenizer, ids, max_new_tokens=3, stop_at_eos=False).tokens, from_text.tokens)
    one = generate(llama, None, torch.tensor(ids[0]), max_new_tokens=3, stop_at_eos=False)
    assert one.texts is None and one.tokens[0].tolist() == from_text.tokens[0].tolist()
    rows = generate(llama, None, torch.tensor([ids[0], ids[0]]), max_new_tokens=3, stop_at_eos=False)
    assert rows.tokens.shape == (2, 3)
