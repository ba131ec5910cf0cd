"""Bring up a verified OpenAI-compatible MLX endpoint: the runbook, in order.

    pyinfra inventory.py deploy.py
"""

from tasks.as_user import route_user_args
from tasks.foreign import retire_services
from tasks.front_door import start_front_door
from tasks.manifest import write_manifest
from tasks.model import fetch_models
from tasks.patches import apply_patches
from tasks.probes import probe_route
from tasks.proxy import start_proxy
from tasks.proxy_key import ensure_proxy_key
from tasks.release import build_release
from tasks.replicas import copy_replica_keys
from tasks.server import start_server
from tasks.services import front_door_only, served_profiles, serves_http
from tasks.tuning import tune_host
from tasks.verify import verify_route
from tasks.workload import provision_workload

# The route's own files and services belong to route_user: when that is not the
# SSH user, those steps run as route_user through sudo (tasks/as_user.py).
as_route = route_user_args()

build_release(**as_route)  # 1. a pinned Python environment, built beside the running one
if front_door_only():  # route_front_door_only: the proxy alone, in front of other hosts
    retire_services()  # what holds the proxy's port: stop if data retires it, else refuse
    start_front_door(**as_route)  # its folders and service manager; current -> the release
else:
    tune_host()  # 2. memory, sleep and file limits (macOS): no sleep before the download
    fetch_models(**as_route)  # 3. the weights of each served profile, downloaded (or adopted) and checked
    apply_patches(**as_route)  # 4. the mlx-lm source patches for GLM-5.2, into the new release
    retire_services()  # 5. what holds the ports: stop if data retires it, else refuse
    start_server(**as_route)  # 6. mlx_lm.server switched to the release: smoke, start, rollback
if serves_http():  # a cluster's hosts without rank 0 run only their ranks (tasks/cluster.py)
    ensure_proxy_key(**as_route)  # 7. the proxy's key, made on the host
    copy_replica_keys(served_profiles(), **as_route)  # the keys of replica hosts' proxies
    start_proxy(**as_route)  # 8. the proxy that strips `model`
    provision_workload(**as_route)  # 9. Terminal-Bench and Hermes for this route (workload_enabled)
write_manifest(**as_route)  # 10. what the host suite checks (a rank-only host: its ranks)
verify_route()  # 11. ports, shards, services, chat, trust gates (Hermes: workload_enabled)
if serves_http():
    probe_route()  # 12. speed and memory probes, a report per host (bench_enabled)
