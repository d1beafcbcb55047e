"""The built-in diffusion plugin, written exactly as a third-party plugin would be.

Registers the model ``diffusion`` (``model=diffusion``) and this plugin's config directory.
No torch import here: the model class is named by a string and imported only when a task
builds it.
"""

from pathlib import Path

from genframe.hookspecs import hookimpl

GENFRAME_PLUGIN_API = 1  # the plugin API this plugin is written for


@hookimpl
def genframe_register_models(register):
    register(
        "diffusion",
        "genframe_plugins.diffusion.model:Diffusion",
        tiny=dict(
            in_channels=1,
            image_size=8,
            num_classes=10,
            block_out_channels=[8, 16],
            blocks_per_level=1,
            attention_resolutions=[4],
            num_heads=2,
            timesteps=50,
            default_sampler_steps=5,
        ),
        description="Denoising diffusion model with a U-Net (Ho et al. 2020), DDIM/DDPM "
        "sampling and classifier-free guidance",
    )


@hookimpl
def genframe_register_configs(register):
    register(Path(__file__).parent / "conf")
