"""Tests for cli.py: the argument types and their messages, the one-line parser, run_command's exit codes,
and the thread choice (the commands' own catalogues of bad inputs are in test_sample.py, test_shapes.py,
test_bench.py and test_train.py)."""
import argparse
import errno

import pytest
import torch

import cli


def parse(type_, text):
    p = cli.Parser(prog="x")
    p.add_argument("--v", type=type_)
    return p.parse_args([f"--v={text}"]).v                 # "--v -inf" would read -inf as a flag


@pytest.mark.parametrize("type_, good, bad", [
    (cli.positive_int, {"1": 1, " 7 ": 7, "1_000": 1000}, ["0", "-1", "1.0", "1e3", "x", "", str(2**63)]),
    (cli.non_negative_int, {"0": 0, "600": 600}, ["-1", "inf", "nan"]),
    (cli.seed, {"0": 0, str(2**64 - 1): 2**64 - 1}, [str(2**64), "-1", "1180591620717411303424", "0.5"]),
    (cli.threads, {"1": 1, "16": 16}, ["0", "-1", "99999"]),
    (cli.cfg_scale, {"0": 0.0, "1.5": 1.5, "100": 100.0},
     ["-0.1", "100.5", "inf", "-inf", "nan", "1e30", "x"]),
    (cli.top_p, {"0": 0.0, "0.8": 0.8, "1": 1.0}, ["1.01", "nan", "-1e-9"]),
    (cli.bounded_float(0, 10, lo_open=True), {"10": 10.0, "1e-9": 1e-9}, ["0", "10.1", "inf"]),
])
def test_types_take_the_range_and_refuse_the_rest(type_, good, bad):
    for text, value in good.items():
        assert parse(type_, text) == value
    for text in bad:
        with pytest.raises(cli.UserError, match=r"^--v .*: expected .* \(see --help\)$"):
            parse(type_, text)


def test_parser_errors_are_one_line():
    p = cli.Parser(prog="x")
    p.add_argument("--mode", choices=("a", "b"))
    p.add_argument("--n", type=cli.positive_int)
    for argv, message in [(["--mode", "c"], "--mode: invalid choice: 'c'"),
                          (["--n"], "--n: expected one argument"),
                          (["--n", "0"], "--n 0: expected a positive integer"),
                          (["--x"], "unrecognized arguments")]:
        with pytest.raises(cli.UserError) as info:
            p.parse_args(argv)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("exc, code, line", [
    (cli.UserError("--x 3: expected\n  more"), 2, "error: --x 3: expected more"),
    (ValueError("checkpoint a.pt is empty"), 2, "error: checkpoint a.pt is empty"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "a/b.png"), 2,
     "error: a/b.png: No such file or directory"),
    (KeyboardInterrupt(), 130, "stopped"),
])
def test_run_command_turns_mistakes_and_ctrl_c_into_one_line(exc, code, line, capsys):
    def main(argv):
        raise exc
    assert cli.run_command(main, [], interrupted="stopped") == code
    assert capsys.readouterr().err == line + "\n"


def test_run_command_passes_the_rest_through(capsys):
    assert cli.run_command(lambda argv: print("ok", argv), ["a"]) == 0
    assert capsys.readouterr().out == "ok ['a']\n"
    with pytest.raises(ZeroDivisionError):                # a bug is a bug: it keeps its traceback
        cli.run_command(lambda argv: 1 / 0)
    with pytest.raises(SystemExit):                       # --help exits 0 through argparse
        cli.run_command(lambda argv: argparse.ArgumentParser().parse_args(["--help"]))


def test_thread_choice(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(cli, "free_cores", lambda: 3)
        assert cli.set_threads(2, 10) == 2 == torch.get_num_threads()           # --threads wins
        assert cli.set_threads(None, 3_500_000) == 1 == torch.get_num_threads()  # the bundled model's size
        assert cli.set_threads(None, 300_000_000) == 3                           # large: the free cores
        assert cli.set_threads(None, None) == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert cli.set_threads(None, 10) == 2                                    # the user's environment
    finally:
        torch.set_num_threads(before)


def test_free_cores_counts_the_busy_ones(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert cli.free_cores() == 3
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert cli.free_cores() == 1                                                 # never fewer than one
