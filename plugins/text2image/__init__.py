"""The built-in text-to-image plugin, written exactly as a third-party plugin would be.

Registers the model ``text2image`` (``model=text2image``) and this plugin's config
directory. It composes the diffusion plugin's public `Diffusion` and `UNet` with a text
encoder (its own, or a trained ``transformer`` run) through cross-attention. No torch
import here: the model class is named by a string and imported only when a task builds it.
"""

from pathlib import Path

from genframe.hookspecs import hookimpl

GENFRAME_PLUGIN_API = 1  # the plugin API this plugin is written for


@hookimpl
def genframe_register_models(register):
    register(
        "text2image",
        "genframe_plugins.text2image.model:Text2Image",
        tiny=dict(
            in_channels=3,
            image_size=8,
            block_out_channels=[8, 16],
            blocks_per_level=1,
            attention_resolutions=[4],
            num_heads=2,
            timesteps=50,
            default_sampler_steps=5,
            vocab_size=64,
            max_length=48,
            text_width=16,
            text_depth=1,
            text_heads=2,
        ),
        description="Text-to-image diffusion: a text encoder conditions a U-Net through "
        "cross-attention (Rombach et al. 2022), classifier-free guidance, image-to-image",
    )


@hookimpl
def genframe_register_configs(register):
    register(Path(__file__).parent / "conf")
