"""Data: the embedded "shapes" dataset, its text corpus, judge and TFDS builder, and pipelines."""
