"""The edge as a device installs it: a fresh venv without torch, `pip install .` from this checkout, the daemon run
from an exported edge directory against a cloud started from the full install, and the official `openai`
client (this venv's, over HTTP) getting a chat completion and a stream.

Also, without the venv: with torch, transformers and the cloud made unimportable in a child process, every
edge module imports and `offramp generate --edge DIR` runs, so a torch import sneaking onto the edge's path
fails here first, in seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.edge.conftest import REQUEST_TIMEOUT, DaemonProcess, http
from tests.edge.test_daemon_process import CloudProcess, closed_port

ROOT = Path(__file__).resolve().parents[2]
EDGE_MODULES = ("offramp.edge", "offramp.edge.cli", "offramp.edge.daemon", "offramp.edge.local", "offramp.edge.service",
                "offramp.edge.ws_link", "offramp.edge.client", "offramp.edge.tokenizer", "offramp.edge.multi_exit", "offramp.shared.cli")

# Run in a child: make torch, transformers and the cloud/model packages unimportable, then do what the edge does.
BLOCKED = '''
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript") or name.startswith(("offramp.cloud", "offramp.models")):
            raise ImportError(f"blocked on the edge: {name}")
sys.meta_path.insert(0, Block())
'''


def du_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def test_edge_modules_generate_and_the_sdk_need_no_torch(default_edge_dir) -> None:
    script = BLOCKED + f"""
import importlib
for name in {EDGE_MODULES!r}:
    importlib.import_module(name)
from offramp.edge import LocalEngine
with LocalEngine(edge={str(default_edge_dir)!r}, cloud="none", precision="fp32") as engine:
    assert len(engine.generate("Hi", chat=True, max_tokens=3).token_ids) == 3
from offramp.shared.cli import main
sys.exit(main(["generate", "--edge", {str(default_edge_dir)!r}, "--cloud", "none", "--prompt", "Hi", "--chat",
               "--max-new-tokens", "4", "--json"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"mode": "edge-standalone"' in done.stdout
    blocked_local = BLOCKED + f"""
from offramp.shared.cli import main
sys.exit(main(["generate", "--edge", {str(default_edge_dir)!r}, "--cloud", "local", "--prompt", "Hi", "--max-new-tokens", "2"]))
"""
    refused = subprocess.run([sys.executable, "-c", blocked_local], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "cloud extra" in refused.stderr, refused.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_torch_free_venv_serves_the_openai_client_against_a_real_cloud(tmp_path, default_edge_dir, capsys) -> None:
    openai = pytest.importorskip("openai")
    env_dir = tmp_path / "edge-venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    src = tmp_path / "src"  # a copy without the checkout's .venv and caches, as a device would get it
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "bench-results", ".pytest_cache"))
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True, timeout=1200)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-3000:]
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    for name in ("transformers", "offramp.cloud.local_link"):
        assert subprocess.run([str(python), "-c", f"import {name}"], capture_output=True).returncode != 0, name
    edge_size, full_size = du_bytes(env_dir), du_bytes(Path(sys.prefix))
    with capsys.disabled():
        print(f"\nedge venv {edge_size / 2**20:.0f} MiB vs full venv {full_size / 2**20:.0f} MiB ({edge_size / full_size:.1%})")

    port = closed_port()
    cloud = CloudProcess(port)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    daemon = DaemonProcess(cloud=f"ws://127.0.0.1:{port}", edge=default_edge_dir, threshold=2.0, codec="fp32",
                           launcher=[str(env_dir / "bin" / "offramp")], env=env)
    try:
        assert cloud.proc.poll() is None, "".join(cloud.output[-30:])
        daemon.start(timeout=300)
        client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0)
        messages = [{"role": "user", "content": "What is gravity?"}]
        done = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=8, temperature=0)
        assert done.choices[0].message.content and set(done.offramp["sources"]) == {"cloud"}
        chunks = list(client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=8,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content
        status, health = http("GET", daemon.base_url + "/healthz")
        assert status == 200 and health["cloud"]["state"] == "up" and health["edge"]["edge_dir"] == str(default_edge_dir)
    finally:
        rc = daemon.stop()
        cloud.kill()
    assert rc == 0, "".join(daemon.output[-20:])
