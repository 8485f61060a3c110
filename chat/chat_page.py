"""The Gradio chat page: streams answers from a `loreft serve` server through the openai client.

stream_reply holds the chat logic and needs no gradio; build_page imports gradio (installed by the chat
task's setup only) and wires stream_reply into a ChatInterface with a model picker.
"""

from __future__ import annotations

from typing import Iterator

SINGLE_PROMPT_NOTE = "\n\n_(this model was trained on single prompts: only your last message was sent)_"


def to_messages(history) -> list[dict]:
    """Gradio's history (role/content dicts, or [user, assistant] pairs in older versions) as OpenAI messages."""
    messages = []
    for turn in history or []:
        if isinstance(turn, dict):
            content = turn.get("content")
            if isinstance(content, list):  # a list of parts: keep the text ones
                content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
            if turn.get("role") in ("user", "assistant", "system") and isinstance(content, str):
                messages.append({"role": turn["role"], "content": content})
        elif isinstance(turn, (list, tuple)) and len(turn) == 2:
            user, assistant = turn
            if user:
                messages.append({"role": "user", "content": str(user)})
            if assistant:
                messages.append({"role": "assistant", "content": str(assistant)})
    return messages


def stream_reply(client, model: str, message: str, history, max_tokens: int = 512, temperature: float = 0.0) -> Iterator[str]:
    """The answer so far, growing as tokens stream in (what a Gradio chat function yields)."""
    import openai

    messages = to_messages(history) + [{"role": "user", "content": message}]
    note = ""
    try:
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=temperature, stream=True)
    except openai.BadRequestError as e:
        param = (e.body or {}).get("param") if isinstance(e.body, dict) else None
        if param != "messages" or len(messages) == 1:
            raise
        # an adapter trained with a prompt template takes one prompt, not a conversation
        stream = client.chat.completions.create(model=model, messages=messages[-1:], max_tokens=max_tokens,
                                                temperature=temperature, stream=True)
        note = SINGLE_PROMPT_NOTE
    text = ""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            yield text
    yield text + note


def build_page(client, models: list[str], default: str, title: str = "Chat with a ReFT adapter"):
    """A Gradio ChatInterface streaming from the server, with a picker for the base model or the adapter."""
    import gradio as gr

    picker = gr.Dropdown(choices=models, value=default, label="Model (the base model, or the adapter on it)")
    max_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens")
    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")

    def respond(message, history, model, max_new, temp):
        yield from stream_reply(client, model, message, history, int(max_new), float(temp))

    return gr.ChatInterface(respond, title=title, additional_inputs=[picker, max_tokens, temperature],
                            description=f"Served by `loreft serve`: {', '.join(models)}")
