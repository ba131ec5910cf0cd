"""The watchdog's backoff: restarts that bring no token come further and further
apart, up to the ceiling (files/mlx_route_proxy/watchdog.py).

Stand-ins, because the point is the timing of the watchdog's own decisions,
not a model: the "server" is a `sleep` process (alive, 0% CPU, like a wedged
mlx_lm.server) whose pid a file holds; the upstream is a loopback socket that
accepts connections and never answers, so every probe times out; the
"restart command" only appends the time to a file, so the server stays stuck
and the watchdog has to restart it again and again. The proxy is the real
zipapp in its own process. tests/unit/test_watchdog.py does the real restarts
of a real mlx_lm.server under supervisord.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.fixtures.proxy import start_proxy

pytestmark = pytest.mark.timeout(120)

STUCK_S, INTERVAL_S, BACKOFF_S, BACKOFF_MAX_S = 1, 0.5, 2, 5


def test_restarts_without_a_token_back_off_doubling_up_to_the_ceiling(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections queue in the kernel; nothing ever answers
    sleeper = subprocess.Popen(["sleep", "300"])
    (tmp_path / "pid").write_text(f"{sleeper.pid}\n")
    restarts = tmp_path / "restarts"
    proxy = None
    try:
        proxy = start_proxy(
            f"http://127.0.0.1:{silent.getsockname()[1]}",
            "--restart-command", f"date +%s.%N >> {restarts}",
            "--server-pid-command", f"cat {tmp_path / 'pid'}",
            "--watchdog-stuck-s", str(STUCK_S), "--watchdog-interval-s", str(INTERVAL_S),
            "--watchdog-backoff-s", str(BACKOFF_S), "--watchdog-backoff-max-s",
            str(BACKOFF_MAX_S), "--probe-timeout-s", "1",
            log_path=tmp_path / "proxy.log")
        end = time.monotonic() + 60
        while not restarts.exists() or len(restarts.read_text().split()) < 5:
            assert time.monotonic() < end, proxy.log()[-3000:]
            time.sleep(0.2)
        with urllib.request.urlopen(proxy.url + "/metrics", timeout=10) as reply:
            metrics = reply.read().decode()
    finally:
        if proxy is not None:
            proxy.stop()
        sleeper.kill()
        sleeper.wait(10)
        silent.close()
    times = [float(t) for t in restarts.read_text().split()][:5]
    gaps = [b - a for a, b in zip(times, times[1:])]
    print(f"\ngaps between restarts: {[round(g, 1) for g in gaps]} s")
    # at least the backoff (2, 4, then the ceiling 5, 5); never much more
    for gap, least in zip(gaps, (2, 4, 5, 5)):
        assert least <= gap < least + STUCK_S + 3 * INTERVAL_S + 1, gaps
    assert int(re.search(r'proxy_watchdog_restarts_total\{reason="no_token"\} (\d+)',
                         metrics).group(1)) >= 5
    log = proxy.log()
    assert "restart 5 in a row" in log and "(backoff)" in log, log[-3000:]
