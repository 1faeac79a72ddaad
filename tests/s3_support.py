"""A slow S3 endpoint for the real-process tests: moto's S3 server behind a TCP proxy that
trickles responses (time to kill the agent or stop the server mid-object), and that can be
stopped and started again on the same port like the server itself."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import free_port


class TrickleProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``, sending ``rate`` bytes/s back to the client."""

    def __init__(self, upstream: int, rate: int = 4096, chunk: int = 512) -> None:
        self.upstream = upstream
        self.rate = rate
        self.chunk = chunk
        self.port = free_port()
        self.requests: list[str] = []  # the head of every request (method, path, headers)
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TrickleProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listener and every connection: the server is gone mid-file."""
        with self._lock:
            conns, self._conns = self._conns, []
            listener, self._listener = self._listener, None
        for s in [*conns, *([listener] if listener else [])]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def ranges(self) -> list[str]:
        """The Range headers the client sent, in order."""
        return [
            line.split(":", 1)[1].strip()
            for head in self.requests
            for line in head.splitlines()
            if line.lower().startswith("range:")
        ]

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            except OSError:
                client.close()  # the server behind is down: like a refused connection
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._up, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                self.requests.append(data.decode("latin-1").split("\r\n\r\n", 1)[0])
                upstream.sendall(data)

    def _down(self, upstream: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(self.chunk):
                client.sendall(data)
                time.sleep(len(data) / self.rate)
        for s in (client, upstream):
            s.close()


class SlowS3:
    """moto's S3 server (bucket ``edge``) and a :class:`TrickleProxy` in front of it."""

    def __init__(self, server_cls, port: int, rate: int) -> None:  # type: ignore[no-untyped-def]
        self.server_cls = server_cls
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"  # moto itself, for publishing and tampering
        self.server = server_cls(ip_address="127.0.0.1", port=port)
        self.proxy = TrickleProxy(port, rate=rate)

    def start(self) -> SlowS3:
        self.server.start()
        self.proxy.start()
        return self

    def stop(self) -> None:
        """The S3 server stops: in-flight responses end, new connections are refused."""
        self.proxy.stop()
        self.server.stop()

    def restart(self) -> None:
        """Back on the same ports, with the same objects (moto keeps them in this process)."""
        self.server = self.server_cls(ip_address="127.0.0.1", port=self.port)
        self.start()


def slow_s3(monkeypatch, rate: int = 4096) -> Iterator[SlowS3]:  # type: ignore[no-untyped-def]
    moto_server = pytest.importorskip("moto.server", reason="pip install 'moto[server]' (the dev extra)")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    s3 = SlowS3(moto_server.ThreadedMotoServer, free_port(), rate).start()
    import boto3

    boto3.client("s3", endpoint_url=s3.endpoint).create_bucket(Bucket="edge")
    try:
        yield s3
    finally:
        s3.proxy.stop()
        with contextlib.suppress(Exception):
            s3.server.stop()
