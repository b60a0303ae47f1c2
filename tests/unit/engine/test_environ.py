"""The one reader of DMTCP's dmtcp_env.txt (engine/environ.py parse_env_file), used by --modify-env
(cli/modifyenv.py) and the ModifyEnv plugin alike."""
from __future__ import annotations

import pytest

from hpcckpt.cli import modifyenv
from hpcckpt.engine import environ


def test_one_parser_for_both_users():
    assert modifyenv.parse is environ.parse_env_file
    assert modifyenv.EnvFileError is environ.EnvFileError


def test_dmtcp_format_comments_quotes_unset_and_references():
    text = ("# a comment\n\nHOME=me # new value of HOME\nHOST=newhost\nEDITOR  # no '=': removed\n"
            'FOO="a b # c"\nDISP=$DISPLAY:${N}\nGONE=$NOT_SET.x\n')
    assert environ.parse_env_file(text, {"DISPLAY": ":0", "N": "1"}) == {
        "HOME": "me", "HOST": "newhost", "EDITOR": None, "FOO": "a b # c", "DISP": ":0:1", "GONE": ".x"}


@pytest.mark.parametrize("line, msg", [("1BAD=x", "not a variable name"), ("A=b c", "spaces in the value"),
                                       ('A="x', "unterminated quote")])
def test_bad_lines_name_file_and_line(line, msg, tmp_path):
    (tmp_path / "dmtcp_env.txt").write_text("OK=1\n" + line + "\n")
    with pytest.raises(environ.EnvFileError, match=f"dmtcp_env.txt line 2: .*{msg}"):
        modifyenv.read(str(tmp_path), {})
