"""Shared fixtures live in tests/fixtures/; each module is registered here."""

pytest_plugins = [
    "tests.fixtures.artifacts",
    "tests.fixtures.proxy",
    "tests.fixtures.upstream_stub",
    "tests.fixtures.raw_upstream",
    "tests.fixtures.hubstub",
    "tests.fixtures.tiny_glm",
    "tests.fixtures.smollm2",
    "tests.fixtures.mlx_server",
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
