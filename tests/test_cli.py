"""The user-error convention: one `error:` line on stderr, exit code 2, no traceback (MOLM_DS_DEBUG=1 re-raises)."""

import pytest

from molm_ds import cli
from molm_ds.errors import ConfigError, one_line


def _main_raising(exc):
    def main(argv=None):
        raise exc
    return main


def test_user_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(_main_raising(ConfigError("bad thing\n  detail one\n  detail two")), [])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: bad thing; detail one; detail two\n"


def test_the_error_line_is_one_write(monkeypatch):
    """Ranks of one host write to the launcher's one stream: a line written in pieces (print writes the
    newline apart) can be split by another rank's line, so the line and its newline go in one write."""
    writes = []

    class Stream:
        def write(self, s):
            writes.append(s)

        def flush(self):
            pass

    monkeypatch.setattr("sys.stderr", Stream())
    with pytest.raises(SystemExit):
        cli.fail("rank 1 on node1: lost peer", every_rank=True)
    assert writes == ["error: rank 1 on node1: lost peer\n"]


def test_debug_reraises(monkeypatch):
    monkeypatch.setenv("MOLM_DS_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli.run(_main_raising(ConfigError("x")), [])


def test_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        cli.run(_main_raising(ZeroDivisionError("bug")), [])


def test_return_code_passes_through():
    with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: 3, [])
    assert e.value.code == 3


def test_argparse_errors_are_one_line(capsys):
    p = cli.ArgumentParser(prog="tool")
    p.add_argument("--need", required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the following arguments are required: --need")


def test_one_line_of_empty_message():
    assert one_line(ValueError()) == "ValueError"


@pytest.mark.parametrize("argv, hint", [
    (["--max_new_tokens", "4"], "--max_new_tokens: did you mean --max-new-tokens?"),
    (["--chekpoint", "x"], "--chekpoint: did you mean --checkpoint?"),
    (["--steps", "20"], "--steps: did you mean --set training.steps=VALUE?"),
    (["--ep_size", "1"], "--ep_size: did you mean --set parallel.ep_size=VALUE?"),
])
def test_unknown_flags_name_the_nearest_one(capsys, argv, hint):
    p = cli.ArgumentParser(prog="prog", set_keys=lambda: ["training.steps", "parallel.ep_size"])
    p.add_argument("--checkpoint")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--set", action="append")
    with pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: unrecognized arguments: {' '.join(argv)}; {hint} (see prog --help)"), err


def test_an_unknown_flag_with_nothing_near_gets_no_guess(capsys):
    p = cli.ArgumentParser(prog="prog")
    p.add_argument("--checkpoint")
    with pytest.raises(SystemExit):
        p.parse_args(["--zzz"])
    assert capsys.readouterr().err == "error: unrecognized arguments: --zzz (see prog --help)\n"


def test_a_script_that_ends_normally_ends_its_process_group(tmp_path):
    """Teardown with a live gloo group can abort the process (SIGABRT) after a successful job: cli.run ends
    the group first when it runs a command line. In a fresh process: a one-rank group, a main that returns 75
    (a coordinated stop); an atexit handler reports the group's state."""
    import subprocess
    import sys

    code = ("import atexit, os, torch.distributed as dist\n"
            "from molm_ds import cli\n"
            "from molm_ds.testing import free_port\n"
            "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))\n"
            "dist.init_process_group('gloo', rank=0, world_size=1)\n"
            "atexit.register(lambda: print('group left', dist.is_initialized()))\n"
            "cli.run(lambda argv: 75)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 75 and "group left False" in p.stdout, p.stdout + p.stderr[-3000:]


_EXITING = """
import atexit, sys, threading, time
from molm_ds import cli

class Heap:
    def __del__(self):
        print("torn down")

HEAP = Heap()
atexit.register(lambda: print("atexit ran"))

def main(argv):
    print("buffered line")  # stdout is a pipe: block-buffered, never flushed by main
    if "thread" in sys.argv:
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
    if "fail" in sys.argv:
        cli.fail("bad input")
    if "interrupt" in sys.argv:
        raise KeyboardInterrupt
    if "message" in sys.argv:
        sys.exit("stopped: a message")
    if "c_stdio" in sys.argv:  # printf into the C library's buffer (a pipe: block-buffered)
        import ctypes
        ctypes.CDLL(None).printf(b"from C\\n")
    return 3

cli.run(main)
"""


@pytest.mark.parametrize("case", ["plain", "fail", "thread", "debug", "interrupt", "message", "c_stdio"])
def test_a_command_exits_without_the_interpreter_teardown_yet_loses_nothing(case):
    """A command line ends through os._exit: module globals are not torn down (the collector's walk over
    torch's heap cost a rank 1.3 s), yet the exit code, buffered output (Python's and the C library's) and
    atexit handlers all come through. A running non-daemon thread, MOLM_DS_DEBUG=1 or sys.exit("message")
    keeps the ordinary teardown."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MOLM_DS_DEBUG="1" if case == "debug" else "0")
    env.pop("PYTHONUNBUFFERED", None)  # which would make the C library's stdout unbuffered too
    p = subprocess.run([sys.executable, "-c", _EXITING, case], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == {"fail": 2, "interrupt": 130, "message": 1}.get(case, 3), p.stderr
    assert "buffered line" in p.stdout and "atexit ran" in p.stdout, p.stdout
    assert p.stderr == {"fail": "error: bad input\n", "interrupt": "interrupted\n",
                        "message": "stopped: a message\n"}.get(case, ""), p.stderr
    assert ("thread finished" in p.stdout) == (case == "thread"), p.stdout
    assert ("from C" in p.stdout) == (case == "c_stdio"), p.stdout
    assert ("torn down" in p.stdout) == (case in ("thread", "debug", "message")), p.stdout
