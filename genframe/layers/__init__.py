"""Building blocks shared by genframe's models. Never imports a plugin."""

from genframe.layers.attention import SelfAttention2d, timestep_embedding
from genframe.layers.conv import (
    ConvDecoder,
    ConvEncoder,
    Downsample,
    ResBlock,
    Upsample,
    as_size2d,
    downsampled_sizes,
    group_norm,
    norm_groups,
)

__all__ = [
    "ConvDecoder",
    "ConvEncoder",
    "Downsample",
    "ResBlock",
    "SelfAttention2d",
    "Upsample",
    "as_size2d",
    "downsampled_sizes",
    "group_norm",
    "norm_groups",
    "timestep_embedding",
]
