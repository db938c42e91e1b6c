"""Chat and preference data: ``train.data.format: chat | preference``.

Records come from ``train.data.path``, a JSONL file (one JSON object a line; blank lines skipped):
``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` for ``chat``,
``{"prompt": str, "chosen": str, "rejected": str}`` for ``preference``. A bad record is a ConfigError
naming its line. Without a path, the embedded ``python-docs`` set (:mod:`zoo.train.instructions`), split by
module. A JSONL file is split by record with the seeded shuffle of ``zoo.train.data.split_documents``.

Records are rendered with the tokenizer's chat template (:func:`zoo.tokenizer.with_chat_tokens` adds zoo's)
piece by piece: everything up to and including each assistant turn's generation prompt is context, the
assistant's reply through its end marker is the target. :func:`encode_chat` gives ``input_ids`` and
``labels`` (the ids on target tokens, ``-100`` elsewhere), cut to ``seq_len``. A preference record is the
prompt as a user turn followed by each response as the assistant's. Batches pad on the right with the
end-of-text id (the model is causal, so padding after a sequence never changes what comes before it) to
the longest sequence of the batch: ``{"input_ids", "labels"}`` of shape ``(B, T)`` for chat, and for
preference ``(2B, T)`` with the ``B`` chosen sequences first, then the ``B`` rejected ones in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.errors import ConfigError
from zoo.tokenizer import END_OF_TURN, with_chat_tokens
from zoo.train import instructions
from zoo.train.corpus import split_documents
from zoo.train.data import TrainBatchSampler, ValBatchSampler, build_tokenizer, topology

IGNORE = -100  # the label of positions that are not scored
_ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- records


def read_jsonl(path: str | Path, format: str) -> list[dict]:
    """The records of a JSONL file, each checked for ``format`` (``chat`` or ``preference``)."""
    records = []
    with open(Path(path).expanduser(), encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"train.data.path {str(path)!r}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            problem = _chat_problem(record) if format == "chat" else _preference_problem(record)
            if problem:
                raise ConfigError(f"{where}: {problem}")
            records.append(record)
    if len(records) < 2:
        raise ConfigError(f"train.data.path {str(path)!r} holds {len(records)} record(s); a train/validation "
                          "split needs 2")
    return records


def _chat_problem(record) -> str | None:
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        return 'expected {"messages": [{"role": ..., "content": ...}, ...]} with at least one message'
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            return f"messages[{i}] must be {{\"role\": one of {', '.join(_ROLES)}, \"content\": a string}}, got {m!r}"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to learn from"
    return None


def _preference_problem(record) -> str | None:
    if not isinstance(record, dict):
        return 'expected {"prompt": ..., "chosen": ..., "rejected": ...}'
    missing = [key for key in ("prompt", "chosen", "rejected") if not isinstance(record.get(key), str)]
    return f"{', '.join(missing)} must be string(s)" if missing else None


def split_records(data) -> tuple[list[dict], list[dict]]:
    """``(train, val)`` records of ``train.data`` (a :class:`~zoo.train.config.DataConfig`)."""
    if data.path is None:
        modules = instructions.stdlib_modules()
        train_names, val_names = instructions.split_modules(list(modules), data.val_fraction, data.split_seed)
        build = instructions.chat_records if data.format == "chat" else instructions.preference_records
        return build(modules, train_names), build(modules, val_names)
    records = read_jsonl(data.path, data.format)
    train_idx, val_idx = split_documents(len(records), data.val_fraction, data.split_seed)
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


# --------------------------------------------------------------------------- encoding


def encode_chat(tokenizer, messages: list[dict], seq_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a conversation in the tokenizer's chat template, cut to ``seq_len``:
    labels are the ids on each assistant reply (its content and end marker), ``-100`` on the rest."""
    ids, labels, done = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            piece = tokenizer.encode(prompt[len(done):])
            ids += piece
            labels += [IGNORE] * len(piece)
            done = prompt
        text = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not text.startswith(done):
            raise ValueError("the chat template does not render a conversation as a prefix of its continuation")
        piece = tokenizer.encode(text[len(done):])
        ids += piece
        labels += piece if message["role"] == "assistant" else [IGNORE] * len(piece)
        done = text
    return ids[:seq_len], labels[:seq_len]


