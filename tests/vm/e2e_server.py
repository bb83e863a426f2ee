"""The end-to-end tests' update server, and the relay QEMU runs per connection.

`RepoServer` serves a TUF repository directory on 127.0.0.1 (a free port)
from a thread, with switchable misbehaviour for the attack tests:

* `override[path] = bytes`: serve these bytes instead of the file (a modified
  target, an older `timestamp.json`, ...);
* `extra[path] = bytes`: append bytes to the file (a target longer than its
  signed length);
* `cut_after = N` (with `cut_paths` a substring filter): close the connection
  after N bytes of a matching file (the server going away mid-download): once
  (`cut_once`), or, with `cuts_left = K`, in each of the next K responses (a
  flaky link: every resumed range request is cut again after N bytes);
* `down = True`: close every connection at once without answering;
* `write_delay`: seconds to sleep between 64 KiB chunks (slows a download so
  that a power cut can land in it).

Every request is logged with its time, path, status and bytes sent.

Guest connections reach it through QEMU's user-mode network:
`guestfwd=tcp:10.0.2.100:80-cmd:python3 e2e_server.py --relay PORT` starts
this file once per guest connection with the connection on stdin/stdout
(`guestfwd=...-tcp:127.0.0.1:PORT` would open one host connection when QEMU
starts and share it between every guest connection).
"""

from __future__ import annotations

import http.server
import os
import socket
import sys
import threading
import time
from pathlib import Path

CHUNK = 64 * 1024


class Request:
    def __init__(self, path: str):
        self.path = path
        self.started = time.monotonic()
        self.finished: float | None = None
        self.status = 0
        self.sent = 0
        self.complete = False

    def __repr__(self) -> str:
        return f"<{self.status} {self.path} {self.sent} bytes{'' if self.complete else ' (cut)'}>"


class RepoServer:
    def __init__(self, root: Path, tls=None):
        """Serve `root` on 127.0.0.1 (a free port); over TLS with `tls`, an
        ssl.SSLContext for a server."""
        self.root = Path(root)
        self.override: dict[str, bytes] = {}
        self.extra: dict[str, bytes] = {}
        self.cut_after: int | None = None
        self.cut_paths = "/targets/"
        self.cut_once = True
        self.cuts_left: int | None = None
        self.down = False
        self.write_delay = 0.0
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self.serve(head=True)

            def do_GET(self) -> None:
                self.serve(head=False)

            def serve(self, head: bool) -> None:
                path = self.path.split("?", 1)[0]
                record = Request(path)
                with server._lock:
                    server.requests.append(record)
                if server.down:
                    record.status = -1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                data = server.content(path)
                if data is None:
                    record.status = 404
                    body = b"not found\n"
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not head:
                        self.wfile.write(body)
                    record.finished = time.monotonic()
                    return
                start = 0
                status = 200
                ranged = self.headers.get("Range")
                if ranged and ranged.startswith("bytes=") and "," not in ranged:
                    first, _, last = ranged[6:].partition("-")
                    if first.isdigit() and int(first) < len(data):
                        start = int(first)
                        end = int(last) + 1 if last.isdigit() else len(data)
                        data = data[:end]
                        status = 206
                record.status = status
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    record.finished = time.monotonic()
                    record.complete = True
                    return
                cut = server.cut_after if server.cut_paths in path else None
                offset = start
                try:
                    while offset < len(data):
                        piece = data[offset:offset + CHUNK]
                        if cut is not None and record.sent + len(piece) > cut:
                            piece = piece[:max(0, cut - record.sent)]
                            self.wfile.write(piece)
                            record.sent += len(piece)
                            self.wfile.flush()
                            if server.cuts_left is not None:
                                server.cuts_left -= 1
                                if server.cuts_left <= 0:
                                    server.cut_after = None
                                    server.cuts_left = None
                            elif server.cut_once:
                                server.cut_after = None
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        self.wfile.write(piece)
                        record.sent += len(piece)
                        offset += len(piece)
                        if server.write_delay:
                            time.sleep(server.write_delay)
                    record.complete = True
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True
                finally:
                    record.finished = time.monotonic()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def content(self, path: str) -> bytes | None:
        if path in self.override:
            data = self.override[path]
        else:
            relative = path.lstrip("/")
            target = (self.root / relative).resolve()
            if not str(target).startswith(str(self.root.resolve())) or not target.is_file():
                return None
            data = target.read_bytes()
        return data + self.extra.get(path, b"")

    def reset(self) -> None:
        self.override.clear()
        self.extra.clear()
        self.cut_after = None
        self.cuts_left = None
        self.down = False
        self.write_delay = 0.0

    def target_requests(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path.startswith("/targets/")]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def relay(port: int) -> int:
    """stdin/stdout <-> 127.0.0.1:port (QEMU's guestfwd cmd: runs this per connection)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port))
    except OSError:
        return 1
    stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    out = sys.stdout.fileno()

    def up() -> None:
        try:
            while True:
                data = os.read(stdin.fileno(), 65536)
                if not data:
                    break
                sock.sendall(data)
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=up, daemon=True).start()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            view = memoryview(data)
            while view:
                written = os.write(out, view)
                view = view[written:]
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--relay":
        sys.exit(relay(int(sys.argv[2])))
    print(__doc__)
    sys.exit(2)
