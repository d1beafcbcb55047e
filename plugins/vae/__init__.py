"""The built-in VAE plugin, written exactly as a third-party plugin would be.

Registers the model ``vae`` (``model=vae``) and this plugin's config directory. No torch
import here: the model class is named by a string and imported only when a task builds it.
"""

from pathlib import Path

from genframe.hookspecs import hookimpl

GENFRAME_PLUGIN_API = 1  # the plugin API this plugin is written for


@hookimpl
def genframe_register_models(register):
    register(
        "vae",
        "genframe_plugins.vae.model:VAE",
        tiny=dict(
            in_channels=1,
            image_size=8,
            num_levels=17,
            latent_dim=4,
            block_out_channels=[8, 16],
            blocks_per_level=1,
        ),
        description="Convolutional variational autoencoder (Kingma & Welling 2014)",
    )


@hookimpl
def genframe_register_configs(register):
    register(Path(__file__).parent / "conf")
