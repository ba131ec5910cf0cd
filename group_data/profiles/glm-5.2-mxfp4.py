"""GLM-5.2 MXFP4 on a 512 GB M3 Ultra: the field report's model and server
command (docs/field-report.md, "The steps"). Loaded by group_data/all.py as
model_profiles["glm-5.2-mxfp4"], its gates on top of the shared ones
(_gates.py); README (model_*) explains each field."""

PROFILE = {
    "source": "hf",
    # The report's own command says "adjust the repo id if the published path
    # changes": set the repo you download from and pin its commit.
    "repo": "mlx-community/GLM-5.2-mxfp4",
    "revision": "main",
    "shards": 76,
    "size_gib": 368,
    "public_name": "glm-5.2",
    "trust_remote_code": True,
    "server_args": {
        "max-tokens": 2048,
        "prompt-cache-size": 2,
        "prompt-cache-bytes": 2147483648,
        "prefill-step-size": 2048,
        "chat-template-args": '{"enable_thinking":false,"reasoning_effort":null}',
        "temp": 0.0,
        "log-level": "INFO",
    },
    "smoke": {"messages": [{"role": "user", "content": "Reply exactly: OK"}], "expect": "OK",
              "max_tokens": 20},
    "ready_timeout_s": 1800,
    # the report: an 8.11 s tool call, a 43 s cold first answer after a restart;
    # it ran `hermes chat --provider <its provider>`: name yours (hermes_provider)
    "gates": {"max_tokens": 256, "max_wall_s": 300, "cache_prompt_tokens": 4500,
              "hermes_model": "glm-5.2", "tool_call_messages": [
                  {"role": "user", "content": "What's the weather in Paris? Use get_weather."}]},
    # the report's probes: a 4500-token needle, 128 integers, 220 words of prose
    "bench": {"needle_tokens": 4500, "cache_tokens": 4500, "integers": 128,
              "prose_words": 220, "timeout_s": 1800},
}
