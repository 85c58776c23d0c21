"""Hostile and unusual inputs: file names that are not UTF-8, library loggers printing paths,
headers claiming more than the limits or the file allow, oversized files and zip members, deflate
bombs, FIFOs and devices, symbolic links.

Every input is built here (tmp_path, pydicom, `dicom_writer`). The ingest and predict programs
run as subprocesses on one hostile export, where a leak would show in their output and a hang as
a timeout; the other tests call the library and fail fast before the fix (no decoding, no read of
a FIFO that could block the test).
"""

import hashlib
import hmac
import io
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile

import pydicom
from pydicom.data import get_testdata_file
import pytest

from cmr_jax.data import records
from cmr_jax.dicom import assemble
from cmr_jax.dicom import files as dicom_files
from cmr_jax.dicom import ingest
from cmr_jax.dicom import layouts
from cmr_jax.dicom import parse
from cmr_jax.dicom import pseudonym
from cmr_jax.predict import inputs as predict_inputs
from cmr_jax.testing import dicom_writer
from cmr_jax.train import finetune

import dicom_testlib
import sweep_testlib
from test_train import finetune_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = "hostile-test-salt-0123"
PATIENT_FOLDER = "DOE_JANE"  # a folder named after its patient
IDENTITY = dicom_writer.fake_identity(7)
NOT_UTF8 = b"IM-\xff\xfe.dcm"  # a file name that is not UTF-8
NOT_UTF8_SHOWN = b"IM-\\xff\\xfe.dcm"  # as printed (`files.printable`)
TOOL_TIMEOUT_S = 180  # a hang (FIFO, /dev/zero) fails the test instead of blocking it
BLOCKED_S = 10.0


def _mr_small(name: str = "MR_small.dcm", **changes) -> bytes:
  """A pydicom test file (64x64 MR, 16 bits) with header values changed."""
  ds = pydicom.dcmread(get_testdata_file(name))
  for keyword, value in changes.items():
    setattr(ds, keyword, value)
  buffer = io.BytesIO()
  ds.save_as(buffer)
  return buffer.getvalue()


def _undefined_length_file() -> bytes:
  """An MR header followed by an element of undefined length without its delimiter: pydicom
  logs "End of file reached before delimiter ... in file <path>"."""
  ds = pydicom.Dataset()
  ds.file_meta = pydicom.dataset.FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = pydicom.uid.MRImageStorage
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1"
  ds.Modality = "MR"
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  undefined = struct.pack("<HH2sHI", 0x0029, 0x1010, b"OB", 0, 0xFFFFFFFF)
  return buffer.getvalue() + undefined + b"\x01" * 64


