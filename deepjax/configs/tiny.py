"""deepjax info configs/tiny.py

A V3-shaped model small enough for a CPU (every code path: q_lora, grouped noaux_tc routing, YaRN, MTP).
Expected parameter counts:
  main model                    250,000
  MTP module                     80,264
  total                         330,264
  activated per token           176,272
and a forward pass whose logits are [2, 32, 512] for the default random batch.

`deepjax train` (no arguments) trains it on generated arithmetic with the plain prompt template: the R1 template
alone (about 380 byte tokens) is longer than data.seq_len=128; with data.template=r1 set data.seq_len=512.
"""

from deepjax.model import presets
from deepjax.config import Config, DataConfig


def get_config() -> Config:
    return Config(model=presets.tiny(), data=DataConfig(template="plain"))
