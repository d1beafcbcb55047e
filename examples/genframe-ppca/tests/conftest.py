"""Make `model=ppca` resolvable whether or not the package is pip-installed.

Installed (the normal case), genframe finds the plugin through its entry point and this
fixture does nothing. From a bare source checkout, it registers the plugin module
in-process with `genframe.plugins.add_plugin`, so the tests still run.
"""

import pytest


@pytest.fixture(autouse=True, scope="session")
def ppca_registered():
    from genframe import plugins

    if "ppca" in plugins.get_registry().models:
        yield
        return
    import genframe_ppca

    plugins.add_plugin("ppca", genframe_ppca)
    try:
        yield
    finally:
        plugins.remove_plugin("ppca")
