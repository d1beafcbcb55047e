"""The built-in transformer language-model plugin, written as a third-party plugin would be.

Registers ``transformer`` (the default size) and the size presets ``transformer_mini``
(nanoGPT's character-level recipe) and ``transformer_small`` (GPT-2 small): one class,
several names, each with its own ``conf/model/<name>.yaml``. No torch import here: the
model class is named by a string and imported only when a task builds it.
"""

from pathlib import Path

from genframe.hookspecs import hookimpl

GENFRAME_PLUGIN_API = 1  # the plugin API this plugin is written for

TARGET = "genframe_plugins.transformer.model:Transformer"

# A preset that trains a step on CPU in milliseconds (the contract test uses it).
TINY = {"vocab_size": 32, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16}

SIZES = {
    "transformer": "Decoder-only transformer language model (GPT-2 style; 4 layers, "
    "width 128), KV-cache generation with top-k/top-p, stop strings and streaming",
    "transformer_mini": "Transformer LM, nanoGPT's character-level size (6 layers, 6 heads, "
    "width 384, context 256, about 10.7M parameters)",
    "transformer_small": "Transformer LM, GPT-2 small size (12 layers, 12 heads, width 768, "
    "context 1024, about 85M parameters without embeddings)",
}


@hookimpl
def genframe_register_models(register):
    for name, description in SIZES.items():
        register(name, TARGET, tiny=dict(TINY), description=description)


@hookimpl
def genframe_register_configs(register):
    register(Path(__file__).parent / "conf")
