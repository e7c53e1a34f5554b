import subprocess
import sys

import pytest

from dicom_node.cli import COMMANDS, build_parser, main


def test_every_command_is_registered_with_its_arguments():
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0


def test_unknown_command_and_missing_command_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["no-such-command"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main([])
    assert "COMMAND" in capsys.readouterr().err


def test_console_script_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "dicom_node.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("phantom", "train", "predict", "serve", "status", "retry", "echo", "check-config", "demo"):
        assert name in out
    assert "Not a medical device" in out
