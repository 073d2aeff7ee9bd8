"""deepjax info configs/deepseek_v3.py

DeepSeek-V3 / R1, the published 671B shape (docs/deepseek.md, Presets). Expected parameter counts:
  main model            671,026,419,200   (the paper's 671B)
  MTP module             11,610,068,224   (shares embedding and head with the main model)
  total                 682,636,487,424
  activated per token    37,552,297,472   (embedding and head included; the paper's 37B)
Shapes only: the model is far above `info`'s forward limit, so nothing is allocated.
"""

from deepjax.model import presets
from deepjax.config import Config


def get_config() -> Config:
    return Config(model=presets.deepseek_v3())
