"""Data: corpora, the document split, tokenizers (bytes, BPE, tokenizer.json), token caches, samplers."""

import random

import numpy as np
import pytest

from zoo.train import corpus
from zoo.train import data as zdata
from zoo.errors import ConfigError
from zoo.train.config import DataConfig
from zoo.tokenizer import ByteTokenizer, HFTokenizer, train_bpe


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


def _random_texts(n=40, seed=0):
    rng = random.Random(seed)
    alphabet = "abc xyz\n\t\r  é中🐍\x00\x7f\u200b" + "".join(chr(rng.randrange(32, 0x3000)) for _ in range(60))
    texts = ["", " ", "\n\n", "héllo wörld 🐍", "def f(x):\n    return x  # ok\r\n"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 80))) for _ in range(n)]
    return texts


def test_bytes_round_trip_and_json_equivalent():
    tok = ByteTokenizer()
    exported = HFTokenizer.from_str(tok.to_json())
    assert (exported.vocab_size, exported.eot_id) == (257, 256)
    for text in _random_texts():
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert exported.encode(text) == ids
        assert exported.decode(ids) == text
    rng = random.Random(1)
    for _ in range(100):  # any id sequence, invalid UTF-8 included, decodes alike
        ids = [rng.randrange(257) for _ in range(rng.randrange(20))]
        assert exported.decode(ids) == tok.decode(ids)


def test_bpe_deterministic_and_round_trips():
    docs = corpus.get_corpus("pydoc-topics").load()[:30]
    a, b = train_bpe(docs, 400), train_bpe(docs, 400)
    assert a.to_json() == b.to_json()
    assert a.vocab_size == 400 and a.eot_id is not None
    for text in _random_texts() + docs[:3]:
        assert a.decode(a.encode(text)) == text
    assert len(a.encode(docs[0])) < len(docs[0].encode()) * 0.6  # it learned merges


def test_bpe_cache_hit(monkeypatch):
    cfg = DataConfig(corpus="pydoc-topics", tokenizer="bpe", bpe_vocab_size=300)
    first = zdata.build_tokenizer(cfg)

    def no_training(*args, **kwargs):
        raise AssertionError("BPE retrained despite a cached tokenizer")

    monkeypatch.setattr(zdata, "train_bpe", no_training)
    assert zdata.build_tokenizer(cfg).to_json() == first.to_json()
    other = DataConfig(corpus="pydoc-topics", tokenizer="bpe", bpe_vocab_size=301)
    with pytest.raises(AssertionError, match="retrained"):
        zdata.build_tokenizer(other)  # a different setting is a different cache entry


def test_token_cache_hit_and_content(monkeypatch):
    cfg = DataConfig(corpus="pydoc-topics", tokenizer="bytes")
    first = zdata.prepare_tokens(cfg)
    docs = corpus.get_corpus("pydoc-topics").load()
    train_idx, val_idx = corpus.split_documents(len(docs), cfg.val_fraction, cfg.split_seed)
    expected = b"".join(docs[i].encode() + b"\x00" for i in val_idx)
    val = np.asarray(first.val)
    assert (val == 256).sum() == len(val_idx) and val[-1] == 256
    assert bytes(np.where(val == 256, 0, val).astype(np.uint8)) == expected
    assert len(first.train) == sum(len(docs[i].encode()) + 1 for i in train_idx)

    real = corpus.get_corpus("pydoc-topics")
    unreadable = corpus.Corpus(real.name, real.fingerprint, lambda: pytest.fail("corpus re-read on a cache hit"))
    monkeypatch.setattr(zdata, "get_corpus", lambda spec: unreadable)
    second = zdata.prepare_tokens(cfg)
    assert isinstance(second.train, np.memmap)
    np.testing.assert_array_equal(second.train, first.train)


def test_split_is_deterministic_disjoint_and_complete():
    train, val = corpus.split_documents(100, 0.1, seed=3)
    assert len(val) == 10 and set(train).isdisjoint(val) and sorted([*train, *val]) == list(range(100))
    again = corpus.split_documents(100, 0.1, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((train, val), again))
    assert not np.array_equal(val, corpus.split_documents(100, 0.1, seed=4)[1])
    with pytest.raises(ConfigError, match="2"):
        corpus.split_documents(1, 0.1, seed=0)


def test_user_corpora(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n")
    (folder / "sub" / "b.md").write_text("beta\n")
    (folder / "c.bin").write_bytes(b"\xff\xfe\x00\x81")  # not UTF-8: skipped
    (folder / ".hidden").write_text("secret\n")
    assert corpus.get_corpus(str(folder)).load() == ["alpha\n", "beta\n"]
    assert corpus.get_corpus(str(folder / "**" / "*.md")).load() == ["beta\n"]
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i}\n" for i in range(3000)))
    pieces = corpus.get_corpus(str(big)).load()
    assert len(pieces) > 3 and "".join(pieces) == big.read_text()
    with pytest.raises(ConfigError, match="python-stdlib"):
        corpus.get_corpus(str(tmp_path / "missing"))


def test_stdlib_corpus_excludes_tests():
    files = corpus.stdlib_files()
    assert len(files) > 300
    assert not any(p.name.startswith("test_") or "/test/" in str(p) or "/tests/" in str(p) for p in files)


def test_packed_windows_predict_every_token_once():
    tokens = np.arange(100, dtype=np.uint16)
    windows = zdata.PackedWindows(tokens, seq_len=10)
    batch = windows[list(range(len(windows)))]
    assert batch.shape == (11, 10)
    targets = batch[:, 1:].flatten().tolist()  # what the model predicts (labels shifted inside)
    assert targets == list(range(1, 100))


def test_train_sampler_ranks_equal_one_big_batch_and_resume():
    one = iter(zdata.TrainBatchSampler(50, batch_size=8, seed=0))
    ranks = [iter(zdata.TrainBatchSampler(50, batch_size=4, seed=0, rank=r, world_size=2)) for r in range(2)]
    big = [next(one) for _ in range(20)]
    split = [next(ranks[0]) + next(ranks[1]) for _ in range(20)]
    assert big == split
    flat = [i for b in big for i in b]
    assert sorted(flat[:50]) == list(range(50)) and sorted(flat[50:100]) == list(range(50))  # epochs
    resumed = iter(zdata.TrainBatchSampler(50, batch_size=8, seed=0, start=7))
    assert [next(resumed) for _ in range(13)] == big[7:]


def test_val_sampler_splits_the_same_windows():
    one = [i for b in zdata.ValBatchSampler(100, batch_size=8, max_batches=3) for i in b]
    two = [i for r in range(2) for b in zdata.ValBatchSampler(100, batch_size=4, max_batches=3, rank=r, world_size=2)
           for i in b]
    assert one == two == list(range(24))
