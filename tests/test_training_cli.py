"""training/cli.py: the shared range checks."""

import argparse

import pytest

from training import cli


def test_check_common_args_skips_what_a_script_does_not_have(capsys):
    parser = argparse.ArgumentParser(prog="train_x.py")
    cli.check_common_args(parser, argparse.Namespace(top_k=3, alpha=None, other=-5))  # nothing to refuse
    with pytest.raises(SystemExit) as e:
        cli.check_common_args(parser, argparse.Namespace(top_k=0))
    assert e.value.code == 2 and "train_x.py: error: --top-k 0 must be >= 1" in capsys.readouterr().err
