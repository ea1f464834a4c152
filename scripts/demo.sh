#!/usr/bin/env bash
# The demo job (see README). Filled in by the trainer work; until then it runs the model smoke test.
set -euo pipefail
python -c "
import torch
from molm_ds.config import ModelConfig
print('molm-ds demo: tiny preset', ModelConfig.from_preset('tiny').total_params, 'parameters')
"
