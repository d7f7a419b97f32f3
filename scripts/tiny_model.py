"""Builds a tiny Llama for the real-vLLM tests, offline, in a few seconds: a model directory that
vLLM serves with `--load-format dummy` (random weights, so nothing to download or store).

    .vllm-venv/bin/python scripts/tiny_model.py DIR

It needs `tokenizers`, which vLLM brings: run it with the Python of vLLM's environment
(scripts/vllm_env.sh). What it writes:
- config.json: LlamaForCausalLM, hidden size 64, 2 layers, 2 attention heads of size 32 (vLLM's
  CPU attention needs a head size of at least 32), a 4,096-token context;
- tokenizer.json: a byte-level BPE trained here on the text below, so any input can be encoded;
  `<tool_call>` and `</tool_call>` are added tokens, which vLLM's hermes tool parser looks up;
- tokenizer_config.json with a chat template (system, user, assistant and tool messages, and the
  tool list when a request has one) and generation_config.json.
The output is the same on every run; the weights are not in it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<tool_call>", "</tool_call>"]

# A few kilobytes of ordinary English for the tokenizer's merges: what it is trained on only decides
# how text splits into tokens, not what the random model says.
CORPUS = """\
Many people and applications share a few graphics cards that run a language model server.
Every new request makes every running one a little slower, and a batch job can starve a person
who is waiting for an answer in a chat window. A dispatcher sits in front of the servers and
looks exactly like one of them: the same routes, the same JSON, the same streaming.
Every user holds a token with a priority and a threshold. A request goes to the server only when
the server has room for it; until then it waits in a queue, where the most important request is
always the next one out. When the queue grows, the least important traffic is refused at once.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
Say something short. Write a haiku about the sea. What is the capital of France? Paris.
Tell me a story about a robot who learns to paint. Once upon a time, in a small town by the
river, there lived a robot named Ada. She could count to a million, but she could not draw a
line that looked like a wave. Every morning she walked to the bridge and watched the water.
The weather today is sunny with a light breeze from the west; tomorrow brings rain.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 1000 3.14 2.71 -1 +1 = * / % ( ) [ ] { } < > " ' ` ~
Code: def main(): return {"role": "assistant", "content": "hello"} if x > 0 else None
JSON: {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
The user asked for the weather in Paris, so the assistant called a tool and read its answer.
Streaming sends each token as it is generated, as a server-sent event, and ends with done.
Priority, threshold, queue, grant, release, consumer, sender, model, token, metrics, health.
"""

CHAT_TEMPLATE = (
    "{% if tools %}<s>system\nYou may call these tools:\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}</s>\n{% endif %}"
    "{% for message in messages %}<s>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['tool_calls'] %}{% for call in message['tool_calls'] %}<tool_call>"
    "{{ call['function'] | tojson }}</tool_call>{% endfor %}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tokenizer


def build(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32,
        "vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"]}, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} DIR")
    build(Path(sys.argv[1]))


if __name__ == "__main__":
    main()
