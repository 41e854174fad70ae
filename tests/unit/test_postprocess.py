"""Map post-processing against scipy and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from fsad.lightning_modules.components.postprocess import gaussian_blur, harmonic_fusion, upsample_and_smooth


def test_gaussian_blur_equals_scipy_mirror() -> None:
    maps = torch.rand(2, 40, 33, dtype=torch.float32)
    ours = gaussian_blur(maps, sigma=2.5).numpy()
    for i in range(2):
        ref = gaussian_filter(
            maps[i].numpy().astype(np.float64), sigma=2.5, truncate=4.0
        )  # scipy's default border, mode="reflect"
        np.testing.assert_allclose(ours[i], ref, atol=1e-6)


def test_a_sigma_whose_kernel_is_wider_than_the_map_is_refused_naming_it() -> None:
    # radius round(4·2.5) = 10 > 8: the mirrored border cannot be built (scipy would reflect more than once)
    with pytest.raises(ValueError, match=r"gaussian_sigma=2.5 is too large for maps of size \(8, 8\)"):
        gaussian_blur(torch.rand(1, 8, 8), sigma=2.5)


def test_upsample_keeps_constant_maps_and_raw_values() -> None:
    maps = torch.full((1, 4, 4), 0.3)
    out = upsample_and_smooth(maps, 32, sigma=4.0)
    assert out.shape == (1, 32, 32)
    torch.testing.assert_close(out, torch.full((1, 32, 32), 0.3))
    wide = torch.rand(2, 5, 5) * 6 - 3  # values in [−3, 3] stay as bilinear upsampling leaves them: no clamp
    expected = F.interpolate(wide[:, None], size=16, mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(upsample_and_smooth(wide, 16, 0.0), expected)


def test_harmonic_fusion_by_hand() -> None:
    # 1/(1/0.5 + 1/0.25) = 1/6
    assert abs(harmonic_fusion(torch.tensor(0.5), torch.tensor(0.25)).item() - 1 / 6) < 1e-7
