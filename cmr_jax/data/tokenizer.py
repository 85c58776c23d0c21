"""BERT-style lower-case WordPiece tokenisation of report text (HF `tokenizers`).

A tokenizer is fully described by a BERT `vocab.txt` (one token per line, the line number is the
id), so one trained on our reports and a published one (e.g. PubMedBERT's uncased vocabulary)
load the same way. Encoding gives fixed-length id and mask arrays: [CLS] tokens [SEP] [PAD]...
"""

from __future__ import annotations

import collections
import collections.abc
import heapq
import os
import re
import tempfile

import numpy as np
import tokenizers
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers

from cmr_jax import files

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
VOCAB_FILE = "vocab.txt"
CONTINUATION = "##"  # WordPiece's prefix of a piece that continues a word
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
    """Writes `vocab.txt` to out_dir (a folder or a gs:// URL); returns its path."""
    if not files.is_url(out_dir):
      os.makedirs(out_dir, exist_ok=True)
      self._tok.model.save(out_dir)
      return os.path.join(out_dir, VOCAB_FILE)
    with tempfile.TemporaryDirectory() as tmp:
      self._tok.model.save(tmp)
      path = files.join(out_dir, VOCAB_FILE)
      files.copy(os.path.join(tmp, VOCAB_FILE), path)
    return path


def word_counts(texts: collections.abc.Iterable[str]) -> collections.Counter:
  """Words of the texts as the tokenizer sees them (BERT lower-casing, accent stripping and
  splitting on white space and punctuation) with their counts."""
  tok = _bert_pipeline(models.WordPiece(unk_token=UNK))  # its normalizer and pre-tokenizer
  counts: collections.Counter = collections.Counter()
  for text in texts:
    counts.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(
        tok.normalizer.normalize_str(text)))
  return counts


def _merge(symbols: list[str], left: str, right: str, merged: str) -> list[str]:
  out, i = [], 0
  while i < len(symbols):
    if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
      out.append(merged)
      i += 2
    else:
      out.append(symbols[i])
      i += 1
  return out


def learn_vocabulary(counts: collections.abc.Mapping[str, int], vocab_size: int) -> list[str]:
  """A WordPiece vocabulary learnt by byte-pair merges, the same way for the same word counts.

  As Hugging Face's WordPiece trainer: the special tokens, every character (word-initial, and
  with the "##" continuation prefix inside words), then the most frequent adjacent pair of
  symbols merged into a new one until `vocab_size` tokens. Unlike that trainer (which breaks
  frequency ties in hash-map order: two trainings on one corpus gave vocabularies differing in
  116 of 600 tokens), ties go to the lexicographically smallest pair, so the vocabulary is a
  function of the counts alone. The alphabet is always kept whole (it may exceed vocab_size).

  Returns:
    The tokens in id order.
  """
  words = sorted(counts)
  freq = [int(counts[w]) for w in words]
  symbols = [[w[0]] + [CONTINUATION + c for c in w[1:]] for w in words]
  vocab = list(SPECIAL_TOKENS)
  vocab += [a for a in sorted({s for syms in symbols for s in syms}) if a not in vocab]
  known = set(vocab)
  pair_count: collections.Counter = collections.Counter()
  where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
  for i, syms in enumerate(symbols):
    for pair in zip(syms, syms[1:]):
      pair_count[pair] += freq[i]
      where[pair].add(i)
  heap = [(-c, pair) for pair, c in pair_count.items()]
  heapq.heapify(heap)
  while len(vocab) < vocab_size and heap:
    neg, pair = heapq.heappop(heap)
    if pair_count.get(pair, 0) != -neg or neg == 0:
      continue  # a stale entry: the pair's count changed since it was pushed
    left, right = pair
    merged = left + right[len(CONTINUATION):]
    if merged not in known:
      vocab.append(merged)
      known.add(merged)
    changed = set()
    for i in sorted(where.pop(pair)):
      old = symbols[i]
      for p in zip(old, old[1:]):
        pair_count[p] -= freq[i]
        where[p].discard(i)
        changed.add(p)
      symbols[i] = new = _merge(old, left, right, merged)
      for p in zip(new, new[1:]):
        pair_count[p] += freq[i]
        where[p].add(i)
        changed.add(p)
    pair_count.pop(pair, None)
    for p in sorted(changed - {pair}):
      if pair_count[p] > 0:
        heapq.heappush(heap, (-pair_count[p], p))
  return vocab


def train_tokenizer(texts: collections.abc.Iterable[str], vocab_size: int,
                    out_dir: str | None = None) -> TextTokenizer:
  """Learns a lower-case WordPiece vocabulary on texts (`learn_vocabulary`: the same texts, in
  any order, give the same vocabulary); saves vocab.txt to out_dir if given."""
  vocab = learn_vocabulary(word_counts(texts), vocab_size)
  out = TextTokenizer(_bert_pipeline(models.WordPiece(
      vocab={t: i for i, t in enumerate(vocab)}, unk_token=UNK,
      continuing_subword_prefix=CONTINUATION)))
  if out_dir is not None:
    out.save(out_dir)
  return out


def load_tokenizer(vocab_txt_path: str) -> TextTokenizer:
  """Loads a BERT-style lower-case vocab.txt (ours or e.g. PubMedBERT's uncased vocabulary)."""
  if not files.isfile(vocab_txt_path):
    raise FileNotFoundError(f"vocabulary file {vocab_txt_path} not found")
  if not files.is_url(vocab_txt_path):
    return TextTokenizer(_bert_pipeline(models.WordPiece.from_file(vocab_txt_path, unk_token=UNK)))
  with tempfile.TemporaryDirectory() as tmp:  # the tokenizers library reads local files only
    local = os.path.join(tmp, VOCAB_FILE)
    files.copy(vocab_txt_path, local)
    return TextTokenizer(_bert_pipeline(models.WordPiece.from_file(local, unk_token=UNK)))
