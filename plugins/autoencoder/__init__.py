"""The built-in autoencoder plugin, written exactly as a third-party plugin would be.

Registers the model ``autoencoder`` (``model=autoencoder``): a KL-regularised
autoencoder with a spatial latent, the first stage of latent diffusion
(``model=diffusion model.autoencoder=<its run>``). No torch import here: the model class
is named by a string and imported only when a task builds it.
"""

from pathlib import Path

from genframe.hookspecs import hookimpl

GENFRAME_PLUGIN_API = 1  # the plugin API this plugin is written for


@hookimpl
def genframe_register_models(register):
    register(
        "autoencoder",
        "genframe_plugins.autoencoder.model:AutoencoderKL",
        tiny=dict(
            in_channels=1,
            image_size=8,
            latent_channels=2,
            block_out_channels=[8, 16],
            blocks_per_level=1,
        ),
        description="KL-regularised autoencoder with a spatial latent, the first stage of "
        "latent diffusion (Rombach et al. 2022)",
    )


@hookimpl
def genframe_register_configs(register):
    register(Path(__file__).parent / "conf")
