"""Shared fixtures live in tests/fixtures/; each module is registered here."""

pytest_plugins = [
    "tests.fixtures.artifacts",
    "tests.fixtures.proxy",
    "tests.fixtures.upstream_stub",
    "tests.fixtures.hubstub",
    "tests.fixtures.tiny_glm",
]
