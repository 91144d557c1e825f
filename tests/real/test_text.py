"""Corpus reading and windows: plain text, JSONL, the BOS policy, deterministic shuffling,
clear errors, and the positions left out of statistics."""

import json

import pytest
import torch

from mechscope.core.jsonl import DataError
from mechscope.core.text import (
    analysis_mask,
    buffer_shuffle,
    read_documents,
    text_windows,
    window_batches,
)


@pytest.fixture
def corpus(tmp_path, texts):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(texts[:30]) + "\n")
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[:30])))
    return txt, jsonl


def test_windows_prepend_bos_and_pack_documents(corpus, tokenizer, texts):
    _txt, jsonl = corpus
    windows = list(text_windows(jsonl, tokenizer, 16))
    assert all(w.shape == (16,) and w.dtype == torch.long for w in windows)
    assert all(int(w[0]) == tokenizer.bos_token_id for w in windows)
    body = torch.cat([w[1:] for w in windows]).tolist()
    expected = []
    for t in texts[:30]:
        expected += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected = expected[:-1]  # EOS between documents, not after the last
    assert body == expected[:len(body)]  # documents packed in order, joined by EOS
    assert len(expected) - len(body) < 15  # only a tail shorter than a window is dropped
    no_bos = list(text_windows(jsonl, tokenizer, 16, bos=False))
    assert all(w.shape == (16,) for w in no_bos) and torch.cat(no_bos).tolist() == expected[:16 * len(no_bos)]


def test_plain_text_streams_paragraphs_of_one_document(corpus, tokenizer):
    txt, _ = corpus
    docs = list(read_documents(txt))
    assert len(docs) == 30 and {name for name, _ in docs} == {str(txt)}
    windows = list(text_windows(txt, tokenizer, 12))
    assert windows and tokenizer.eos_token_id not in torch.cat(windows).tolist()  # one document: no EOS inside


def test_list_of_sources_and_max_windows(corpus, tokenizer):
    txt, jsonl = corpus
    both = list(text_windows([txt, jsonl], tokenizer, 16))
    assert len(both) > len(list(text_windows(jsonl, tokenizer, 16)))
    assert len(list(text_windows([txt, jsonl], tokenizer, 16, max_windows=3))) == 3


def test_shuffle_is_deterministic_by_seed(corpus, tokenizer):
    _, jsonl = corpus
    plain = [w.tolist() for w in text_windows(jsonl, tokenizer, 8)]
    a = [w.tolist() for w in text_windows(jsonl, tokenizer, 8, shuffle_buffer=10, seed=1)]
    b = [w.tolist() for w in text_windows(jsonl, tokenizer, 8, shuffle_buffer=10, seed=1)]
    c = [w.tolist() for w in text_windows(jsonl, tokenizer, 8, shuffle_buffer=10, seed=2)]
    assert a == b and a != plain and a != c
    assert sorted(a) == sorted(plain) == sorted(c)  # a permutation, nothing lost
    assert list(buffer_shuffle(range(5), 0, seed=3)) == list(range(5))


def test_shuffle_holds_only_the_buffer():
    seen = []

    def source():
        for i in range(100):
            seen.append(i)
            yield i

    out = buffer_shuffle(source(), 8, seed=0)
    first = next(out)
    assert len(seen) == 9 and first < 9  # the stream is read lazily, 8 held + 1


def test_corpus_without_a_window_is_an_error(tmp_path, tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("Mary went to the store .")
    with pytest.raises(DataError, match=r"short\.txt yielded no window of 64 tokens"):
        list(text_windows(short, tokenizer, 64))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="yielded no window"):
        list(text_windows(empty, tokenizer, 8))


def test_jsonl_field_errors_name_the_line(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Mary went"}\n\n{"body": "John went"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: no field 'text'"):
        list(text_windows(bad, tokenizer, 4))
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"text": "Mary went"}\n{"text": 42}\n')
    with pytest.raises(DataError, match=r"typed\.jsonl:2: field 'text' must be a string, got int"):
        list(text_windows(typed, tokenizer, 4))
    not_json = tmp_path / "nj.jsonl"
    not_json.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"nj\.jsonl:2: not valid JSON"):
        list(read_documents(not_json))
    named = tmp_path / "named.jsonl"
    named.write_text('{"body": "Mary went to the store . John went to the park ."}\n')
    assert len(list(text_windows(named, tokenizer, 4, field="body"))) == 4  # 12 tokens, 3 a window


def test_missing_sources_and_bad_options(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        list(read_documents(tmp_path / "absent.txt"))
    with pytest.raises(DataError, match="not a saved Hugging Face dataset"):
        list(read_documents(tmp_path))
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        next(text_windows(tmp_path / "x.txt", tokenizer, 1))


def test_hf_dataset_on_disk_parquet_and_arrow(tmp_path, tokenizer, texts):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": texts[:10], "n": list(range(10))})
    ds = datasets.Dataset(table, fingerprint="test")  # a fixed fingerprint: no hashing of the table
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    pq.write_table(table, tmp_path / "ds.parquet")
    with pa.OSFile(str(tmp_path / "ds.arrow"), "wb") as f:
        writer = pa.ipc.new_stream(f, table.schema)
        writer.write_table(table)
        writer.close()
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:10]))
    want = [w.tolist() for w in text_windows(jsonl, tokenizer, 8)]
    for source in ("ds", "ds.parquet", "ds.arrow"):
        assert [w.tolist() for w in text_windows(tmp_path / source, tokenizer, 8)] == want, source
    assert [w.tolist() for w in text_windows(tmp_path / "dd", tokenizer, 8, split="train")] == want
    with pytest.raises(DataError, match="splits \\['train'\\]; choose one with split="):
        list(read_documents(tmp_path / "dd"))
    with pytest.raises(DataError, match="row 0: field 'n' is int, not a string"):
        list(read_documents(tmp_path / "ds.parquet", field="n"))


def test_windows_batch():
    ws = [torch.arange(4) + i for i in range(5)]
    batches = list(window_batches(ws, 2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert len(list(window_batches(ws, 2, drop_last=True))) == 2


def test_analysis_mask_excludes_bos_and_padding():
    ids = torch.tensor([[2, 5, 6, 2], [0, 0, 2, 7]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    keep = analysis_mask({"input_ids": ids, "attention_mask": mask}, bos_token_id=2)
    assert keep.tolist() == [[False, True, True, False], [False, False, False, True]]
    assert analysis_mask({"input_ids": ids, "attention_mask": mask}, keep_bos=True).tolist() == mask.bool().tolist()
    windows = torch.tensor([[2, 5, 6], [2, 7, 8]])
    assert analysis_mask(windows).tolist() == [[False, True, True], [False, True, True]]
