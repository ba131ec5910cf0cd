"""Shared fixtures live in tests/fixtures/; each module is registered here."""

import resource


def _import_mlx_lm_keeping_the_open_files_limit() -> None:
    """mlx_lm.utils sets the importing process's open-files limit to (2048, 4096)
    (mlx_lm 0.32.2, "for large models with lots of files"). Tests import it in
    this process, and without CAP_SYS_RESOURCE a hard limit cannot be raised
    again: every later test's children (tb-route's limit checks) would see 4096
    instead of the machine's limit. So it is imported once, here, with that one
    call skipped; the servers the tests start are separate processes and keep it."""
    real = resource.setrlimit
    resource.setrlimit = lambda *args: None
    try:
        import mlx_lm.utils  # noqa: F401
    except ImportError:
        pass  # the host suite (tests/host) on a host whose test venv has no mlx-lm
    finally:
        resource.setrlimit = real


_import_mlx_lm_keeping_the_open_files_limit()

pytest_plugins = [
    "tests.fixtures.artifacts",
    "tests.fixtures.proxy",
    "tests.fixtures.upstream_stub",
    "tests.fixtures.raw_upstream",
    "tests.fixtures.hubstub",
    "tests.fixtures.mlx_server",  # before tiny_glm, which imports its mlx_env()
    "tests.fixtures.tiny_glm",
    "tests.fixtures.smollm2",
]


def pytest_addoption(parser):
    parser.addoption(
        "--route-manifest",
        default="~/.local/share/mlx-route/route.json",
        help="path, on the host under test, of the route.json the deploy wrote (tests/host)",
    )
    parser.addoption(
        "--lan-host",
        default=None,
        help="address of a deployed host as LAN clients reach it (tests/workstation)",
    )
    parser.addoption(
        "--lan-ssh-config",
        default=None,
        help="ssh_config to read the host's route.json and key with: the deploy's "
             "reports/ssh/<host>.config (tests/workstation)",
    )
