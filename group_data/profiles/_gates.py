"""What the profiles' trust gates share (tests/host/test_gates.py): one tool,
its call and its synthetic result, the limits and the Hermes child-agent tasks.
group_data/all.py puts each profile's own gates (its conversation, token and
time limits) on top of `GATES`."""

GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}

# The field report's Hermes child-agent tasks (docs/field-report.md): query and
# a substring of a good answer.
HERMES_TASKS = [
    {"name": "child_math", "query": "What is 17 * 23? Reply exactly RESULT=<number>.",
     "expect": "RESULT=391"},
    {"name": "child_summary", "query": "Summarize in one sentence: the local orchestrator "
     "model passed its tool-call gates.", "expect": "gate"},
    {"name": "child_json", "query": 'Reply with exactly this JSON: {"status":"ok"}',
     "expect": '"status"'},
]

GATES = {
    "tools": [GET_WEATHER],
    "tool_call_expect": {"name": "get_weather", "arguments": {"city": "Paris"}},
    "tool_result": '{"city": "Paris", "temperature_c": 22, "sky": "sunny"}',
    "tool_result_expect": "sunny",
    "concurrent_requests": 3,
    "cache_followup_max_ratio": 0.1,
    # provider None: the Hermes gate is reported as not run
    "hermes_provider": None,
    "hermes_tasks": HERMES_TASKS,
    "hermes_timeout_s": 600,
}
