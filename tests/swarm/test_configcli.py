"""Flags generated from a commented config dataclass (swarm.configcli), on made-up configs."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from swarm.cliargs import OneLineParser
from swarm.configcli import add_config_arguments, config_fields, config_from_args, field_comments, markdown_table
from swarm.spans import Span


@dataclass(frozen=True)
class Demo:
    path: str  # where it lives
    span: Span | None = None  # a half-open START:END
    count: int | None = None  # how many, instead of span
    peers: tuple[str, ...] = ()  # peers to join
    rate: float = 2.5  # share of 100% (a literal % must survive argparse's formatting)
    name: str = "x"  # a name; the "# inside quotes" is not a comment
    verbose: bool = False  # say more
    checks: bool = True  # verify what arrives
    threads: int = field(  # a field over
        default=4)  # several lines
    mode: str = "fast"  # how to run: fast or exact,
    # and comment lines right below continue the comment

    # a blank line ends it: this comment belongs to no field
    limit: int = 7  # the last field

    def __post_init__(self):
        if (self.span is None) == (self.count is None):
            raise ValueError("give exactly one of span or count")


def parser_for(cls=Demo) -> OneLineParser:
    parser = OneLineParser(prog="demo")
    add_config_arguments(parser, cls, one_of=[("span", "count")], parsers={Span: Span.parse},
                         choices={"mode": ("fast", "exact")})
    return parser


def parse(*argv: str) -> Demo:
    return config_from_args(Demo, parser_for().parse_args(list(argv)))


def test_comments_are_read_from_the_source():
    comments = field_comments(Demo)
    assert comments["path"] == "where it lives"
    assert comments["name"] == 'a name; the "# inside quotes" is not a comment'
    assert comments["threads"] == "a field over several lines"
    assert comments["mode"] == "how to run: fast or exact, and comment lines right below continue the comment"
    assert comments["limit"] == "the last field"


def test_defaults_come_from_the_dataclass():
    assert parse("--path", "p", "--count", "3") == Demo(path="p", count=3)


def test_every_kind_of_field_converts():
    config = parse("--path", "p", "--span", "2:5", "--peers", "a,b", "c", "--rate", "0.5", "--name", "n",
                   "--verbose", "--no-checks", "--threads", "8", "--mode", "exact", "--limit", "1")
    assert config == Demo(path="p", span=Span(2, 5), peers=("a", "b", "c"), rate=0.5, name="n", verbose=True,
                          checks=False, threads=8, mode="exact", limit=1)


def test_help_is_the_comment_with_the_default():
    text = " ".join(parser_for().format_help().split())
    assert "--rate RATE share of 100% (a literal % must survive argparse's formatting) (default: 2.5)" in text
    assert "--no-checks disable: verify what arrives" in text
    assert "--limit LIMIT the last field (default: 7)" in text
    assert "(default: None)" not in text and "belongs to no field" not in text


@pytest.mark.parametrize("argv, message", [
    (["--count", "3"], "the following arguments are required: --path"),
    (["--path", "p"], "one of the arguments --span --count is required"),
    (["--path", "p", "--span", "0:1", "--count", "1"], "not allowed with argument"),
    (["--path", "p", "--span", "5-2"], "argument --span: blocks must look like START:END"),
    (["--path", "p", "--count", "x"], "argument --count: invalid int value: 'x'"),
    (["--path", "p", "--count", "1", "--mode", "slow"], "invalid choice: 'slow'"),
])
def test_mistakes_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parser_for().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_post_init_refusals_reach_the_caller():
    args = parser_for().parse_args(["--path", "p", "--count", "1"])
    args.span = Span(0, 1)  # what no command line can produce, but a config check must still catch
    with pytest.raises(ValueError, match="exactly one of span or count"):
        config_from_args(Demo, args)


def test_markdown_table_lists_every_field_with_its_default():
    rows = markdown_table(Demo, {Span: Span.parse}).splitlines()
    assert rows[:2] == ["| flag | meaning | default |", "|---|---|---|"]
    assert rows[2] == "| `--path` | where it lives | required |"
    assert "| `--rate` | share of 100% (a literal % must survive argparse's formatting) | 2.5 |" in rows
    assert "| `--no-checks` | verify what arrives | on |" in rows
    assert "| `--verbose` | say more | off |" in rows
    assert len(rows) == 2 + len(config_fields(Demo, {Span: Span.parse}))


@dataclass(frozen=True)
class Nested:
    inner: Demo | None = None  # a config inside a config has no flag form


@dataclass(frozen=True)
class Silent:
    quiet: int = 0


@dataclass(frozen=True)
class Pipes:
    sep: str = "|"  # a | b


def test_what_has_no_flag_form_is_refused_when_the_parser_is_built():
    with pytest.raises(TypeError, match="Nested.inner: no command-line form"):
        add_config_arguments(OneLineParser(), Nested)
    with pytest.raises(TypeError, match="Silent.quiet has no trailing comment"):
        add_config_arguments(OneLineParser(), Silent)
    with pytest.raises(TypeError, match="no field"):
        add_config_arguments(OneLineParser(), Pipes, one_of=[("sep", "missing")])
    with pytest.raises(TypeError, match="Demo.span: no command-line form"):  # Span needs a parser
        add_config_arguments(OneLineParser(), Demo)


def test_a_pipe_in_a_comment_does_not_break_the_table():
    assert markdown_table(Pipes).splitlines()[2] == r"| `--sep` | a \| b | \| |"
