"""A real ``serve`` process on a loopback port for tests and benchmarks: started, asked and stopped by signal."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """``python -m transfer_lightning serve ...`` in a subprocess on 127.0.0.1, stopped with SIGTERM."""

    def __init__(self, *args: str, temporary: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        if temporary is not None:  # where uploads are spooled: it must stay empty
            env["TMPDIR"] = str(temporary)
        command = [sys.executable, "-m", "transfer_lightning", "serve", *args, "--port", str(self.port)]
        # The log goes to an unnamed file, not a pipe that nobody reads (a full pipe would block the server);
        # the server gets its own process group, so that a failed stop kills its workers too.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()[-3000:]
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError("the server did not become healthy in 90 s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def post(self, body: bytes, content_type: str) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + "/predict", data=body, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def upload(self, files: list[tuple[str, bytes]], field: str = "file") -> tuple[int, dict]:
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
            for name, data in files
        ]
        return self.post(b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}")

    def stop(self, signal_number: int = signal.SIGTERM) -> int:
        """Send ``signal_number`` and return the exit status; a server still running after 30 s is killed
        (with its workers), and the test fails."""
        self.process.send_signal(signal_number)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError(f"the server ignored signal {signal_number} for 30 s") from None
