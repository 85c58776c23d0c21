"""The input pipeline: study types, preprocessing, ArrayRecord study records, splits, grain
pipelines and the report tokenizer. Knows nothing of DICOM files, the phantom or models."""
