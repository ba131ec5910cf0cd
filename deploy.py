"""Bring up a verified OpenAI-compatible MLX endpoint: the runbook, in order.

    pyinfra inventory.py deploy.py
"""

from tasks.foreign import retire_services
from tasks.host import tune_host
from tasks.model import fetch_model
from tasks.patches import apply_patches
from tasks.probes import probe_route
from tasks.proxy import start_proxy
from tasks.proxy_key import ensure_proxy_key
from tasks.release import build_release
from tasks.server import start_server
from tasks.verify import verify_route, write_manifest

build_release()  # 1. a pinned Python environment, built beside the running one
tune_host()  # 2. memory, sleep and file limits (macOS): no sleep before the download
fetch_model()  # 3. the weights, downloaded (or adopted) and checked
apply_patches()  # 4. the mlx-lm source patches for GLM-5.2, into the new release
retire_services()  # 5. what holds the ports: stop if data retires it, else refuse
start_server()  # 6. mlx_lm.server switched to the release: smoke, start, rollback
ensure_proxy_key()  # 7. the proxy's key, made on the host
start_proxy()  # 8. the proxy that strips `model`
write_manifest()  # 9. what the host suite checks
verify_route()  # 10. ports, shards, services, chat, trust gates
probe_route()  # 11. speed and memory probes, a report per host (bench_enabled)
