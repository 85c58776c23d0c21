"""Data: synthetic phantom, DICOM reading, preprocessing, records, grain pipelines, tokenizer."""
