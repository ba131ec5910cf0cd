"""Hosts to provision, and their overrides of group_data/all.py.

The default is this machine itself, serving the small embedded model, which is
what README's first command and CI run. For a Mac Studio, add it to `macs`
(or copy this file): every key in group_data/all.py can be set per host.
"""

# This machine, with the small model (SmolLM2-135M, embedded via PyPI).
local = [
    ("@local", {"model_profile": "smollm2-135m"}),
]

# Mac Studios serving GLM-5.2 over SSH; uncomment and edit. Several hosts are
# provisioned in parallel, each with its own overrides.
# macs = [
#     ("studio.local", {
#         "ssh_user": "milo",
#         "model_profile": "glm-5.2-mxfp4",
#         "venv_python": "/opt/homebrew/bin/python3.12",
#         "proxy_host": "0.0.0.0",   # LAN-visible: needs the key
#         "proxy_api_key": True,
#     }),
# ]

# The workload role (README, Agent workloads): hosts with workload_enabled get
# Terminal-Bench and Hermes, set up against the route. A workstation that runs
# them against a Mac on the LAN (`pyinfra inventory.py workload.py --limit workload`):
# workload = [
#     ("@local", {
#         "workload_enabled": True,
#         "model_profile": "glm-5.2-mxfp4",                       # what the Mac serves
#         "workload_api_base": "http://studio.local:8026/v1",
#         "workload_key_file": "~/.config/mlx-route/studio.key",   # a copy, mode 0600
#     }),
# ]
