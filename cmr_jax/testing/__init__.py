"""Test support shipped with the package: writers of DICOM files from phantom studies, used by
the tests and by anyone checking an ingest path without patient data."""
