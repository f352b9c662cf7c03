"""Data input: `tokenizer` (SentencePiece), `builder` (tfds), `pipeline` (grain).

    info = builder.prepare("shakespeare", data_dir)
    it = pipeline.make_iterator(info, "train", batch_size=8, seq_len=128)
"""
