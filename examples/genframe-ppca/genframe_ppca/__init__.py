"""genframe-ppca: probabilistic PCA as a genframe model plugin.

Registers the model ``ppca`` (``model=ppca``) and this package's config directory. No
torch import here: the model class is named by a string and imported only when a task
builds it, so ``genframe --help`` stays fast.
"""

from pathlib import Path

from genframe import hookimpl

GENFRAME_PLUGIN_API = 1  # the plugin API this plugin is written for

__version__ = "0.1.0"


@hookimpl
def genframe_register_models(register):
    register(
        "ppca",
        "genframe_ppca.model:PPCA",
        tiny=dict(in_channels=1, image_size=8, latent_dim=2, lr=1e-2),
        description="Probabilistic PCA, a linear-Gaussian latent model (Tipping & Bishop 1999)",
    )


@hookimpl
def genframe_register_configs(register):
    register(Path(__file__).parent / "conf")
