"""deepjax info configs/tiny.py

A V3-shaped model small enough for a CPU (every code path: q_lora, grouped noaux_tc routing, YaRN, MTP).
Expected parameter counts:
  main model                    250,000
  MTP module                     80,264
  total                         330,264
  activated per token           176,272
and a forward pass whose logits are [2, 32, 512] for the default random batch.
"""

from deepjax.model import presets
from deepjax.config import Config


def get_config() -> Config:
    return Config(model=presets.tiny())
