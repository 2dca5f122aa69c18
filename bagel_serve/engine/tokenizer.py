"""The Qwen2.5 tokenizer as BAGEL uses it: no chat template, explicit special ids looked up by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here"
)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    start_of_image: int
    end_of_image: int


class BagelTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        from bagel_serve.model.loader import CheckpointError

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"missing checkpoint file: {path} (the BAGEL repo ships tokenizer.json)")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for any unreadable file
            raise CheckpointError(f"{path} is not a readable tokenizer file: {str(e).splitlines()[0][:200]}") from None
        ids = {}
        for name in (IM_START, IM_END, VISION_START, VISION_END):
            i = self._tok.token_to_id(name)
            if i is None:
                raise CheckpointError(f"{path}: tokenizer has no {name} token (not a Qwen2.5 tokenizer of BAGEL?)")
            ids[name] = i
        self.special = SpecialTokens(ids[IM_START], ids[IM_END], ids[VISION_START], ids[VISION_END])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def segment(self, text: str) -> list[int]:
        """A text segment of the context: `<|im_start|> text <|im_end|>`, no role words."""
        return [self.special.bos, *self.encode(text), self.special.eos]

    def decode_generation(self, ids: list[int]) -> str:
        """The reference's post-processing of generated tokens (which it returns after the start token it
        fed): the text between that start token and the first end token."""
        text = self.decode([self.special.bos, *ids]).split(IM_END)[0]
        parts = text.split(IM_START)
        return parts[1] if len(parts) > 1 else parts[0]
