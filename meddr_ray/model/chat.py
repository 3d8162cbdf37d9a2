"""The user turn as a vision-language model sees it: the one rendering that generation and training share."""

from __future__ import annotations


def user_turn(text: str, with_image: bool = True) -> dict:
    """One user message in the chat-template format: the image placeholder (if any), then the text."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def chat_prompt(processor, text: str, with_image: bool = True) -> str:
    """The user turn through the processor's chat template, ending where the assistant's answer starts."""
    return processor.apply_chat_template([user_turn(text, with_image)], add_generation_prompt=True)
