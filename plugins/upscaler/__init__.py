"""The built-in cascaded-upscaler plugin, written exactly as a third-party plugin would be.

Registers the model ``upscaler`` (``model=upscaler``) and this plugin's config directory.
No torch import here: the model class is named by a string and imported only when a task
builds it.
"""

from pathlib import Path

from genframe.hookspecs import hookimpl

GENFRAME_PLUGIN_API = 1  # the plugin API this plugin is written for


@hookimpl
def genframe_register_models(register):
    register(
        "upscaler",
        "genframe_plugins.upscaler.model:Upscaler",
        tiny=dict(
            in_channels=3,
            image_size=16,
            low_res_size=8,
            block_out_channels=[8, 16],
            blocks_per_level=1,
            attention_resolutions=[8],
            num_heads=2,
            timesteps=50,
            default_sampler_steps=5,
        ),
        description="Cascaded diffusion upscaler conditioned on a low-resolution image "
        "(Ho et al. 2022, Saharia et al. 2022), with noise augmentation of its input",
    )


@hookimpl
def genframe_register_configs(register):
    register(Path(__file__).parent / "conf")
