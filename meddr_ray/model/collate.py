"""Instruction rows -> model inputs for supervised fine-tuning, with the loss on the answer only.

A row is ``(image bytes, prompt, answer)``. The model sees exactly what it sees at inference: the chat-templated
user turn with the image and the instruction, as :func:`meddr_ray.model.chat.chat_prompt` renders it, run through
the processor (which expands the image placeholder into the model's image tokens). After it comes the assistant
answer and the template's end-of-turn token, so the fine-tuned model learns to stop.

``labels`` copy ``input_ids`` on the answer + end-of-turn tokens and are ``-100`` everywhere else: the prompt
(system and user text, the image tokens) and the padding. The prompt and the answer are tokenized separately and
concatenated, so the boundary is exact whatever the tokenizer would merge across it.

No Ray here: the Ray Train loop passes an :class:`InstructionCollator` as ``collate_fn`` to
``iter_torch_batches``, which hands it a dict of numpy columns.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from meddr_ray.data.errors import DataError, where
from meddr_ray.data.images import decode_image
from meddr_ray.model.chat import chat_prompt, user_turn

IGNORE_INDEX = -100
"""Label value that ``torch.nn.CrossEntropyLoss`` (and every HF causal-LM loss) skips."""

_TEXT_KEYS = ("input_ids", "attention_mask")


def completion_text(processor, prompt: str, answer: str) -> str:
    """What follows the prompt in a full conversation: the answer and the template's end-of-turn token.

    Rendered from the chat template itself (user turn + assistant turn) so any template works; whatever the
    template puts after the end-of-turn token (a newline, the next turn's header) is not trained on.
    """
    tok = processor.tokenizer
    answer = answer.strip()
    head = chat_prompt(processor, prompt)
    full = processor.apply_chat_template(
        [
            user_turn(prompt),
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    )
    eos = tok.eos_token or ""
    if not full.startswith(head) or answer not in full[len(head) :]:
        # a template that renders the assistant turn differently from its generation prompt: answer + EOS
        return answer + eos
    tail = full[len(head) :]
    after = tail[tail.index(answer) + len(answer) :]
    # keep the suffix up to and including the first special token (the end of turn), e.g. "<|im_end|>"
    specials = sorted((s for s in tok.all_special_tokens if s and s in after), key=after.index)
    if specials:
        end = after.index(specials[0]) + len(specials[0])
        return tail[: tail.index(answer) + len(answer)] + after[:end]
    return tail[: tail.index(answer) + len(answer)] + eos


class InstructionCollator:
    """Turns a batch of instruction rows into padded tensors with answer-only labels.

    Args:
        processor: the model's ``AutoProcessor`` (tokenizer + image processor + chat template).
        max_length: token budget per sample (prompt with image tokens + answer). Answers are truncated to fit;
            a prompt that alone exceeds it is an error naming the row, since cutting image tokens breaks the model.
        max_image_bytes, max_image_pixels: decoding limits (``DataConfig``).
        image_column, prompt_column, answer_column, id_column: column names of the instruction Parquet.
    """

    def __init__(
        self,
        processor,
        max_length: int,
        *,
        max_image_bytes: Optional[int] = None,
        max_image_pixels: Optional[int] = None,
        image_column: str = "image",
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        id_column: str = "id",
    ):
        self.processor = processor
        self.max_length = int(max_length)
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.columns = (image_column, prompt_column, answer_column)
        self.id_column = id_column
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")

    # ------------------------------------------------------------------------------------------ encoding

    def _where(self, batch: Mapping[str, Sequence], i: int) -> str:
        """The row's id (``row id X``); without an id column, its place in the batch (``batch row 3``)."""
        ids = batch.get(self.id_column)
        return where(row_id=str(ids[i])) if ids is not None else f"batch {where(row=i)}"

    def _images(self, batch: Mapping[str, Sequence]) -> List[Any]:
        images = []
        for i, data in enumerate(batch[self.columns[0]]):
            where = self._where(batch, i)
            if data is None or len(data) == 0:
                raise DataError(f"{where}: no image (column {self.columns[0]!r} is empty); training needs one")
            images.append(
                decode_image(bytes(data), max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, where=where)
            )
        return images

    def encode(self, batch: Mapping[str, Sequence]) -> Tuple[List[List[int]], List[List[int]], Dict[str, Any]]:
        """Unpadded ``(input_ids, labels)`` per row and the processor's image tensors for the batch."""
        image_col, prompt_col, answer_col = self.columns
        for col in self.columns:
            if col not in batch:
                raise KeyError(f"instruction batch has no column {col!r} (columns: {sorted(batch)})")
        prompts = [str(p) for p in batch[prompt_col]]
        answers = [str(a) for a in batch[answer_col]]
        images = self._images(batch)
        tok = self.processor.tokenizer
        heads = self.processor(images=images, text=[chat_prompt(self.processor, p) for p in prompts])
        extra = {k: v for k, v in heads.items() if k not in _TEXT_KEYS}
        all_ids, all_labels = [], []
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            head = list(heads["input_ids"][i])
            if len(head) >= self.max_length:
                raise ValueError(
                    f"{self._where(batch, i)}: the prompt alone is {len(head)} tokens (image tokens included), "
                    f"which leaves no room for the answer within train.max_length={self.max_length}"
                )
            tail = tok(completion_text(self.processor, prompt, answer), add_special_tokens=False)["input_ids"]
            tail = tail[: self.max_length - len(head)]  # a long answer (report) is cut, the prompt never
            all_ids.append(head + tail)
            all_labels.append([IGNORE_INDEX] * len(head) + list(tail))
        return all_ids, all_labels, extra

    def __call__(self, batch: Mapping[str, Sequence]) -> Dict[str, Any]:
        import torch

        ids, labels, extra = self.encode(batch)
        width = max(len(x) for x in ids)
        n = len(ids)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        label_t = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for i, (row, lab) in enumerate(zip(ids, labels)):  # right padding: positions stay 0..len-1 for training
            input_ids[i, : len(row)] = torch.tensor(row)
            label_t[i, : len(lab)] = torch.tensor(lab)
            attention[i, : len(row)] = 1
        out: Dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "labels": label_t}
        for key, value in extra.items():
            out[key] = _to_tensor(value)
        return out


def _to_tensor(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        return torch.as_tensor(np.stack([np.asarray(v) for v in value]))
    return torch.as_tensor(np.asarray(value))
