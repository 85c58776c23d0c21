"""Tokenizer: training, vocab.txt round trip, fixed-length encoding, sentence selection."""

import pickle

import numpy as np
import pytest

from cmr_jax.data import tokenizer

REPORTS = [
    "The left ventricle is normal in size. Systolic function is severely reduced. EF 25.5%.",
    "Mildly dilated left ventricle. Hypokinesis of the inferior wall. RV function is normal.",
    "Normal left ventricular size and systolic function. No regional wall motion abnormality.",
] * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  return tokenizer.train_tokenizer(REPORTS, vocab_size=120, out_dir=str(out)), out


def test_encode_layout(trained):
  tok, _ = trained
  ids, mask = tok.encode(["Left VENTRICLE is normal.", ""], max_len=8)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 8)
  words = tok.tokens("left ventricle is normal.")
  n = len(words) + 2
  assert ids[0, 0] == tok.cls_id and ids[0, n - 1] == tok.sep_id
  np.testing.assert_array_equal(mask[0], [1] * n + [0] * (8 - n))
  assert (ids[0, n:] == tok.pad_id).all()
  np.testing.assert_array_equal(ids[1, :3], [tok.cls_id, tok.sep_id, tok.pad_id])
  np.testing.assert_array_equal(mask[1], [1, 1, 0, 0, 0, 0, 0, 0])


def test_truncation_keeps_sep(trained):
  tok, _ = trained
  ids, mask = tok.encode([REPORTS[0]], max_len=6)
  assert ids[0, 0] == tok.cls_id and ids[0, -1] == tok.sep_id and mask.all()
  full, _ = tok.encode([REPORTS[0]], max_len=64)
  np.testing.assert_array_equal(ids[0, 1:5], full[0, 1:5])


def test_save_load_round_trip(trained):
  tok, out = trained
  loaded = tokenizer.load_tokenizer(str(out / tokenizer.VOCAB_FILE))
  assert loaded.vocab_size == tok.vocab_size == 120
  for pair in ((tok, loaded), (tok, pickle.loads(pickle.dumps(tok)))):
    a, b = (t.encode(REPORTS[:3], max_len=40) for t in pair)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_max_sentences(trained):
  tok, _ = trained
  assert tokenizer.first_sentences(REPORTS[0], 2) == (
      "The left ventricle is normal in size. Systolic function is severely reduced.")
  one, _ = tok.encode([REPORTS[0]], max_len=64, max_sentences=1)
  expected, _ = tok.encode(["The left ventricle is normal in size."], max_len=64)
  np.testing.assert_array_equal(one, expected)


def test_vocab_without_special_tokens_is_refused(tmp_path):
  path = tmp_path / "vocab.txt"
  path.write_text("hello\nworld\n[UNK]\n")
  with pytest.raises(ValueError, match=r"lacks the special tokens \['\[PAD\]', '\[CLS\]'"):
    tokenizer.load_tokenizer(str(path))


def test_vocabulary_is_learnt_by_frequent_merges_with_ties_broken_by_order():
  counts = tokenizer.word_counts(["low LOW low", "lower, lowest"])
  assert counts == {"low": 3, "lower": 1, "lowest": 1, ",": 1}
  vocab = tokenizer.learn_vocabulary(counts, vocab_size=5 + 8 + 3)
  alphabet = ["##e", "##o", "##r", "##s", "##t", "##w", ",", "l"]  # code point order
  # (##o, ##w) and (l, ##o) both occur 5 times: the smaller pair first; then low, lowe.
  assert vocab == list(tokenizer.SPECIAL_TOKENS) + alphabet + ["##ow", "low", "lowe"]
  longer = tokenizer.learn_vocabulary(counts, vocab_size=100)  # merges run out
  # Three pairs occur once: (##s, ##t) < (lowe, ##r) < (lowe, ##s); then lowe + ##st.
  assert longer[len(vocab):] == ["##st", "lower", "lowest"]
  tok = tokenizer.train_tokenizer(["low LOW low", "lower, lowest"], vocab_size=len(vocab))
  assert tok.tokens("Lowest lower, ol") == ["lowe", "##s", "##t", "lowe", "##r", ",", "[UNK]"]


def test_the_same_texts_in_any_order_give_the_same_vocabulary(tmp_path):
  rng = np.random.default_rng(0)
  a = tokenizer.train_tokenizer(REPORTS, vocab_size=120, out_dir=str(tmp_path / "a"))
  shuffled = [REPORTS[i] for i in rng.permutation(len(REPORTS))]
  b = tokenizer.train_tokenizer(shuffled, vocab_size=120, out_dir=str(tmp_path / "b"))
  assert a.vocab_size == b.vocab_size == 120
  assert ((tmp_path / "a" / tokenizer.VOCAB_FILE).read_text()
          == (tmp_path / "b" / tokenizer.VOCAB_FILE).read_text())
