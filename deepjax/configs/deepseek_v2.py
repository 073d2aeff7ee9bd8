"""deepjax info configs/deepseek_v2.py

DeepSeek-V2, the published 236B shape (docs/deepseek.md, Presets). Expected parameter counts:
  total                 235,741,434,880   (no MTP)
  activated per token    21,375,800,320   (embedding and head included; the paper's 21B)
Shapes only: the model is far above `info`'s forward limit, so nothing is allocated.
"""

from deepjax.model import presets
from deepjax.config import Config


def get_config() -> Config:
    return Config(model=presets.deepseek_v2())
