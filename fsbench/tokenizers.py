"""Tokenizers: open_clip's own (real loading code), and a stand-in for random-weight runs offline.

OpenAI-style models (CLIP, MetaCLIP, DFN, EVA-CLIP, ConvNeXt-CLIP) use open_clip's bundled BPE
tokenizer and load offline. SigLIP, SigLIP 2, MetaCLIP 2 and CLIPA name a Hugging Face tokenizer
(`text_cfg.hf_tokenizer_name`), which `open_clip.get_tokenizer` downloads from the hub. When
that fails, real weights make it a one-line `WeightsError`; seeded random weights
(`--pretrained none`) get a `StandInTokenizer` with the same interface (vocabulary size, fixed
context length, padding and special ids), announced by a one-line notice: random weights and a
stand-in tokenizer test the pipeline, not the model.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import open_clip
import torch

from fsbench.errors import WeightsError

# Special ids of the hub tokenizers open_clip's configs name (substring of the name -> ids).
# SigLIP: T5 sentencepiece (pad = eos = 1, open_clip's SigLipTokenizer); SigLIP 2: Gemma (pad 0,
# eos 1, no BOS); XLM-V (MetaCLIP 2): <s> 0, <pad> 1, </s> 2; BERT (CLIPA): [CLS] 101, [SEP] 102.
SPECIAL_IDS = (
    ("siglip2", {"pad": 0, "eos": 1, "bos": None}),
    ("siglip", {"pad": 1, "eos": 1, "bos": None}),
    ("xlm", {"pad": 1, "eos": 2, "bos": 0}),
    ("bert", {"pad": 0, "eos": 0, "bos": 101}),  # open_clip strips [SEP] to 0 (strip_sep_token)
)


@dataclass(frozen=True)
class StandInTokenizer:
    """Words hashed to ids: the interface of the real tokenizer, none of its vocabulary.

    `[bos] w1 ... wn eos pad ...`, cut or padded to `context_length`, every id below `vocab_size`.
    """

    name: str
    vocab_size: int
    context_length: int
    pad_id: int
    eos_id: int
    bos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        first = 1 + max(self.pad_id, self.eos_id, self.bos_id or 0)  # word ids avoid the specials
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return [first + zlib.crc32(w.encode()) % (self.vocab_size - first) for w in words]

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or self.context_length
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        head = [] if self.bos_id is None else [self.bos_id]
        for i, text in enumerate(texts):
            ids = (head + self.encode(text))[:length - 1] + [self.eos_id]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def stand_in(model_name: str) -> StandInTokenizer:
    """The stand-in for `model_name`'s tokenizer, sized from its open_clip config."""
    text = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    source = str(text.get("hf_tokenizer_name") or model_name)
    ids = next((v for key, v in SPECIAL_IDS if key in source.lower()), {"pad": 0, "eos": 1, "bos": None})
    return StandInTokenizer(source, int(text.get("vocab_size", 49408)), int(text.get("context_length", 77)),
                            ids["pad"], ids["eos"], ids["bos"])


def load_tokenizer(model_name: str, stand_in_ok: bool) -> tuple[Callable, bool]:
    """(tokenizer, is_stand_in) for an open_clip model name.

    Raises:
        WeightsError: the hub tokenizer cannot be fetched and `stand_in_ok` is False.
    """
    text = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    if not text.get("hf_tokenizer_name") and "siglip" not in model_name.lower():
        return open_clip.get_tokenizer(model_name), False  # open_clip's bundled BPE: offline
    try:
        with quiet_hub():
            return open_clip.get_tokenizer(model_name), False
    except Exception as exc:  # hub errors come in many types (OSError, requests, hf_hub)
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0].split(". ")[0][:160]
        if not stand_in_ok:
            raise WeightsError(
                f"could not fetch the tokenizer of {model_name}: {reason}. Without network access, "
                "pre-fill the Hugging Face cache (HF_HOME) elsewhere and copy it here; "
                "--pretrained none runs with a stand-in tokenizer for testing") from None
    tok = stand_in(model_name)
    print(f"note: tokenizer {tok.name} unavailable offline; using a stand-in with its interface "
          f"(vocabulary {tok.vocab_size}, context {tok.context_length}, padding id {tok.pad_id}); "
          "random weights + stand-in tokenizer test the pipeline, not the model", file=sys.stderr)
    return tok, True


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Fail fast and quietly when the hub is unreachable (local caches still work).

    Without this, huggingface_hub retries for about a minute and logs every attempt.
    """
    import socket

    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        constants.HF_HUB_OFFLINE = True
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        constants.HF_HUB_OFFLINE = saved
