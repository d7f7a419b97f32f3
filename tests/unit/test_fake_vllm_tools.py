"""Tool calling in the fake vLLM: refused as vLLM refuses it without --enable-auto-tool-choice and
--tool-call-parser (Open WebUI attaches tools to every chat, without tool_choice), accepted with them."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from tests.fake_vllm import FakeVLLMOptions, parse_args
from tests.unit.test_fake_vllm import HELLO, StartFake, raw, sdk, start_fake  # noqa: F401 - the fixture

TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "The current time.",
                                           "parameters": {"type": "object", "properties": {}}}}]
TOOLS_ON = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
AUTO_REFUSED = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


def vllm_error_body(message: str) -> bytes:
    """vLLM's 400 for a tool choice it cannot parse: create_error_response's defaults."""
    return orjson.dumps({"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}})


@pytest.mark.parametrize(("extra", "message"), [
    pytest.param({}, AUTO_REFUSED, id="tools-without-tool-choice"),
    pytest.param({"tool_choice": "auto"}, AUTO_REFUSED, id="auto"),
    pytest.param({"tool_choice": "required"}, 'tool_choice="required" requires --tool-call-parser to be set',
                 id="required"),
    pytest.param({"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
                 'tool_choice=function "get_time" requires --tool-call-parser to be set', id="named"),
])
async def test_tool_choice_without_tool_calling_is_vllms_400(start_fake: StartFake, extra: dict[str, Any],
                                                             message: str) -> None:
    fake = await start_fake()
    status, headers, body = await raw(fake, "POST", "/v1/chat/completions",
                                      {"model": "fake-model", "messages": HELLO, "tools": TOOLS, **extra})
    assert (status, headers["content-type"], body) == (400, "application/json", vllm_error_body(message))
    assert fake.engine.generation_tokens == 0


async def test_unknown_model_is_answered_before_the_tool_choice(start_fake: StartFake) -> None:
    fake = await start_fake()
    status, _, body = await raw(fake, "POST", "/v1/chat/completions",
                                {"model": "other", "messages": HELLO, "tools": TOOLS})
    assert status == 404 and orjson.loads(body)["error"]["param"] == "model"


@pytest.mark.parametrize("extra", [
    pytest.param({"tool_choice": "none"}, id="tool-choice-none"),
    pytest.param({"tool_choice": None}, id="tool-choice-null"),
    pytest.param({"tools": None}, id="tools-null"),
])
async def test_tools_that_ask_for_no_tool_choice_need_no_flag(start_fake: StartFake, extra: dict[str, Any]) -> None:
    fake = await start_fake()
    status, _, body = await raw(fake, "POST", "/v1/chat/completions",
                                {"model": "fake-model", "messages": HELLO, "tools": TOOLS, "max_tokens": 2, **extra})
    assert status == 200 and orjson.loads(body)["choices"][0]["message"]["content"] == "tok0 tok1"


@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["auto", "required", "named"])
async def test_tool_calling_switched_on_answers_as_usual(start_fake: StartFake, tool_choice: Any) -> None:
    fake = await start_fake(**TOOLS_ON)
    async with sdk(fake) as client:
        answer = await client.chat.completions.create(model="fake-model", messages=HELLO, tools=TOOLS,  # type: ignore[arg-type]
                                                      tool_choice=tool_choice, max_tokens=3)
        stream = await client.chat.completions.create(model="fake-model", messages=HELLO, tools=TOOLS,  # type: ignore[arg-type]
                                                      max_tokens=3, stream=True)
        streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert answer.choices[0].message.content == streamed == "tok0 tok1 tok2"


async def test_the_sdk_sees_vllms_error(start_fake: StartFake) -> None:
    fake = await start_fake()
    async with sdk(fake) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="fake-model", messages=HELLO, tools=TOOLS)  # type: ignore[arg-type]
    assert caught.value.status_code == 400 and caught.value.body == {
        "message": AUTO_REFUSED, "type": "BadRequestError", "param": None, "code": 400}


def test_command_line_switch_turns_tool_calling_on_and_needs_a_parser(capsys: pytest.CaptureFixture[str]) -> None:
    options = parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"], {})
    assert (options.enable_auto_tool_choice, options.tool_call_parser) == (True, "hermes")
    assert parse_args([], {}) == FakeVLLMOptions(port=8000)
    with pytest.raises(SystemExit):
        parse_args(["--enable-auto-tool-choice"], {})
    assert "--enable-auto-tool-choice requires --tool-call-parser" in capsys.readouterr().err
