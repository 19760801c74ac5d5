"""Shared test helpers: where the parity fixtures live, how tests skip without them, and how to run a command
as a user does (and check its one-line errors)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STAR_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
SPEC = SHARED / "spec"
BPE_PATH = SHARED / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def need_shared(path: Path) -> Path:
    """Skip the calling test when the shared fixtures are not beside this checkout."""
    if not path.exists():
        pytest.skip(f"{path} not found: the parity fixtures live in ../shared beside the checkout "
                    "(set STAR_SHARED to point elsewhere)")
    return path


class Payload:
    """A hostile pickle: unpickling it without weights_only=True would create the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread (and much faster when other jobs share the cores);
    the reference fixtures were made with one thread too. Use with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------- commands as a user runs them

def terminal_lines(text):
    """The non-blank lines a terminal shows of `text`: a progress bar redrawn with \\r shows its last
    state."""
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


def run_script(script, *argv, cwd=None, timeout=120):
    """`python SCRIPT ARGV...` in a new interpreter, one CPU thread: (exit code, stdout, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # bytes: text mode would turn a bar's \r into \n
    r = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd or ROOT, env=env,
                       capture_output=True, timeout=timeout)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def run_in_process(main, argv, capsys):
    """A command's main(argv) behind the shared boundary (cli.run_command), in this process:
    (code, out, err)."""
    capsys.readouterr()
    code = cli.run_command(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *fragments):
    """Exit code 2, and stderr is exactly one line 'error: ...' holding every fragment, with no traceback."""
    lines = terminal_lines(err)
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]
