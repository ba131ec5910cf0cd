"""Bring up a verified OpenAI-compatible MLX endpoint: the runbook, in order.

    pyinfra inventory.py deploy.py
"""

from tasks.host import tune_host
from tasks.model import fetch_model
from tasks.patches import apply_patches
from tasks.probes import probe_route
from tasks.proxy import start_proxy
from tasks.proxy_key import ensure_proxy_key
from tasks.server import start_server
from tasks.venv import create_venv
from tasks.verify import verify_route, write_manifest

create_venv()  # 2. a pinned Python environment
fetch_model()  # 1. the weights, downloaded and checked
apply_patches()  # 3. the mlx-lm source patches for GLM-5.2
tune_host()  # memory, sleep and file limits (macOS)
start_server()  # 4. mlx_lm.server on loopback, smoke-generated first
ensure_proxy_key()
start_proxy()  # 5. the proxy that strips `model`
write_manifest()
verify_route()  # 6. ports, shards, services, chat through the proxy; 9. trust gates
probe_route()  # 7. speed and memory probes, a report per host (bench_enabled)
