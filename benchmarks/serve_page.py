"""The serve page in a real browser: headless Chromium opens ``/``, picks an image file in the page's
file input (through the DevTools protocol, as a user's click would), waits for the answer's bars and
saves a screenshot.

    python benchmarks/serve_page.py --url http://127.0.0.1:8000 --image photo.jpg --output page.png

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``websockets`` package (LitServe's
uvicorn brings it). Prints what the page shows once the answer is in: the file name and the bars.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import websockets


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DevTools:
    """One page's DevTools session: send a command, wait for its answer."""

    def __init__(self, connection) -> None:
        self.connection, self.next_id = connection, 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        await self.connection.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.connection.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")


async def check_page(debug_port: int, url: str, image: Path, output: Path, timeout: float) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list") as response:
        target = next(t for t in json.loads(response.read()) if t["type"] == "page")
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=2**26) as connection:
        tools = DevTools(connection)
        await tools.call("Page.enable")
        await tools.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not await tools.evaluate("document.getElementById('about')?.textContent.includes('classes')"):
            if time.monotonic() > deadline:
                raise RuntimeError("the page did not show the model's description (GET /info)")
            await asyncio.sleep(0.2)
        document = await tools.call("DOM.getDocument")
        node = await tools.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#pick")
        await tools.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(image.resolve())])
        while not await tools.evaluate("document.querySelectorAll('.bar, .error').length > 0"):
            if time.monotonic() > deadline:
                raise RuntimeError("no answer appeared on the page after picking the image")
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # the thumbnail
        shown = await tools.evaluate("document.getElementById('results').innerText")
        shot = await tools.call("Page.captureScreenshot", format="png")
        output.write_bytes(base64.b64decode(shot["data"]))
        return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="where serve listens, e.g. http://127.0.0.1:8000")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=Path("serve_page.png"))
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("No chromium on PATH: apt-get install -y chromium")
    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        process = subprocess.Popen(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
             f"--user-data-dir={profile}", "--window-size=900,700", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(100):  # the DevTools endpoint comes up within a few seconds
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            shown = asyncio.run(check_page(port, args.url, args.image, args.output, args.timeout))
        finally:
            process.terminate()
            process.wait(timeout=10)
    print(f"Screenshot: {args.output}\nThe page shows:\n{shown}")


if __name__ == "__main__":
    main()
