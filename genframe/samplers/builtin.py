"""genframe's own samplers, registered through the same hook plugins use."""

from genframe.hookspecs import hookimpl


@hookimpl
def genframe_register_samplers(register):
    register("ddpm", "genframe.samplers.ddpm:DDPMSampler",
             description="ancestral DDPM sampling over every training step (Ho et al. 2020)")
    register("ddim", "genframe.samplers.ddim:DDIMSampler",
             description="DDIM with any number of steps and eta in [0, 1] (Song et al. 2021)")
