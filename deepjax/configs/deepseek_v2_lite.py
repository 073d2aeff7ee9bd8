"""deepjax info configs/deepseek_v2_lite.py

DeepSeek-V2-Lite, the published 16B shape (docs/deepseek.md, Presets). Expected parameter counts:
  total                  15,706,484,224   (no MTP)
  activated per token     2,661,150,208   (2,451,435,008 without the input embedding: the paper's 2.4B)
Shapes only: the model is above `info`'s forward limit (2B parameters), so nothing is allocated.
"""

from deepjax.model import presets
from deepjax.config import Config


def get_config() -> Config:
    return Config(model=presets.deepseek_v2_lite())
