"""Tool calling through the real path (openai SDK → sender.py → RabbitMQ → consumer.py → fake vLLM), as
Open WebUI uses it: its chats carry `tools` without `tool_choice`. A vLLM started without
--enable-auto-tool-choice --tool-call-parser refuses them with a 400 that reaches the client untouched;
with the two flags the same request is answered."""

from __future__ import annotations

import openai
import orjson
import pytest

from tests.integration.conftest import Stack, Tokens
from tests.integration.test_capacity import fake_requests

pytestmark = pytest.mark.integration

TOOLS = [{"type": "function", "function": {"name": "get_current_timestamp", "description": "The current time.",
                                           "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [{"role": "user", "content": "What time is it?"}]
AUTO_REFUSED = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


def client(url: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0, timeout=30)


def test_tools_without_tool_calling_on_vllm_get_vllms_400_untouched(stack: Stack, tokens: Tokens,
                                                                    unique_model: str) -> None:
    fake, _, sender = stack.served_model(unique_model, tokens.high)
    with pytest.raises(openai.BadRequestError) as caught:
        client(sender.url, tokens.high).chat.completions.create(
            model=unique_model, messages=MESSAGES, tools=TOOLS)  # type: ignore[arg-type]
    error = caught.value
    assert error.status_code == 400
    assert error.response.content == orjson.dumps({"error": {"message": AUTO_REFUSED, "type": "BadRequestError",
                                                             "param": None, "code": 400}})
    assert error.response.headers["content-type"] == "application/json"
    posted = [request["path"] for request in fake_requests(fake) if request["method"] == "POST"]
    assert posted == ["/v1/chat/completions"], "the request must have been granted and sent to vLLM"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tools_with_tool_calling_on_vllm_are_answered(stack: Stack, tokens: Tokens, unique_model: str,
                                                      stream: bool) -> None:
    fake, _, sender = stack.served_model(unique_model, tokens.high,
                                         ("--enable-auto-tool-choice", "--tool-call-parser", "hermes"))
    chat = client(sender.url, tokens.high).chat.completions
    if stream:
        chunks = chat.create(model=unique_model, messages=MESSAGES, tools=TOOLS, max_tokens=3,  # type: ignore[arg-type]
                             stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    else:
        answer = chat.create(model=unique_model, messages=MESSAGES, tools=TOOLS, max_tokens=3)  # type: ignore[arg-type]
        text = answer.choices[0].message.content or ""
    assert text == "tok0 tok1 tok2"
    assert orjson.loads(fake_requests(fake)[-1]["body"])["tools"] == TOOLS
