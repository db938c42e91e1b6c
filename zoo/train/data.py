"""Training data: tokenizers, token caches and the LightningDataModule, over the corpora of
:mod:`zoo.train.corpus`.

A corpus is a list of documents: ``python-stdlib`` (the ``.py`` sources of the running interpreter's
standard library, tests excluded, ~12 MB), ``pydoc-topics`` (``pydoc_data.topics``, ~0.5 MB of English),
a text file (cut at line boundaries into ~4 KB documents), a folder of text files, or a glob. Documents
are split into train/validation by a seeded shuffle, tokenised once, joined with ``<|endoftext|>`` and
stored as a ``.npy`` file under the cache directory (``$ZOO_CACHE``, default ``~/.cache/zoo``) keyed
by the corpus' files, the tokenizer and the split; batches are memory-mapped windows of that array.

Windows are ``seq_len`` tokens long and overlap by one token, so that with labels equal to the inputs
(the model shifts them) every token of the stream is predicted exactly once per epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from zoo.errors import ConfigError
from zoo.train.config import DataConfig
from zoo.train.corpus import Corpus, atomic_write, cache_dir, cache_key, get_corpus, split_documents
from zoo.tokenizer import ByteTokenizer, HFTokenizer, train_bpe

_FORMAT = "zoo-tokens-v1"  # bump when the cache layout or the split changes


# --------------------------------------------------------------------------- tokenizers and caches


def build_tokenizer(data: DataConfig, corpus: Corpus | None = None, documents: list[str] | None = None):
    """The tokenizer ``data.tokenizer`` names; ``bpe`` is trained on the training split once and cached."""
    if data.tokenizer == "bytes":
        return ByteTokenizer()
    if data.tokenizer == "bpe":
        corpus = corpus or get_corpus(data.corpus)
        path = _bpe_cache_path(data, corpus)
        if path.is_file():
            return HFTokenizer.from_file(path)
        documents = documents if documents is not None else corpus.load()
        train_idx, _ = split_documents(len(documents), data.val_fraction, data.split_seed)
        tokenizer = train_bpe((documents[i] for i in train_idx), data.bpe_vocab_size)
        atomic_write(path, tokenizer.to_json().encode())
        return tokenizer
    path = Path(data.tokenizer).expanduser()
    if path.suffix != ".json" or not path.is_file():
        raise ConfigError(f"train.data.tokenizer: {data.tokenizer!r} is not 'bytes', 'bpe' or an existing "
                          "tokenizer.json file")
    try:
        return HFTokenizer.from_file(path)
    except ValueError as err:
        raise ConfigError(f"train.data.tokenizer: {err}") from None


def _bpe_cache_path(data: DataConfig, corpus: Corpus) -> Path:
    key = cache_key("bpe", corpus.fingerprint, data.split_seed, data.val_fraction, data.bpe_vocab_size, _tokenizers_version())
    return cache_dir() / "tokenizers" / f"bpe-{data.bpe_vocab_size}-{key}.json"


def tokenizer_fingerprint(tokenizer) -> str:
    if isinstance(tokenizer, ByteTokenizer):
        return "bytes"
    return hashlib.sha256(tokenizer.to_json().encode()).hexdigest()


@dataclass
class TokenizedCorpus:
    """The tokenizer and the train/validation token streams (memory-mapped, documents joined by eot)."""

    tokenizer: object
    train: np.ndarray
    val: np.ndarray


def prepare_tokens(data: DataConfig) -> TokenizedCorpus:
    """Tokenise the corpus' splits once, cached on disk; later calls only memory-map the arrays."""
    corpus = get_corpus(data.corpus)
    documents = None
    if data.tokenizer == "bpe":
        # Training the tokenizer reads the corpus; keep the documents for tokenising on a cache miss.
        if not _bpe_cache_path(data, corpus).is_file():
            documents = corpus.load()
    tokenizer = build_tokenizer(data, corpus, documents)
    key = cache_key(_FORMAT, corpus.fingerprint, tokenizer_fingerprint(tokenizer), data.split_seed, data.val_fraction)
    folder = cache_dir() / "tokens" / key
    paths = {part: folder / f"{part}.npy" for part in ("train", "val")}
    if not all(p.is_file() for p in paths.values()):
        documents = documents if documents is not None else corpus.load()
        train_idx, val_idx = split_documents(len(documents), data.val_fraction, data.split_seed)
        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        for part, idx in (("train", train_idx), ("val", val_idx)):
            stream = _join_documents(tokenizer, [documents[i] for i in idx], dtype)
            _atomic_save_npy(paths[part], stream)
        atomic_write(folder / "meta.json", json.dumps({
            "corpus": data.corpus, "tokenizer": data.tokenizer, "vocab_size": tokenizer.vocab_size,
            "split_seed": data.split_seed, "val_fraction": data.val_fraction,
            "documents": {"train": len(train_idx), "val": len(val_idx)}}, indent=2).encode())
    return TokenizedCorpus(tokenizer, np.load(paths["train"], mmap_mode="r"), np.load(paths["val"], mmap_mode="r"))


