"""Data input: `tokenizer` (SentencePiece), `builder` (tfds), `pipeline` (grain), and
`corpus` (an offline corpus of Python sources for sweeps).

    info = builder.prepare("shakespeare", data_dir)
    it = pipeline.make_iterator(info, "train", batch_size=8, seq_len=128)
"""
