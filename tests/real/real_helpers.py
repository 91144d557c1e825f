"""Helpers of tests/real: template text, a tokenizer trained on it, tiny random models."""

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import torch

NAMES = ["Mary", "John", "Alice", "Bob", "Carol", "Dave"]
PLACES = ["store", "park", "school", "garden", "station"]
OBJECTS = ["drink", "book", "ball", "letter", "flower"]


def template_text(n: int = 60) -> list[str]:
    """Sentences from templates: a small, fixed, natural-looking corpus."""
    out = []
    for i in range(n):
        a, b = NAMES[i % 6], NAMES[(i * 5 + 1) % 6]
        place, obj = PLACES[i % 5], OBJECTS[(i * 3) % 5]
        out.append(f"When {a} and {b} went to the {place} , {b} gave a {obj} to {a} .")
    return out


def make_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")


def tiny_llama(vocab: int, seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gemma3(vocab: int, seed: int = 0):
    config = transformers.Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, sliding_window=4, max_position_embeddings=256,
                                           bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.Gemma3ForCausalLM(config).eval()


