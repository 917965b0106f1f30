"""Data: where examples come from and how they become packed batches (no model, no trainer).

    config.py     DataConfig (the `data` config section) and its checks
    sources/      one module per `data.source` behind one `Source` interface, and the registry
    embedded/     the embedded shapes world: renderer, captions, judge, TFDS builder, text corpus
    tokenizer.py  SentencePiece with the reserved ids (BOS, EOS, BOI, EOI, ...)
    encoded.py    examples tokenized and VAE-encoded once, as ArrayRecord records
    sequence.py   one encoded example -> one laid-out sequence; loss counters and messages
    pipeline.py   the Grain pipeline: records -> sequences -> packed, sharded batches

What is made from a source under `data.data_dir` (tokenizer, VAE, records) and the batches of a
config: `tfx_jax.artifacts`; the stages that make it: `tfx_jax.stages`.
"""