def encode_preference(tokenizer, record: dict, seq_len: int) -> tuple[tuple[list[int], list[int]], ...]:
    """``((chosen ids, labels), (rejected ids, labels))`` of a preference record (:func:`encode_chat`)."""
    user = {"role": "user", "content": record["prompt"]}
    return tuple(encode_chat(tokenizer, [user, {"role": "assistant", "content": record[key]}], seq_len)
                 for key in ("chosen", "rejected"))


def pad_batch(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """``{"input_ids", "labels"}`` ``(len(sequences), longest)``, right-padded with ``pad_id`` / ``-100``."""
    T = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), T), IGNORE, dtype=torch.long)
    for row, (ids, target) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, :len(target)] = torch.tensor(target, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


class EncodedRecords(Dataset):
    """Encoded records, indexed by a list of indices (a whole batch at once, as the samplers give) into a
    padded batch. Records whose target was cut away entirely by ``seq_len`` are left out (``dropped``)."""

    def __init__(self, tokenizer, records: list[dict], format: str, seq_len: int):
        self.format, self.pad_id = format, tokenizer.eot_id
        encode = encode_preference if format == "preference" else lambda t, r, n: (encode_chat(t, r["messages"], n),)
        encoded = [encode(tokenizer, record, seq_len) for record in records]
        self.items = [pieces for pieces in encoded if all(any(x != IGNORE for x in labels) for _, labels in pieces)]
        self.dropped = len(encoded) - len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, indices) -> dict[str, torch.Tensor]:
        items = [self.items[i] for i in indices]
        return pad_batch([pieces[k] for k in range(len(items[0])) for pieces in items], self.pad_id)


# --------------------------------------------------------------------------- the data module


class ChatDataModule(L.LightningDataModule):
    """Chat or preference batches (module docstring) for a :class:`zoo.ZooConfig` whose ``train.data.format``
    is ``chat`` or ``preference``; resumable and rank-sharded like :class:`zoo.train.data.ZooDataModule`
    (same samplers). ``tokenizer`` is ``train.data.tokenizer`` with the chat markers added."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self._splits: tuple[EncodedRecords, EncodedRecords] | None = None
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = with_chat_tokens(build_tokenizer(self.config.train.data))
        return self._tokenizer

    def prepare(self) -> tuple[EncodedRecords, EncodedRecords]:
        if self._splits is None:
            data = self.config.train.data
            train, val = split_records(data)
            self._splits = tuple(EncodedRecords(self.tokenizer, part, data.format, data.seq_len) for part in (train, val))
            dropped = sum(split.dropped for split in self._splits)
            if dropped:
                print(f"train.data: {dropped} record(s) left out, their replies start beyond train.data.seq_len="
                      f"{data.seq_len} tokens", flush=True)
        return self._splits

    def setup(self, stage: str) -> None:
        self.prepare()

    def _loader(self, dataset: EncodedRecords, sampler) -> DataLoader:
        data = self.config.train.data
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=data.num_workers,
                          persistent_workers=data.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        train, (records, _) = self.config.train, self.prepare()
        rank, world, start = topology(self.trainer)
        return self._loader(records, TrainBatchSampler(len(records), train.batch_size, train.seed, rank, world, start))

    def val_dataloader(self) -> DataLoader:
        train, (_, records) = self.config.train, self.prepare()
        rank, world, _ = topology(self.trainer)
        return self._loader(records, ValBatchSampler(len(records), train.batch_size, train.val_batches, rank, world))


def chat_sample(model, tokenizer, records: EncodedRecords, n_tokens: int) -> str:
    """The question of the first validation record and the model's greedy answer, up to its end marker."""
    ids, labels = records.items[0][0]
    start = next(t for t, label in enumerate(labels) if label != IGNORE)
    prompt = torch.tensor([ids[:start]])
    out = model.generate(prompt, max_new_tokens=min(n_tokens, model.config.max_seq_len - start))[0, start:].tolist()
    end = tokenizer.tokenizer.token_to_id(END_OF_TURN)
    answer = tokenizer.decode(out[:out.index(end)] if end in out else out)
    return f"{tokenizer.decode(ids[:start]).strip()}\n{answer}"
