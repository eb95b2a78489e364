"""A fork server for the isolated runs: start a framework once per process, fork a fresh child per run.

Starting a child interpreter and importing torch costs one to two seconds a run; a process that
measures many files (a folder with --data and -j, the Python API, the test suite) would pay it for
every file. The fork server is a clean `python -I` process with the scrubbed environment, started
on the first run: it imports the engine a run needs (torch, onnxruntime) once, and for each run
forks a child that then does exactly what a freshly started child does (bnlint.sandbox.child:
its own process group, environment, limits, Landlock and seccomp, applied after the fork, before
the model is read). A child can change nothing in the server: after fork they share no memory.

Protocol over a Unix socket pair, one run at a time: the parent sends the job (length-prefixed
JSON) with the write end of the child's event pipe (SCM_RIGHTS); the server answers the child's
pid, then its wait status. The server dies with the parent (PR_SET_PDEATHSIG), and each child
with the server. BNLINT_FORKSERVER=0 (or a platform without fork) starts each child afresh.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import struct
import subprocess
import sys
from typing import Any

MAX_MESSAGE = 16 << 20
BOOT = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); from bnlint.sandbox.forkserver import serve; "
        "serve(int(sys.argv[2]))")


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode("utf-8")
    header = struct.pack("<I", len(data))
    if fds:
        socket.send_fds(sock, [header + data], fds)
    else:
        sock.sendall(header + data)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the fds sent with it; (None, []) when the other side closed."""
    first, fds, _, _ = socket.recv_fds(sock, 4, 4)
    if not first:
        return None, []
    while len(first) < 4:
        more = sock.recv(4 - len(first))
        if not more:
            return None, fds
        first += more
    (size,) = struct.unpack("<I", first)
    if size > MAX_MESSAGE:
        raise ValueError("message too large")
    data = b""
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), list(fds)


def serve(fd: int) -> None:
    """The server's loop (in its own interpreter): preload, fork, report pid and wait status."""
    from bnlint.sandbox import child

    child._die_with_parent()
    sock = socket.socket(fileno=fd)
    importlib.import_module("bnlint.dynamic.analysis")  # numpy and bnlint's own measuring code
    while True:
        message, fds = receive(sock)
        if message is None:
            os._exit(0)
        for module in message.get("preload", []):  # a "warm" message only imports, while the parent reads the model
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001 - the child imports it again and reports what is missing
                pass
        if message.get("warm"):
            continue
        pid = os.fork()
        if pid == 0:
            try:
                sock.close()
                child._die_with_parent()
                child.forked(message["job"], message["env"], fds[0])
            finally:
                os._exit(4)
        for each in fds:
            os.close(each)
        send(sock, {"pid": pid})
        _, status = os.waitpid(pid, 0)
        send(sock, {"status": status})


class ForkServer:
    """The parent's handle on one server process."""

    def __init__(self, sys_path: list[str], env: dict[str, str]) -> None:
        parent, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = parent
        self.process = subprocess.Popen([sys.executable, "-I", "-c", BOOT, json.dumps(sys_path), str(server.fileno())],
                                        pass_fds=[server.fileno()], env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        server.close()

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        self.sock.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


_servers: dict[tuple[str, ...], ForkServer] = {}


def enabled() -> bool:
    return hasattr(os, "fork") and hasattr(socket, "send_fds") and sys.platform.startswith("linux") \
        and os.environ.get("BNLINT_FORKSERVER", "1") != "0"


def server_for(sys_path: list[str], env: dict[str, str]) -> ForkServer:
    key = tuple(sys_path)
    server = _servers.get(key)
    if server is None or not server.alive():
        server = _servers[key] = ForkServer(sys_path, env)
    return server


def forget(sys_path: list[str]) -> None:
    """Drop a server whose protocol failed: the next run starts a fresh one."""
    server = _servers.pop(tuple(sys_path), None)
    if server is not None:
        server.process.kill()
        server.sock.close()


def warm(sys_path: list[str], env: dict[str, str], preload: list[str]) -> None:
    """Start the server now and let it import `preload` while the parent does its static work."""
    if not enabled():
        return
    try:
        send(server_for(sys_path, env).sock, {"warm": True, "preload": preload})
    except OSError:
        forget(sys_path)
