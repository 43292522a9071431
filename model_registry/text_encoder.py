"""Caption features for t2i models, as the original's `language/t5.py` and `sample_t2i.py` make
them: the caption cleaning used in training (applied twice), T5 tokenisation to 120 tokens
(truncated, end-of-sequence token kept), `T5EncoderModel.last_hidden_state`, then left padding.

The engine only needs each caption's valid rows (`TextEncoder.encode`); `left_pad` builds the
original's 120-slot layout and mask for the reference generator.
"""

from __future__ import annotations

import html
import json
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_registry.configs import ConfigError, GPTConfig

T5_MAX_LENGTH = 120  # the original's --t5-feature-max-len and CaptionEmbedder token_num
DEFAULT_TEXT_ENCODER = "google/flan-t5-xl"

# The training-time caption cleaning (PixArt's, kept by LlamaGen), as ordered substitutions.
# Order matters: later rules see earlier rules' output. Comments say what each rule targets.
_URL_TAIL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}"
_DASHES = (r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40"
           r"\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+")
_BEFORE_HTML: list[tuple[str, str]] = [
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL, ""),  # links
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TAIL, ""),
]
_AFTER_HTML: list[tuple[str, str]] = [
    (r"@[\w\d]+\b", ""),  # @nicknames
    # CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, ideographs, hexagrams
    (r"[\u31c0-\u31ef]+", ""), (r"[\u31f0-\u31ff]+", ""), (r"[\u3200-\u32ff]+", ""),
    (r"[\u3300-\u33ff]+", ""), (r"[\u3400-\u4dbf]+", ""), (r"[\u4dc0-\u4dff]+", ""),
    (r"[\u4e00-\u9fff]+", ""),
    (_DASHES, "-"),  # every dash -> "-"
    (r"[`´«»“”¨]", '"'), (r"[‘’]", "'"),  # one kind of quotes
    (r"&quot;?", ""), (r"&amp", ""),  # leftover entities
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # literal backslash-n
    (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),  # #123, #12345.., 123456..
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", '"'), (r"[\.]{2,}", " "),  # repeated quotes, ellipses
    (_BAD_PUNCT, " "),
    (r"\s+\.\s+", " "),  # " . "
]
_SEPARATORS = r"(?:\-|\_)"  # this-is-my-cute-cat: more than 3 -> spaces
_AFTER_BASIC: list[tuple[str, str]] = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # product codes
    (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""), (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes such as 1920x1080
    (r"\b\s+\:\s+", ": "), (r"(\D[,\./])\b", r"\1 "), (r"\s+", " "),
    # The original strips here but drops the result, so these anchors see edge spaces.
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"), (r"^[\'\_,\-\:;]", ""), (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
]


def _basic_clean(text: str) -> str:
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _clean_once(caption: str) -> str:
    from bs4 import BeautifulSoup

    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    for pattern, repl in _BEFORE_HTML:
        caption = re.sub(pattern, repl, caption)
    caption = BeautifulSoup(caption, features="html.parser").text
    for pattern, repl in _AFTER_HTML:
        caption = re.sub(pattern, repl, caption)
    if len(re.findall(_SEPARATORS, caption)) > 3:
        caption = re.sub(_SEPARATORS, " ", caption)
    caption = _basic_clean(caption)
    for pattern, repl in _AFTER_BASIC:
        caption = re.sub(pattern, repl, caption)
    return caption.strip()


def clean_caption(text: str) -> str:
    """The original's text preprocessing: its cleaning, applied twice, as in training."""
    return _clean_once(_clean_once(text))


def fetch_text_encoder(repo_id: str) -> Path:
    """A hub text encoder's config, tokenizer and weights in the hub cache (downloaded if the
    network allows), so a server with HF_HUB_OFFLINE=1 loads it from there."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.model", "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):  # older repos ship PyTorch pickles only
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.model",
                                                                     "*.bin"]))
    except Exception as e:
        raise ConfigError(f"cannot get text encoder {repo_id!r} (not a local directory, not "
                          f"in the hub cache, no network?): {type(e).__name__}: {e}") from None
    return folder


def text_encoder_section(spec: str, gpt: GPTConfig) -> dict[str, Any]:
    """The config.json entry for a t2i model's text encoder: a local directory, or a hub name
    fetched into the hub cache now; its feature width must be the GPT's caption_dim."""
    path = Path(spec).expanduser()
    folder = path if path.is_dir() else fetch_text_encoder(spec)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"text encoder {spec} has no config.json")
    d_model = json.loads(config_file.read_text()).get("d_model")
    if d_model != gpt.caption_dim:
        raise ConfigError(f"text encoder {spec} gives {d_model}-wide features; the GPT's "
                          f"caption_dim is {gpt.caption_dim}")
    name = str(path.resolve()) if path.is_dir() else spec
    return {"name_or_path": name, "max_length": T5_MAX_LENGTH, "caption_dim": gpt.caption_dim}


def left_pad(valid: list[torch.Tensor], length: int = T5_MAX_LENGTH
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid caption rows -> the original sampler's layout: (B, length, dim) features with the
    valid rows at the end and zeros before, and the (B, length) int64 mask."""
    dim = valid[0].shape[-1]
    features = torch.zeros(len(valid), length, dim, dtype=valid[0].dtype)
    masks = torch.zeros(len(valid), length, dtype=torch.long)
    for i, rows in enumerate(valid):
        features[i, length - len(rows):] = rows
        masks[i, length - len(rows):] = 1
    return features, masks


@dataclass
class EncodedCaption:
    text: str  # after cleaning
    token_ids: list[int]  # the valid tokens, end-of-sequence included
    features: torch.Tensor  # (len(token_ids), caption_dim) float32, on the CPU


class TextEncoder:
    """The T5 encoder and tokenizer (a local directory or a hub name, from the hub cache).

    GPU: bf16, as the original; CPU: fp32. Captions are encoded as a batch padded to 120, as
    the original does, so each caption's features do not depend on its batch-mates' lengths."""

    def __init__(self, name_or_path: str, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, max_length: int = T5_MAX_LENGTH):
        from transformers import AutoTokenizer, T5EncoderModel

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = T5EncoderModel.from_pretrained(name_or_path, dtype=self.dtype)
        self.model.to(self.device).eval()

    @classmethod
    def from_section(cls, section: dict[str, Any], **kwargs: Any) -> TextEncoder:
        return cls(section["name_or_path"], max_length=section.get("max_length", T5_MAX_LENGTH),
                   **kwargs)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> list[EncodedCaption]:
        cleaned = [clean_caption(t) for t in texts]
        batch = self.tokenizer(cleaned, max_length=self.max_length, padding="max_length",
                               truncation=True, return_attention_mask=True,
                               add_special_tokens=True, return_tensors="pt")
        hidden = self.model(input_ids=batch["input_ids"].to(self.device),
                            attention_mask=batch["attention_mask"].to(self.device)
                            ).last_hidden_state.float().cpu()
        out = []
        for i, text in enumerate(cleaned):
            # T5's tokenizer pads on the right: the valid tokens come first.
            n = int(batch["attention_mask"][i].sum())
            out.append(EncodedCaption(text, batch["input_ids"][i, :n].tolist(), hidden[i, :n]))
        return out
