"""One model definition for 2D and 3D: the layer and function for a number of spatial dimensions.

The VQGAN and the diffusion model take ``spatial_dims`` (2 or 3) from their config and build every own conv /
pool / resize through these helpers, so one class serves nnU-Net's 2D configurations ((B, C, H, W) slices)
and 3D ones ((B, C, D, H, W) patches). MONAI blocks take ``spatial_dims`` themselves.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

SPATIAL_DIMS = (2, 3)


def check_dims(spatial_dims: int) -> int:
    if int(spatial_dims) not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return int(spatial_dims)


def conv(spatial_dims: int) -> type[nn.Module]:
    """nn.Conv2d or nn.Conv3d."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[check_dims(spatial_dims)]


def conv_fn(spatial_dims: int):
    """F.conv2d or F.conv3d."""
    return {2: F.conv2d, 3: F.conv3d}[check_dims(spatial_dims)]


def max_pool_fn(spatial_dims: int):
    return {2: F.max_pool2d, 3: F.max_pool3d}[check_dims(spatial_dims)]


def avg_pool_fn(spatial_dims: int):
    return {2: F.avg_pool2d, 3: F.avg_pool3d}[check_dims(spatial_dims)]


def linear_mode(spatial_dims: int) -> str:
    """The (multi)linear interpolation mode of F.interpolate for this many spatial axes."""
    return {2: "bilinear", 3: "trilinear"}[check_dims(spatial_dims)]


def spatial_dims_of(x) -> int:
    """Spatial axes of a (B, C, *spatial) tensor, checked to be 2 or 3."""
    return check_dims(x.ndim - 2)
