"""genframe's plugin contract, run on the installed `ppca` plugin."""

from genframe.testing import check_model_contract


def test_contract(tmp_path):
    check_model_contract("ppca", tmp_path=tmp_path)
