"""Pseudonyms: keyed hashes, salt handling, scrubbing identifiers from free text."""

import pytest

from cmr_jax.dicom import pseudonym


def test_resolve_salt_refuses_without_a_salt(monkeypatch):
  monkeypatch.delenv(pseudonym.SALT_ENV_VAR, raising=False)
  with pytest.raises(pseudonym.SaltError, match=r"--salt.*\$CMR_JAX_SALT"):
    pseudonym.resolve_salt(None)
  with pytest.raises(pseudonym.SaltError, match="at least 8 characters"):
    pseudonym.resolve_salt("short")
  assert pseudonym.resolve_salt("", allow_default=True) == pseudonym.DEMO_SALT
  monkeypatch.setenv(pseudonym.SALT_ENV_VAR, "from-the-environment")
  assert pseudonym.resolve_salt(None) == "from-the-environment"
  assert pseudonym.resolve_salt("given-on-the-command-line") == "given-on-the-command-line"


def test_pseudonyms_are_keyed_deterministic_and_namespaced():
  a = pseudonym.pseudonym("salt-one-1234", pseudonym.SUBJECT, "1234567")
  assert a == pseudonym.pseudonym("salt-one-1234", pseudonym.SUBJECT, "1234567")
  assert a.startswith("sub-") and len(a) == 4 + pseudonym.DIGEST_HEX_CHARS
  assert "1234567" not in a
  assert a != pseudonym.pseudonym("salt-two-1234", pseudonym.SUBJECT, "1234567")
  assert a[4:] != pseudonym.pseudonym("salt-one-1234", pseudonym.STUDY, "1234567")[4:]
  assert a != pseudonym.pseudonym("salt-one-1234", pseudonym.SUBJECT, "1234568")


def test_scrub_text_removes_name_parts_ids_and_date_spellings():
  text = ("Mrs ALICE Testpatient (ID PID-42), scanned 30/08/2015 = 2015-08-30. "
          "Normal LV size; LVEF 62%. Li was present.")
  out = pseudonym.scrub_text(text, ["Testpatient^Alice", "PID-42", "20150830", "LI"])
  for leaked in ("ALICE", "Testpatient", "PID-42", "30/08/2015", "2015-08-30"):
    assert leaked.lower() not in out.lower()
  assert "Normal LV size; LVEF 62%." in out  # clinical text kept
  assert "Li was present" in out  # two-letter values are not scrubbed: they erase words
  assert pseudonym.scrub_text(text, []) == text
