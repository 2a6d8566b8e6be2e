"""The root CLI's shared argument types (``ditepose.cli``)."""

from __future__ import annotations

import argparse

import pytest

from ditepose.cli import build_parser, parse_size


def test_parse_size_reads_hxw_and_returns_wh() -> None:
    assert parse_size("256x192") == (192, 256)
    assert parse_size("384X288") == (288, 384)


@pytest.mark.parametrize("text", ["256", "256x", "x192", "256x192x3", "a x b", ""])
def test_parse_size_rejects_anything_but_two_integers(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="HxW"):
        parse_size(text)


@pytest.mark.parametrize("argv", [["model-info", "dite_hrnet_18"],
                                  ["export", "onnx", "dite_hrnet_18", "--out", "m.onnx"],
                                  ["train", "dite_hrnet_18", "--data", "d", "--work-dir", "w"]])
def test_every_input_flag_uses_the_one_parser(argv: list[str]) -> None:
    args = build_parser().parse_args([*argv, "--input", "128x96"])
    assert args.input == (96, 128)
