"""Building blocks shared by genframe's models. Never imports a plugin."""

from genframe.layers.attention import (
    CrossAttention,
    FeedForward,
    SelfAttention2d,
    SpatialTransformer,
    TransformerBlock,
    multihead_attention,
    sincos_positions_2d,
    timestep_embedding,
)
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
    "CrossAttention",
    "Downsample",
    "FeedForward",
    "ResBlock",
    "SelfAttention2d",
    "SpatialTransformer",
    "TransformerBlock",
    "Upsample",
    "as_size2d",
    "downsampled_sizes",
    "group_norm",
    "multihead_attention",
    "norm_groups",
    "sincos_positions_2d",
    "timestep_embedding",
]
