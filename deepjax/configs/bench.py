"""deepjax info configs/bench.py

The benchmark shape of bench/anchors/hf_deepseek_v3.py (the shape HF transformers is timed on). Expected:
  total                   1,251,050,688   (no MTP; the anchors' 1.25B)
  activated per token       247,563,456   (214,795,456 without the input embedding: the anchors' 215M
                                           matmul-active)
Runs one forward pass: about 5 GB of float32 parameters and a minute of init on a 2-core CPU.
"""

from deepjax.model import presets
from deepjax.config import Config


def get_config() -> Config:
    return Config(model=presets.bench())
