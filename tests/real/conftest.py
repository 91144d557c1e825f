"""Fixtures for tests of real-model loading, text and generation, with no download: a
word-level tokenizer trained here on template text (the ``tokenizers`` library, wrapped
as a transformers ``PreTrainedTokenizerFast``) and tiny random Hugging Face models saved
with ``save_pretrained``."""

import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # tests run with --import-mode=importlib

from real_helpers import make_tokenizer, template_text, tiny_gemma3, tiny_llama


@pytest.fixture(scope="session")
def texts():
    return template_text()


@pytest.fixture(scope="session")
def tokenizer(texts):
    return make_tokenizer(texts)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A local Hugging Face directory: config, model.safetensors, tokenizer files."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def gemma(tokenizer):
    return tiny_gemma3(len(tokenizer))


@pytest.fixture
def body_corpus(tmp_path, texts):
    """The template texts as a JSON-lines corpus whose text field is "body" (not the default)."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def one_thread():
    """One torch thread for the test (the store and SAE tests compare exact rows and time nothing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
