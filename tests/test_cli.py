"""The command line explains itself: every option has help text with its unit or choices and
its default, and --model lists every model."""
import argparse

import pytest

from attnkern.cli import build_parser, main
from attnkern.slides.models import MODELS


def _subparsers():
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", ["profile", "compare"])
def test_every_option_has_help_with_default(command):
    parser = _subparsers()[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        assert len(text) > 15, action.dest
        assert "default" in text, (action.dest, text)


def test_help_lists_every_model(capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in MODELS:
        assert name in out, name
    for unit in ("pixels", "microns per pixel", "magnification"):
        assert unit in out


def test_top_level_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "profile" in out and "compare" in out


def test_missing_extra_message_only_for_extras():
    from attnkern.cli import missing_extra_message

    msg = missing_extra_message("profile", ModuleNotFoundError("No module named 'openslide'", name="openslide"))
    assert msg == ("attnkern profile: error: it needs openslide-python / openslide-bin, which is not installed; "
                   "pip install 'attnkern[slides]'")
    grad = missing_extra_message("profile", ModuleNotFoundError("x", name="pytorch_grad_cam"))
    assert "attnkern[explain]" in grad
    assert missing_extra_message("profile", ModuleNotFoundError("x", name="attnkern._C")) is None
