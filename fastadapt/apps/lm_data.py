"""Text that ships with Python, as two language-modelling domains for ``fastadapt demo-lm`` (issue 14):

* ``prose``: English prose, the help topics of the interactive help (``pydoc_data/topics.py``, a dict of
  topic name -> text, located with ``importlib.util.find_spec`` and read without importing it);
* ``code``: Python source, a fixed list of standard-library modules (:data:`CODE_MODULES`, read in that
  order; a module missing from this Python is skipped), each cut into top-level definitions.

Documents are split deterministically into train/val (every ``VAL_EVERY``-th document, in sorted order, is
held out), a byte-level BPE tokenizer is trained on the training documents of both domains with Hugging
Face ``tokenizers`` (seconds), and each split becomes fixed-length token sequences: the documents'
tokens, each document followed by ``<eos>``, packed end to end and cut every ``seq_len`` tokens; the last,
short sequence is padded with ``<pad>`` and its labels there are -100. ``labels`` are the token ids
themselves (unshifted, as in Hugging Face); the loss shifts them (fastadapt/training/lm.py).

The text depends on the Python version (the stdlib's files change between releases): a report should
name the version it ran on (``sys.version``).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import sysconfig

import torch

IGNORE_INDEX = -100
PAD, EOS = "<pad>", "<eos>"
VAL_EVERY = 10  # documents 0, 10, 20, ... (sorted) are the validation split

# About 630 KB of source on CPython 3.11, ordinary library code (no tests, no generated tables).
CODE_MODULES = ("argparse", "ast", "contextlib", "dataclasses", "enum", "fractions", "functools", "pathlib",
                "random", "shutil", "statistics", "threading")
DOMAINS = ("prose", "code")


def prose_documents() -> list[str]:
    """The help topics' texts, sorted by topic name."""
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("pydoc_data/topics.py is not part of this Python installation")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    # the module is one assignment `topics = {...}` of string literals: evaluated as a literal, not executed
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [topics[k] for k in sorted(topics)]
    raise ValueError(f"{spec.origin} has no `topics = {{...}}` assignment")


def code_documents(modules=CODE_MODULES) -> list[str]:
    """The source of each of ``modules`` found in this Python's standard library, in the given order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    docs = []
    for name in modules:
        path = os.path.join(stdlib, f"{name}.py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                docs.extend(_top_level_chunks(f.read()))
    if not docs:
        raise FileNotFoundError(f"none of {list(modules)} found under {stdlib}")
    return docs


def _top_level_chunks(source: str) -> list[str]:
    """A module cut before each top-level ``def``/``class``/decorator line: a few hundred documents per
    domain instead of a dozen files, so that a 1-in-10 held-out split is a fair sample of the code."""
    return [c for c in re.split(r"\n(?=(?:class |def |async def |@))", source) if c.strip()]


def documents(domain: str) -> list[str]:
    if domain == "prose":
        return prose_documents()
    if domain == "code":
        return code_documents()
    raise ValueError(f"domain must be one of {list(DOMAINS)}, got {domain!r}")


def split(docs: list[str], val_every: int = VAL_EVERY) -> tuple[list[str], list[str]]:
    """(train, val): every ``val_every``-th document (from the first) is held out."""
    return ([d for i, d in enumerate(docs) if i % val_every], [d for i, d in enumerate(docs) if not i % val_every])


def train_tokenizer(texts, vocab_size: int = 4096):
    """A byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on ``texts``: ids 0 and 1 are
    ``<pad>`` and ``<eos>``; every byte has a token, so any text encodes. Deterministic for given texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tokenizer, docs: list[str]) -> list[list[int]]:
    """Each document's ids followed by ``<eos>``."""
    eos = tokenizer.token_to_id(EOS)
    return [e.ids + [eos] for e in tokenizer.encode_batch(docs)]


def pack(encoded: list[list[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels), both ``(n, seq_len)`` int64: the documents' ids end to end, cut every ``seq_len``;
    the last sequence padded with ``pad_id``, its labels -100 there (the other labels are the ids)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    flat = torch.tensor([t for doc in encoded for t in doc], dtype=torch.long)
    n = -(-len(flat) // seq_len)
    ids = torch.full((n * seq_len,), pad_id, dtype=torch.long)
    ids[:len(flat)] = flat
    labels = torch.full((n * seq_len,), IGNORE_INDEX, dtype=torch.long)
    labels[:len(flat)] = flat
    return ids.view(n, seq_len), labels.view(n, seq_len)


@dataclasses.dataclass
class LMCorpus:
    """The domains, tokenized and packed: ``splits[domain][split] = (ids, labels)``."""
    tokenizer: object
    seq_len: int
    splits: dict
    documents: dict = dataclasses.field(default_factory=dict)  # {domain: {split: number of documents}}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return self.tokenizer.token_to_id(PAD)


def build_corpus(seq_len: int = 128, vocab_size: int = 4096, domains=DOMAINS) -> LMCorpus:
    """Read, split, train the tokenizer on the training documents of every domain, encode and pack."""
    return corpus_from_documents({d: documents(d) for d in domains}, seq_len, vocab_size)


def corpus_from_documents(domains: dict, seq_len: int = 128, vocab_size: int = 4096) -> LMCorpus:
    """:func:`build_corpus` of given documents: ``{domain name: [document, ...]}``."""
    docs = {d: split(texts) for d, texts in domains.items()}
    tok = train_tokenizer([t for d in docs for t in docs[d][0]], vocab_size)
    pad = tok.token_to_id(PAD)
    splits = {d: {name: pack(encode(tok, part), seq_len, pad) for name, part in zip(("train", "val"), docs[d])}
              for d in docs}
    return LMCorpus(tok, seq_len, splits, {d: {"train": len(docs[d][0]), "val": len(docs[d][1])} for d in docs})


def tokens(pair) -> int:
    """The real (not padding) tokens of packed ``(ids, labels)``."""
    return int((pair[1] != IGNORE_INDEX).sum())
