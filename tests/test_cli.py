"""The command line: usage errors are one message and exit code 2, never a traceback."""

import pytest

from langneurons.cli import main


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["compare"], ["identify", "/x", "--top-rate", "abc"], []])
def test_usage_errors_are_short(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr()
    assert "Traceback" not in err.err + err.out


def test_help_exits_zero(capsys):
    main(["--help"])
    assert "record" in capsys.readouterr().out
