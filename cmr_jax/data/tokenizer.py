"""BERT-style lower-case WordPiece tokenisation of report text (HF `tokenizers`).

A tokenizer is fully described by a BERT `vocab.txt` (one token per line, the line number is the
id), so one trained on our reports and a published one (e.g. PubMedBERT's uncased vocabulary)
load the same way. Encoding gives fixed-length id and mask arrays: [CLS] tokens [SEP] [PAD]...
"""

from __future__ import annotations

import collections.abc
import os
import re

import numpy as np
import tokenizers
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import trainers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
VOCAB_FILE = "vocab.txt"
# A sentence ends at ., ! or ? followed by white space ("EF 55.5%" stays one sentence).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentences(text: str, max_sentences: int | None) -> str:
  """The first `max_sentences` sentences of `text` (all of it when None)."""
  if max_sentences is None:
    return text
  return " ".join(_SENTENCE_END.split(text.strip())[:max_sentences])


def _bert_pipeline(model: models.WordPiece) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(model)
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  return tok


class TextTokenizer:
  """A lower-case WordPiece tokenizer with fixed-length BERT-style encoding (picklable)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self._tok = tokenizer
    ids = {t: tokenizer.token_to_id(t) for t in (PAD, CLS, SEP)}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
      raise ValueError(f"vocabulary lacks the special tokens {missing}")
    self.pad_id, self.cls_id, self.sep_id = ids[PAD], ids[CLS], ids[SEP]

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def tokens(self, text: str) -> list[str]:
    """The WordPiece tokens of `text` (no special tokens)."""
    return self._tok.encode(text, add_special_tokens=False).tokens

  def encode(self, texts: collections.abc.Sequence[str], max_len: int,
             max_sentences: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encodes texts to fixed-length ids and attention masks.

    Args:
      texts: N strings.
      max_len: L, including [CLS] and [SEP]; longer texts are truncated before [SEP].
      max_sentences: keep only each text's first sentences (the paper used the opening of
        each report).

    Returns:
      ids: int32 [N, L], [CLS] tokens [SEP] then [PAD]; mask: int32 [N, L], 1 on real tokens.
    """
    if max_len < 2:
      raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
    texts = [first_sentences(t, max_sentences) for t in texts]
    encoded = self._tok.encode_batch(texts, add_special_tokens=False)
    ids = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_len), np.int32)
    for row, enc in enumerate(encoded):
      body = enc.ids[:max_len - 2]
      n = len(body) + 2
      ids[row, :n] = [self.cls_id, *body, self.sep_id]
      mask[row, :n] = 1
    return ids, mask

  def save(self, out_dir: str) -> str:
    """Writes `vocab.txt` to out_dir; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    self._tok.model.save(out_dir)
    return os.path.join(out_dir, VOCAB_FILE)


def train_tokenizer(texts: collections.abc.Iterable[str], vocab_size: int,
                    out_dir: str | None = None) -> TextTokenizer:
  """Trains a lower-case WordPiece vocabulary on texts; saves vocab.txt to out_dir if given.

  The trainer breaks frequency ties in hash-map order, so two trainings on one corpus may give
  different vocabularies: a run must save its vocabulary and reload it (pre-training does).
  """
  tok = _bert_pipeline(models.WordPiece(unk_token=UNK))
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
  tok.train_from_iterator(texts, trainer)
  out = TextTokenizer(tok)
  if out_dir is not None:
    out.save(out_dir)
  return out


def load_tokenizer(vocab_txt_path: str) -> TextTokenizer:
  """Loads a BERT-style lower-case vocab.txt (ours or e.g. PubMedBERT's uncased vocabulary)."""
  if not os.path.isfile(vocab_txt_path):
    raise FileNotFoundError(f"vocabulary file {vocab_txt_path} not found")
  return TextTokenizer(_bert_pipeline(models.WordPiece.from_file(vocab_txt_path, unk_token=UNK)))