def _join_documents(tokenizer, documents: list[str], dtype) -> np.ndarray:
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    pieces = []
    for ids in tokenizer.encode_batch(documents):
        pieces += [np.asarray(ids, dtype=dtype), eot]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- batches


class PackedWindows(Dataset):
    """Windows of ``seq_len`` tokens starting every ``seq_len - 1`` tokens of a token stream.

    Indexed by a list of window indices (a whole batch at once): returns ``(len(indices), seq_len)``
    int64 ids, gathered from the memory-mapped stream in one fancy-indexing read.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if seq_len < 2:
            raise ConfigError(f"train.data.seq_len must be >= 2, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_windows = max(0, (len(tokens) - seq_len) // (seq_len - 1) + 1)
        self._offsets = np.arange(seq_len)

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, indices) -> torch.Tensor:
        starts = np.asarray(indices, dtype=np.int64) * (self.seq_len - 1)
        return torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))


class TrainBatchSampler(Sampler):
    """An endless, resumable, rank-sharded stream of window-index batches.

    Global sample positions run through seeded permutations of all windows, one per epoch. Micro-batch
    ``m`` covers global positions ``[m * B * W, (m + 1) * B * W)`` (``B`` the per-rank batch, ``W`` the
    world size) and rank ``r`` takes the ``r``-th slice of ``B``: so ``W`` ranks with batch ``B`` see the
    same global batches as one rank with batch ``W * B``, and ``start`` (micro-batches already
    consumed) resumes the stream exactly.
    """

    def __init__(self, n_windows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0):
        if n_windows < 1:
            raise ConfigError("the training split is shorter than one train.data.seq_len window")
        self.n_windows, self.batch_size, self.seed = n_windows, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        epoch, perm = -1, None
        m = self.start
        while True:
            first = m * global_batch + self.rank * self.batch_size
            positions = np.arange(first, first + self.batch_size)
            batch = np.empty(self.batch_size, dtype=np.int64)
            for e in np.unique(positions // self.n_windows):
                if e != epoch:
                    epoch, perm = e, self._permutation(int(e))
                mask = positions // self.n_windows == e
                batch[mask] = perm[positions[mask] % self.n_windows]
            yield batch.tolist()
            m += 1


class ValBatchSampler(Sampler):
    """The first ``n_used`` validation windows in order, split evenly across ranks, in batches."""

    def __init__(self, n_windows: int, batch_size: int, max_batches: int, rank: int = 0, world_size: int = 1):
        n_used = min(n_windows, max_batches * batch_size * world_size)
        per_rank = n_used // world_size
        if per_rank < 1:
            raise ConfigError(f"the validation split has {n_windows} window(s) of train.data.seq_len tokens, "
                              f"fewer than the {world_size} rank(s); raise train.data.val_fraction or lower seq_len")
        first = rank * per_rank
        indices = list(range(first, first + per_rank))
        self.batches = [indices[i:i + batch_size] for i in range(0, per_rank, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ZooDataModule(L.LightningDataModule):
    """Train/validation batches of ``(batch_size, seq_len)`` token ids for a :class:`zoo.ZooConfig`.

    ``prepare()`` builds the tokenizer and the token caches (call it before building the model when
    ``model.vocab_size`` should follow the tokenizer); the training loader resumes at the trainer's
    ``global_step`` and is sharded over data-parallel ranks by :class:`TrainBatchSampler`.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.corpus: TokenizedCorpus | None = None

    @property
    def tokenizer(self):
        return self.prepare().tokenizer

    def prepare(self) -> TokenizedCorpus:
        if self.corpus is None:
            self.corpus = prepare_tokens(self.config.train.data)
        return self.corpus

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str) -> None:
        self.prepare()

    def _loader(self, tokens: np.ndarray, sampler: Sampler) -> DataLoader:
        data = self.config.train.data
        dataset = PackedWindows(tokens, data.seq_len)
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=data.num_workers,
                          persistent_workers=data.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        train = self.config.train
        rank, world, start = topology(self.trainer)
        windows = PackedWindows(self.prepare().train, train.data.seq_len)
        sampler = TrainBatchSampler(len(windows), train.batch_size, train.seed, rank, world, start)
        return self._loader(self.prepare().train, sampler)

    def val_dataloader(self) -> DataLoader:
        train = self.config.train
        rank, world, _ = topology(self.trainer)
        windows = PackedWindows(self.prepare().val, train.data.seq_len)
        sampler = ValBatchSampler(len(windows), train.batch_size, train.val_batches, rank, world)
        return self._loader(self.prepare().val, sampler)


def topology(trainer) -> tuple[int, int, int]:
    """``(rank, world size, micro-batches already done)`` of a data module's trainer (``(0, 1, 0)`` without
    one): the samplers shard batches by rank and resume after the batches a restored run has seen."""
    if trainer is None:
        return 0, 1, 0
    return trainer.global_rank, trainer.world_size, trainer.global_step * trainer.accumulate_grad_batches