def _write(path, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return os.fsdecode(path)


def _parse(data: bytes, limits=None) -> str:
  """The skip reason of one file's bytes, read within `limits` (default: the defaults)."""
  options = {"limits": limits} if limits else {}
  return parse.parse_file(dicom_files.FileRef("x.dcm"), data, **options).reason


def _within(seconds: float, fn):
  """fn() run in a daemon thread: its result, or a test failure if it still blocks."""
  out = []
  thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
  thread.start()
  thread.join(seconds)
  assert out, f"still blocked after {seconds} s"
  return out[0]


def _good_study(folder: str) -> list[str]:
  return dicom_writer.write_study(dicom_testlib.phantom_study(0, num_sax=2), folder,
                                  identity=IDENTITY)


def _rename_not_utf8(path: str) -> bytes:
  """Renames a file to `NOT_UTF8` in its folder; returns the new path (bytes)."""
  new = os.path.join(os.fsencode(os.path.dirname(path)), NOT_UTF8)
  os.rename(path, new)
  return new


# ---------------------------------------------------------------------------------------------
# 1. File names that are not UTF-8.


def test_file_names_that_are_not_utf8_get_pseudonyms_and_print_safely(tmp_path):
  name = os.fsdecode(NOT_UTF8)  # surrogate escapes, as os.listdir gives them
  digest = hmac.new(SALT.encode(), "f:a/é.dcm".encode(), hashlib.sha256).hexdigest()
  assert pseudonym.pseudonym(SALT, pseudonym.FILE, "a/é.dcm") == f"f-{digest[:20]}"  # as before
  assert pseudonym.pseudonym(SALT, pseudonym.FILE, name) != pseudonym.pseudonym(
      SALT, pseudonym.FILE, name.replace("\udcfe", "\udcfd"))
  assert dicom_files.printable(name).encode() == NOT_UTF8_SHOWN
  paths = _good_study(str(tmp_path / "in" / "study"))
  _rename_not_utf8(paths[0])
  summary = ingest.run_ingest(ingest.IngestOptions(
      layout=layouts.GENERIC, input=str(tmp_path / "in"), output=str(tmp_path / "out"),
      salt=SALT, preprocess=dicom_testlib.TINY_CFG))
  assert summary.files_in == summary.files_used == len(paths)
  rows = ingest.read_manifest(str(tmp_path / "out" / ingest.MANIFEST))
  renamed = dicom_files.FileRef(os.path.join(os.path.dirname(paths[0]), name))
  assert {r["file"]: r["status"] for r in rows}[
      ingest.file_pseudonym(renamed, str(tmp_path / "in"), SALT)] == assemble.USED
  # A study folder so named, given to predict: its row shows the name printably.
  folder = os.path.join(os.fsencode(str(tmp_path)), b"study-\xff")
  os.rename(os.fsencode(str(tmp_path / "in" / "study")), folder)
  (prepared,) = predict_inputs.prepare_input(os.fsdecode(folder), dicom_testlib.TINY_CFG,
                                             salt=SALT)
  assert prepared.record is not None and prepared.input.endswith("study-\\xff")
  prepared.input.encode("utf-8")


# ---------------------------------------------------------------------------------------------
# 2. Library loggers.


def test_no_library_logger_prints_a_path_or_identifier_while_reading(tmp_path, caplog):
  path = _write(tmp_path / PATIENT_FOLDER / "x.dcm", _undefined_length_file())
  ref = dicom_files.FileRef(path)
  pydicom.config.debug(True, default_handler=False)  # pydicom logs everything, paths included
  try:
    with caplog.at_level(logging.DEBUG):
      header = parse.scan_header(ref)
      (parsed,) = parse.read_files([ref])
      assert logging.getLogger("pydicom").level == logging.DEBUG  # restored after reading
  finally:
    pydicom.config.debug(False)
  assert header.reason == "" and parsed.reason == "no pixel data (not an image)"
  leaks = [r.getMessage() for r in caplog.records if PATIENT_FOLDER in r.getMessage()]
  assert not leaks


# ---------------------------------------------------------------------------------------------
# 4. Limits: checked before reading (sizes) and before decoding (header claims).


def test_headers_claiming_too_much_are_skipped_before_decoding():
  start = time.monotonic()
  assert _parse(_mr_small("MR_small_RLE.dcm", Rows=65535, Columns=65535)) == (
      "header claims 65535x65535 pixels per frame, over the limit of 1048576 pixels "
      "(--max_frame_pixels)")
  assert _parse(_mr_small(NumberOfFrames=100000)) == (
      "header claims 100000 frames, over the limit of 4096 frames per file "
      "(--max_frames_per_file)")
  assert _parse(_mr_small(NumberOfFrames=64)) == (
      "pixel data shorter than its header claims (8192 of 524288 bytes for 64 frames of 64x64 "
      "at 16 bits)")
  assert _parse(_mr_small("MR_small_RLE.dcm", NumberOfFrames=2000)).endswith(
      "bytes cannot hold the 2000 compressed frames its header claims")
  small = dicom_files.ReadLimits(max_pixel_bytes=4096, max_frames_per_file=8)
  assert _parse(_mr_small(), small) == (
      "header claims 8192 bytes of pixel data, over the limit of 4096 bytes per file "
      "(--max_pixel_bytes)")
  assert _parse(_mr_small(NumberOfFrames=16), small).startswith("header claims 16 frames")
  assert not _parse(_mr_small("MR_small_RLE.dcm"))  # within the limits: read as before
  assert time.monotonic() - start < 5.0
  with pytest.raises(ValueError, match="max_frame_pixels must be a positive integer"):
    dicom_files.ReadLimits(max_frame_pixels=0)


def test_deflated_file_inflating_beyond_the_limit_is_refused():
  ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
  ds.add_new(0x00291010, "OB", bytes(1 << 20))  # 1 MiB of zeros deflates to ~1 KB
  ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  data = buffer.getvalue()
  assert len(data) < 100_000
  assert _parse(data, dicom_files.ReadLimits(max_file_bytes=100_000)) == (
      "deflated data set inflates to more than 100000 bytes, over the limit of 100000 bytes per "
      "file (--max_file_bytes)")
  assert not _parse(data)


def _with_elements(data: bytes, elements: bytes) -> bytes:
  """A DICOM file's bytes with raw elements inserted before its pixel data."""
  at = data.index(struct.pack("<HH", 0x7FE0, 0x0010))
  return data[:at] + elements + data[at:]


def test_element_bombs_are_refused_before_they_are_all_parsed(tmp_path):
  limits = dicom_files.ReadLimits(max_element_reads=10_000)
  # 100000 empty private elements (800 KB): each costs pydicom a read and an object.
  empty = b"".join(struct.pack("<HH2sH", 0x0009, 0x1000 + i % 0xF000, b"LO", 0)
                   for i in range(100_000))
  flat = _with_elements(_mr_small(), empty)
  too_many_reads = ("more than 10000 reads of data elements (tags, lengths, values), over the "
                    "limit per file (--max_element_reads)")
  assert _parse(flat, limits) == too_many_reads
  path = dicom_files.FileRef(_write(tmp_path / "flat.dcm", flat))
  assert parse.scan_header(path, limits).reason == too_many_reads
  # 100000 empty items in a sequence (read in one piece, parsed when used).
  items = struct.pack("<HHI", 0xFFFE, 0xE000, 0) * 100_000
  nested = _with_elements(_mr_small(NumberOfFrames=1), struct.pack(
      "<HH2sHI", 0x5200, 0x9230, b"SQ", 0, len(items)) + items)
  assert _parse(nested, limits).startswith("header of ") and _parse(nested, limits).endswith(
      " bytes could hold more than 10000 data elements, over the limit per file "
      "(--max_element_reads)")
  assert _parse(flat) == "" and _parse(nested).startswith("unsupported multi-frame file")


def _zip_claiming(path: str, member: str, data: bytes, claimed: int) -> None:
  """A stored zip whose headers claim `claimed` bytes for a member holding `data`."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(member, data)
  with open(path, "rb") as f:
    raw = bytearray(f.read())
  for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
    at = raw.index(signature) + offset
    raw[at:at + 4] = struct.pack("<I", claimed)
  with open(path, "wb") as f:
    f.write(raw)


def test_files_and_zip_members_are_read_within_the_byte_limit(tmp_path):
  data = _mr_small()
  limits = dicom_files.ReadLimits(max_file_bytes=5000)
  too_big = f"{len(data)} bytes, over the limit of 5000 bytes per file (--max_file_bytes)"
  plain = dicom_files.FileRef(_write(tmp_path / "a.dcm", data))
  archive = str(tmp_path / "b.zip")
  with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("b.dcm", data)
  member = dicom_files.FileRef(archive, "b.dcm")
  assert [p.reason for p in parse.read_files([plain, member], limits=limits)] == [too_big] * 2
  assert parse.scan_header(plain, limits).reason == parse.scan_header(member, limits).reason == (
      too_big)
  assert [p.reason for p in parse.read_files([plain, member])] == ["", ""]
  # A member whose stated size lies: never more than the stated size is read.
  _zip_claiming(str(tmp_path / "c.zip"), "c.dcm", data, claimed=1000)
  (lying,) = parse.read_files([dicom_files.FileRef(str(tmp_path / "c.zip"), "c.dcm")],
                              limits=limits)
  assert lying.reason == "unreadable file (BadZipFile)"  # 1000 bytes read, then a CRC error


# ---------------------------------------------------------------------------------------------
# 5. Only regular files are read.


def test_fifos_sockets_and_devices_are_reported_not_read(tmp_path):
  fifo = str(tmp_path / "x.dcm")
  os.mkfifo(fifo)
  server = socket.socket(socket.AF_UNIX)
  server.bind(str(tmp_path / "s.dcm"))
  try:
    os.symlink("/dev/zero", tmp_path / "zero.dcm")
    _write(tmp_path / "ok.dcm", _mr_small())
    files, problems = _within(BLOCKED_S, lambda: dicom_files.list_input_files(str(tmp_path)))
    assert [os.path.basename(f.path) for f in files] == ["ok.dcm"]
    assert {os.path.basename(r.path): reason for r, reason in problems} == {
        "x.dcm": "not a regular file (FIFO)", "s.dcm": "not a regular file (socket)",
        "zero.dcm": dicom_files.LINK_OUTSIDE}
    # Found between listing and reading (or given as the input): refused, without blocking.
    refs = [dicom_files.FileRef(fifo), dicom_files.FileRef(str(tmp_path / "s.dcm"))]
    reasons = _within(BLOCKED_S, lambda: [p.reason for p in parse.read_files(refs)])
    assert reasons == ["not a regular file (FIFO)", "not a regular file (socket)"]
    assert _within(BLOCKED_S, lambda: parse.scan_header(refs[0]).reason) == reasons[0]
    with pytest.raises(dicom_files.RefusedFile, match=r"^not a regular file \(character"):
      dicom_files.read_file("/dev/zero", dicom_files.ReadLimits())
    assert dicom_files.list_input_files(fifo)[1] == [(refs[0], "not a regular file (FIFO)")]
  finally:
    server.close()


# ---------------------------------------------------------------------------------------------
# 6. Symbolic links: reported, never followed (the input itself may be one).


def test_symbolic_links_are_reported_not_followed(tmp_path):
  root, outside = tmp_path / "in", tmp_path / "outside"
  real = [_write(root / "study" / f"{i}.dcm", _mr_small()) for i in range(2)]
  _write(outside / "other.dcm", _mr_small())
  links = {"folder_inside": root / "study", "file_inside.dcm": root / "study" / "0.dcm",
           "folder_outside": outside, "file_outside.dcm": outside / "other.dcm",
           "cycle": root, "broken.dcm": tmp_path / "gone.dcm"}
  for name, target in links.items():
    os.symlink(target, root / name)
  files, problems = _within(BLOCKED_S, lambda: dicom_files.list_input_files(str(root)))
  assert [f.path for f in files] == real
  assert {os.path.basename(r.path): reason for r, reason in problems} == {
      "folder_inside": dicom_files.LINK_INSIDE, "file_inside.dcm": dicom_files.LINK_INSIDE,
      "folder_outside": dicom_files.LINK_OUTSIDE, "file_outside.dcm": dicom_files.LINK_OUTSIDE,
      "cycle": dicom_files.LINK_INSIDE, "broken.dcm": dicom_files.LINK_BROKEN}
  # The input given as a link is followed; links below it are still reported.
  os.symlink(root, tmp_path / "input_link")
  files, problems = dicom_files.list_input_files(str(tmp_path / "input_link"))
  assert [os.path.basename(f.path) for f in files] == ["0.dcm", "1.dcm"]
  assert len(problems) == len(links)
  discovery = layouts.discover(layouts.GENERIC, str(root))
  assert discovery.num_files == len(real) + len(links)  # each link: one manifest row


# ---------------------------------------------------------------------------------------------
# The programs on one hostile export: no hang, every entry accounted for, nothing identifying.


@pytest.fixture(scope="module")
def hostile_export(tmp_path_factory):
  """(export folder, {entry path: expected manifest reason}, secrets): a good study in a folder
  named after its patient, one of its files renamed to a non-UTF-8 name, a file pydicom logs its
  path for, a header over the limits, a FIFO, links to /dev/zero, outside and inside."""
  tmp = tmp_path_factory.mktemp("hostile")
  export, outside = tmp / "export", tmp / "outside"
  paths = _good_study(str(export / PATIENT_FOLDER))
  paths[0] = os.fsdecode(_rename_not_utf8(paths[0]))
  expected = {
      _write(export / PATIENT_FOLDER / "undefined.dcm", _undefined_length_file()):
          "no pixel data (not an image)",
      _write(export / "big.dcm", _mr_small("MR_small_RLE.dcm", Rows=65535, Columns=65535)):
          "header claims 65535x65535 pixels per frame, over the limit of 4096 pixels "
          "(--max_frame_pixels)",
      str(export / "fifo.dcm"): "not a regular file (FIFO)",
      str(export / "zero.dcm"): dicom_files.LINK_OUTSIDE,
      str(export / "outside.dcm"): dicom_files.LINK_OUTSIDE,
      str(export / "inside"): dicom_files.LINK_INSIDE}
  os.mkfifo(export / "fifo.dcm")
  os.symlink("/dev/zero", export / "zero.dcm")
  os.symlink(_write(outside / "other.dcm", _mr_small()), export / "outside.dcm")
  os.symlink(export / PATIENT_FOLDER, export / "inside")
  secrets = {PATIENT_FOLDER, str(outside)} | set(pseudonym.identifier_strings([
      IDENTITY.patient_name, IDENTITY.patient_id, IDENTITY.birth_date, IDENTITY.study_date,
      IDENTITY.accession, IDENTITY.institution, IDENTITY.referring_physician]))
  for parsed in parse.read_files([dicom_files.FileRef(p) for p in paths]):
    secrets.update({parsed.study_uid, parsed.sop_uid, parsed.series.key})
  return str(export), expected, secrets, len(paths)


def _run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in (pseudonym.SALT_ENV_VAR, "XLA_FLAGS")}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args],
                        capture_output=True, env=env, timeout=TOOL_TIMEOUT_S, check=False)


def _assert_nothing_identifying(outputs: dict[str, bytes], secrets: set[str]) -> None:
  for where, data in outputs.items():
    text = data.lower()
    assert NOT_UTF8 not in data and NOT_UTF8_SHOWN.lower() not in text, where
    for secret in secrets:
      assert secret.lower().encode() not in text, (secret, where)


def test_ingest_program_accounts_for_every_entry_and_prints_nothing_identifying(
    hostile_export, tmp_path):
  export, expected, secrets, num_good = hostile_export
  output, logs = tmp_path / "out", tmp_path / "logs"
  os.makedirs(logs)
  result = _run_tool("ingest.py", "--layout=generic", f"--input={export}", f"--output={output}",
                     f"--salt={SALT}", "--max_frame_pixels=4096", f"--log_dir={logs}",
                     "--alsologtostderr")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = ingest.read_manifest(str(output / ingest.MANIFEST))
  assert len(rows) == num_good + len(expected)
  reasons = {r["file"]: r["reason"] for r in rows}
  for path, reason in expected.items():
    assert reasons[ingest.file_pseudonym(dicom_files.FileRef(path), export, SALT)] == reason
  assert sum(r["status"] == assemble.USED for r in rows) == num_good
  info = records.read_dataset_info(str(output))
  assert sum(split["num_records"] for split in info["splits"].values()) == 1
  outputs = dicom_testlib.all_bytes_below(str(output))
  outputs.update(dicom_testlib.all_bytes_below(str(logs)))
  outputs.update(stdout=result.stdout, stderr=result.stderr)
  _assert_nothing_identifying(outputs, secrets)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A 4-step fine-tuning run on 12 fake studies (as in test_predict)."""
  data_dir = sweep_testlib.build_records(sweep_testlib.fake_items(range(12)),
                                         str(tmp_path_factory.mktemp("data")))
  workdir = str(tmp_path_factory.mktemp("finetune"))
  finetune.train_and_evaluate(finetune_config(data_dir, "random"), workdir)
  return workdir


def test_predict_program_predicts_the_good_study_and_prints_nothing_identifying(
    hostile_export, run_dir, tmp_path):
  export, _, secrets, _ = hostile_export
  empty = os.path.join(os.fsencode(str(tmp_path)), b"empty-\xff")  # named not UTF-8
  os.mkdir(empty)
  result = _run_tool("predict.py", f"--model={run_dir}", f"--output={tmp_path / 'rows.csv'}",
                     "--alsologtostderr", export, os.fsdecode(empty))
  assert result.returncode == 0, result.stderr[-3000:]
  assert b"1 of 4 studies predicted, 3 failed" in result.stdout  # the export: 3 studies
  with open(tmp_path / "rows.csv", "rb") as f:
    csv_bytes = f.read()
  assert b"empty-\\xff" in csv_bytes and b"not a regular file (FIFO)" in csv_bytes
  outputs = {"rows.csv": csv_bytes, "stdout": result.stdout, "stderr": result.stderr}
  _assert_nothing_identifying(outputs, secrets)
