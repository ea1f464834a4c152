"""The lost-peer line and the stall watchdog, in one process: peers that do not answer are named with
their host, the step and the last checkpoint; errors that are not a collective's pass through; a rank
without progress dumps its Python stacks and exits."""

import socket
import subprocess
import sys
import textwrap

import pytest

from molm_ds.errors import ConfigError
from molm_ds.parallel import peers as P
from molm_ds.parallel.peers import Peer, PeerWatch, is_collective_failure


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nobody listens once the socket is closed


@pytest.fixture
def watch(monkeypatch):
    monkeypatch.setattr(P, "LINGER_S", 0.0)
    w = PeerWatch(20)
    w._listen()
    me = w._sock.getsockname()[1]
    w.peers = [Peer(0, "node1", "127.0.0.1", me), Peer(1, "node1", "127.0.0.1", me),
               Peer(2, "node2", "127.0.0.1", closed_port()), Peer(3, "node2", "127.0.0.1", closed_port())]
    yield w
    w.close()


def test_names_the_ranks_that_do_not_answer_with_host_step_and_checkpoint(watch):
    watch.step = 13
    err = watch.explain(RuntimeError("[gloo/transport/tcp/pair.cc:538] Connection closed by peer [10.0.0.2]:4242"),
                        last_checkpoint="runs/x/checkpoints/step_00000010")
    msg = str(err)
    assert msg.startswith(f"rank 0 on {socket.gethostname()}: lost peer: rank 2, 3 on host node2 (127.0.0.1) stopped answering at step 13")
    assert "collective timeout 20 s" in msg
    assert "last complete checkpoint: runs/x/checkpoints/step_00000010; continue with --resume auto" in msg
    assert "\n" not in msg and err.every_rank and err.hard_exit and err.exit_code == P.EXIT_PEER_LOST


def test_without_a_checkpoint_it_says_to_start_again(watch):
    msg = str(watch.explain(TimeoutError("timed out"), last_checkpoint=None))
    assert "no complete checkpoint yet" in msg


def test_every_peer_answering_means_a_stuck_rank(watch):
    watch.peers = watch.peers[:2]
    msg = str(watch.explain(RuntimeError("Timed out waiting 20000ms for recv operation to complete"), last_checkpoint=None))
    assert "every rank still answers" in msg and "Timed out waiting" in msg


@pytest.mark.parametrize("exc, yes", [
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms"), True),
    (RuntimeError("Connection reset by peer"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("bad value"), False),
    (ConfigError("timeout must be positive"), False),  # a user error is never a lost peer
])
def test_which_errors_are_a_collectives_failure(exc, yes):
    assert is_collective_failure(exc) is yes


def test_an_unrelated_error_passes_through(watch):
    assert watch.explain(KeyError("x"), last_checkpoint=None) is None


def test_a_rank_without_progress_dumps_its_stacks_and_exits():
    code = textwrap.dedent("""
        import time
        from molm_ds.parallel.peers import PeerWatch
        w = PeerWatch(5, stall_s=1)
        w.beat(7)
        def stuck_in_a_step():
            time.sleep(30)
        stuck_in_a_step()
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "Timeout" in p.stderr and "stuck_in_a_step" in p.stderr  # faulthandler's dump, with the frame


def test_the_stall_budget_exceeds_the_collective_timeout():
    assert P.stall_seconds(20) > 20 and PeerWatch(600).stall_s == P.stall_seconds(600)


def test_the_second_knock_adds_only_ranks_on_a_host_already_lost(watch, monkeypatch):
    node1_b, node2_a, node2_b = watch.peers[1], watch.peers[2], watch.peers[3]
    knocks = iter([[node2_a], [node1_b, node2_a, node2_b]])  # rank 1 (a survivor) exited between the knocks
    monkeypatch.setattr(PeerWatch, "unreachable", lambda self: next(knocks))
    msg = str(watch.explain(RuntimeError("Connection reset by peer"), last_checkpoint=None))
    assert "lost peer: rank 2, 3 on host node2" in msg and "node1 (" not in msg.split("lost peer:")[1], msg
