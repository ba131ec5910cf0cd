"""The workstation's view: what a client on the LAN (LiteLLM, Terminal-Bench,
Hermes on another machine) meets. Only --lan-host is contacted."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest

CLIENT_MODEL = "openai/glm52"  # what LiteLLM / Terminal-Bench send


def status(url: str, headers: dict | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def refused(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture(scope="module")
def lan_only(lan_proxy):
    if not lan_proxy:
        pytest.skip("the proxy listens on loopback only (proxy_host): nothing to call from the LAN")


def test_lan_client_with_the_key_lists_models_and_chats_through_the_openai_sdk(
        lan_only, lan_host, route, key, record_property):
    import openai

    client = openai.OpenAI(base_url=f"http://{lan_host}:{route['proxy']['port']}/v1",
                           api_key=key or "none", max_retries=0, timeout=300)
    started = time.monotonic()
    models = [m.id for m in client.models.list().data]
    models_s = time.monotonic() - started
    assert models, "no model listed"
    started = time.monotonic()
    reply = client.chat.completions.create(model=CLIENT_MODEL, messages=route["smoke"]["messages"],
                                           max_tokens=route["smoke"].get("max_tokens", 32))
    chat_s = time.monotonic() - started
    record_property("lan_models_s", round(models_s, 3))
    record_property("lan_chat_wall_s", round(chat_s, 3))
    print(f"LAN client at {lan_host}: /v1/models in {models_s * 1000:.0f} ms, "
          f"chat answered in {chat_s:.2f} s")
    assert reply.model == CLIENT_MODEL
    assert route["smoke"]["expect"] in reply.choices[0].message.content


def test_lan_client_without_or_with_a_wrong_key_gets_401(lan_only, lan_host, route, key):
    if not key:
        pytest.skip("the proxy takes no key (proxy_api_key is off)")
    url = f"http://{lan_host}:{route['proxy']['port']}/v1/models"
    assert status(url) == 401
    assert status(url, {"Authorization": "Bearer not-" + key[:4]}) == 401


def test_server_port_refuses_the_lan(lan_host, route):
    assert refused(lan_host, route["server"]["port"]), \
        f"{lan_host}:{route['server']['port']}: mlx_lm.server is reachable from the LAN"


def test_loopback_only_proxy_refuses_the_lan(lan_proxy, lan_host, route):
    if lan_proxy:
        pytest.skip("the proxy listens on the LAN (proxy_host)")
    assert refused(lan_host, route["proxy"]["port"]), \
        f"{lan_host}:{route['proxy']['port']}: the loopback-only proxy is reachable"
