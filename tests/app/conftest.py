"""The web app served for real (uvicorn on a free loopback port, in a thread of the test process, so a test can stand
in for the Hub), and a shapes imagefolder to train on."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from difftune.app.server import create_app

TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@contextmanager
def serving(root: Path, token: str | None = None):
    """The app over `root` at http://127.0.0.1:<free port>; its training processes stopped on exit."""
    import uvicorn

    app = create_app(root, token, TRAIN_ENV)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def call(url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict | str | bytes]:
    """(status, JSON, text or bytes) of a GET, or of a POST when `body` is given."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if token:
        request.add_header("X-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        try:
            return status, raw.decode()
        except UnicodeDecodeError:
            return status, raw


@pytest.fixture
def serve():
    """`serving(root, token=None)`: a context giving (base URL, app)."""
    return serving


@pytest.fixture
def http():
    """`call(url, body=None, token=None)`: (status, JSON or text)."""
    return call


@pytest.fixture
def app_data(tmp_path) -> Path:
    """12 captioned shapes (red and blue circles, squares, triangles)."""
    from difftune.toyworld import shapes

    out = tmp_path / "data"
    shapes.write_dataset(out, ("red", "blue"), shapes.SHAPES, per_class=2, seed=0)
    return out
