"""
The command-line boundary that sample.py, train.py, shapes.py and bench.py share.

A mistake a user can fix (a flag value out of range, a missing or wrong file) is answered with one line on
stderr, `error: ...`, naming the input, what was expected and what to do, and exit code 2; Ctrl-C with one
line and exit code 130; never a traceback. Inside the model files asserts and exceptions stay as they are:
only `run_command` translates them, at the top of each command. The argument types refuse values that
would fail (or silently misbehave) far from the flag: non-numbers, inf and nan, values out of range.

`pick_device` turns --device into a torch.device (auto: cuda, then mps, then cpu). `set_threads` picks
how many CPU threads torch uses. A small model gains little from a second thread and loses a lot when
another process holds a core: the threads wait for each other at every op, spinning, and the bundled
model took 14 s instead of 3.6 s next to one busy process on a 2-core machine.

    p = cli.Parser(description=__doc__)
    p.add_argument("--cfg", type=cli.bounded_float(0, 100), default=1.5)
    ...
    if __name__ == "__main__":
        sys.exit(cli.run_command(main))
"""
import argparse
import os
import re
import sys
import warnings

import torch


class UserError(Exception):
    """A mistake the user can fix: printed as one line starting with 'error:', exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: `--flag VALUE: expected ... (see --help)`, not usage + message."""

    def error(self, message):
        flag = re.match(r"argument ([^:]+): (.*)", message)
        # the types below start with the value: "--cfg inf: expected ..."; argparse's own: "--x: invalid ..."
        if flag:
            own = flag[2].startswith(("invalid ", "expected ", "ignored ", "not allowed "))
            message = f"{flag[1]}{': ' if own else ' '}{flag[2]}"
        raise UserError(f"{message} (see --help)")

# -----------------------------------------------------------------------------
# argument types: each takes the flag's text and returns the value or says what was expected

INT64_MAX = 2**63 - 1


def int_range(lo, hi=INT64_MAX, what=None):
    """A type for whole numbers in [lo, hi]; `what` words the range (default 'a whole number in [lo, hi]')."""
    what = what or (f"a whole number >= {lo}" if hi == INT64_MAX else f"a whole number in [{lo}, {hi}]")

    def parse(text):
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected {what}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text}: expected {what}")
        return value
    parse.__name__ = what
    return parse


def bounded_float(lo, hi, lo_open=False):
    """A type for finite numbers in [lo, hi] (in (lo, hi] with lo_open): inf, nan and 1e30 are refused."""
    what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected {what}") from None
        if not (lo < value <= hi if lo_open else lo <= value <= hi):   # nan fails every comparison
            raise argparse.ArgumentTypeError(f"{text}: expected {what}")
        return value
    parse.__name__ = what
    return parse


# the guidance scale: 1-10 is used in practice; far above, the guided logits overflow to inf
MAX_CFG = 100.0
positive_int = int_range(1, what="a positive integer")
non_negative_int = int_range(0, what="a whole number >= 0")
seed = int_range(0, 2**64 - 1, what="a seed in [0, 2**64 - 1]")          # what torch.Generator accepts
threads = int_range(1, 4096, what="a number of threads >= 1")
cfg_scale = bounded_float(0, MAX_CFG)
top_k = non_negative_int                                                   # 0 keeps every token
top_p = bounded_float(0, 1)                                                # 0 or 1: off

# -----------------------------------------------------------------------------
# running a command


def one_line(e):
    """The message of an exception as one line (an OSError without a message gets its file name)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def run_command(main, argv=None, interrupted="interrupted"):
    """Run main(argv) as a command line and return its exit status: 0; 2 after one 'error: ...' line for a
    UserError (or the ValueError / OSError that the model files raise for bad inputs); 130 after Ctrl-C."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        try:
            main(argv)
        except (UserError, ValueError, OSError) as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(interrupted, file=sys.stderr)
            return 130
    return 0

# -----------------------------------------------------------------------------
# devices


def pick_device(name, index=None):
    """The torch.device for --device: 'auto' takes cuda, then mps, then cpu (at run time, never at import);
    `index` picks the GPU (torchrun's LOCAL_RANK). A device this PyTorch cannot use is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to this PyTorch; use --device cpu "
                        "(or install a CUDA build of PyTorch)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    return torch.device(name, index) if name == "cuda" and index is not None else torch.device(name)


# -----------------------------------------------------------------------------
# CPU threads


# Below this many parameters one thread is used unless --threads says otherwise: on a 2-core CPU the bundled
# model (~2M parameters) is barely faster with 2 threads idle and several times slower with 2 threads while
# another process is busy (see the README's table).
SMALL_MODEL = 20_000_000


def free_cores():
    """CPUs this process may run on, less those the other processes keep busy (1-minute load average)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def set_threads(requested=None, num_params=None):
    """Set torch's CPU threads and return the number: `requested` (--threads) wins, then OMP_NUM_THREADS;
    otherwise 1 for a model under SMALL_MODEL parameters and the free cores for a larger one."""
    if requested:
        n = requested
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        n = int(os.environ["OMP_NUM_THREADS"])
    elif num_params is not None and num_params < SMALL_MODEL:
        n = 1
    else:
        n = free_cores()
    torch.set_num_threads(n)
    return n
