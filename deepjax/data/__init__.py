"""Data: generated verifiable tasks (`tasks`), tokenizers and prompt templates (`tokenizer`), TFDS builders
(`datasets`, tensorflow-datasets) and the Grain input pipeline (`pipeline`). `config`, `tasks` and `tokenizer` need
only the standard library; `datasets` and `pipeline` need the data stack (grain, tfds)."""
