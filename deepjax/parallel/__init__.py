"""Parallelism that knows nothing of the model: the device mesh and logical-axis rules (`sharding`), multi-host
initialization and per-host batch rows (`distributed`). The model imports these, never the other way round."""
