"""DICOM ingestion: reading files and archives, parsing cines, naming views, plane geometry,
assembling studies, the Kaggle / UK Biobank / generic layouts, pseudonyms, and the ingest job
(local or Apache Beam) that writes study records. Patient identifiers stop here."""
