"""The built-in GAN plugin, written exactly as a third-party plugin would be.

Registers the model ``gan`` (``model=gan``) and this plugin's config directory. No torch
import here: the model class is named by a string and imported only when a task builds it.
"""

from pathlib import Path

from genframe.hookspecs import hookimpl

GENFRAME_PLUGIN_API = 1  # the plugin API this plugin is written for


@hookimpl
def genframe_register_models(register):
    register(
        "gan",
        "genframe_plugins.gan.model:GAN",
        tiny=dict(
            in_channels=1,
            image_size=8,
            num_classes=10,
            latent_dim=8,
            g_channels=[8, 16],
            d_channels=[8, 16],
            # No sample grids: a test's Trainer without a run directory would write them
            # into the current directory.
            sample_every_n_epochs=0,
        ),
        description="Generative adversarial network, DCGAN-style (Radford et al. 2016), "
        "BCE or hinge loss, spectral norm, projection-discriminator conditioning, "
        "minibatch std, R1, DiffAugment, EMA",
    )


@hookimpl
def genframe_register_configs(register):
    register(Path(__file__).parent / "conf")
