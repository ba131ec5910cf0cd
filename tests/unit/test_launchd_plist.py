"""templates/launchd/*.j2 render plists that give back exactly the service description.

plistlib is Python's reader of Apple's XML plist format; on a Mac the host
suite also runs `plutil -lint` on the installed files (tests/host/test_macos.py).
"""

from __future__ import annotations

import plistlib

import tasks.backends.launchd  # noqa: F401  (the backend renders with these templates)
from tasks.service_spec import Service
from tasks.templates import render

ARGV = [
    "/Users/me/venvs/mlx-route/bin/python", "-m", "mlx_lm.server",
    "--model", "/Users/me/models/with space & <angle> %percent",
    "--chat-template-args", '{"enable_thinking":false,"reasoning_effort":null}',
    "--temp", "0.0",
]


def service(**over) -> Service:
    fields = dict(
        name="server", label="org.mlxroute.server",
        description="mlx_lm.server --- serving <test> & more-",
        argv=list(ARGV), env={"HOME": "/Users/me", "PATH": "/opt/homebrew/bin:/usr/bin:/bin",
                              "HF_HUB_CACHE": "/Users/me/hf cache"},
        workdir="/Users/me", stdout="/Users/me/logs/server.out.log",
        stderr="/Users/me/logs/server.err.log", nofile=65536, restart_delay=7, stop_timeout_s=45,
        interactive=True,
        log_max_mb=50, log_keep=5,
    )
    return Service(**(fields | over))


def test_launchdaemon_plist_round_trips_the_description():
    svc = service()
    launched = ["/Users/me/bin/route_run.py", "--", *ARGV]
    plist = plistlib.loads(render("launchd/service.plist.j2", svc=svc, argv=launched,
                                  launcher_sha="0123abcd", user_name="me",
                                  session_type=None).encode())
    assert plist == {
        "Label": "org.mlxroute.server",
        "ProgramArguments": launched,
        "EnvironmentVariables": svc.env,
        "WorkingDirectory": "/Users/me",
        "UserName": "me",
        "InitGroups": True,
        "RunAtLoad": True,
        "KeepAlive": True,
        "ThrottleInterval": 7,
        "ExitTimeOut": 45,
        "ProcessType": "Interactive",
        # no ResourceLimits (they would set kern.maxfiles in a LaunchDaemon) and no
        # StandardOutPath/StandardErrorPath (launchd's file, never reopened): the
        # launcher sets the limit and writes the logs
    }


def test_background_launchagent_plist_has_a_session_type_and_no_user():
    plist = plistlib.loads(render("launchd/service.plist.j2", svc=service(interactive=False),
                                  argv=ARGV, launcher_sha="0123abcd", user_name=None,
                                  session_type="Background").encode())
    assert plist["LimitLoadToSessionType"] == "Background"
    assert "UserName" not in plist and "InitGroups" not in plist
    assert plist["ProcessType"] == "Standard"


def test_boot_tuning_plist_runs_the_commands_once_at_load():
    plist = plistlib.loads(render(
        "launchd/boot_tuning.plist.j2", label="org.mlxroute.host-tuning",
        argv=["/bin/sh", "-c", "/usr/sbin/sysctl -w iogpu.wired_limit_mb=507904"],
        log="/var/log/org.mlxroute.host-tuning.log").encode())
    assert plist["ProgramArguments"][-1] == "/usr/sbin/sysctl -w iogpu.wired_limit_mb=507904"
    assert plist["RunAtLoad"] is True and plist["LaunchOnlyOnce"] is True
