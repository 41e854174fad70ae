"""Identical random weights for the authors' CLIP fork and open_clip, without storing a checkpoint.

Every parameter is filled from its own name: a generator seeded with ``seed + crc32(name)`` draws the values, so
two implementations whose parameter names and shapes agree (the authors' ``CLIPAD`` is a fork of open_clip) get
bit-identical weights however they create and order their modules.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

#: ln(1/0.07), CLIP's initial log-temperature; keeping it makes the authors' no-``exp`` quirk visible.
LOGIT_SCALE = math.log(1 / 0.07)


@torch.no_grad()
def fill_by_name(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Overwrite every floating-point parameter of ``model`` from its name (see the module docstring)."""
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point():
            continue
        if name == "logit_scale":
            parameter.fill_(LOGIT_SCALE)
            continue
        generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
        is_norm = name.rsplit(".", 2)[-2].startswith("ln") if name.count(".") else False
        if is_norm and name.endswith("weight"):
            values = 1.0 + 0.1 * values
        else:
            values = std * values
        parameter.copy_(values.to(parameter.dtype))
