"""The embedded corpus (``pydoc_data.topics``), registered in torchtitan's ``DATASETS`` as ``pydoc_topics``
and ``pydoc_topics_validation``, and its locally built BPE tokenizer (no downloads): docs/torchtitan.md.
"""

import contextlib
import hashlib
import json
import os
import tempfile

TRAIN_DATASET = "pydoc_topics"
VALIDATION_DATASET = "pydoc_topics_validation"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
_TOKENIZER_FORMAT = 1  # bump when the trainer settings below change


def documents(split: str = "train") -> list[str]:
    """The corpus documents of one split ("train" or "validation"), in a fixed order."""
    from pydoc_data.topics import topics

    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    return [topics[n] for i, n in enumerate(sorted(topics)) if (i % 10 == 6) == (split == "validation")]


def corpus_digest() -> str:
    text = b"".join(d.encode() + b"\0" for split in ("train", "validation") for d in documents(split))
    return hashlib.sha256(text).hexdigest()[:12]


def tokenizer_dir(vocab_size: int = 2048) -> str:
    """The folder of the BPE tokenizer for ``vocab_size``, trained on first use (a second); racing ranks each
    build privately and rename into place, the losers use the winner's."""
    if not 260 <= vocab_size <= 65536:
        raise ValueError(f"tokenizer vocab_size must be in [260, 65536], got {vocab_size}")
    root = os.environ.get("DIST_MARSM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dist_marsm")
    final = os.path.join(root, f"pydoc-bpe-v{_TOKENIZER_FORMAT}-{vocab_size}-{corpus_digest()}")
    if os.path.exists(os.path.join(final, "tokenizer_config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".building-", dir=root, ignore_cleanup_errors=True) as tmp:
        _train_tokenizer(tmp, vocab_size)
        with contextlib.suppress(OSError):  # another rank's build is already in place
            os.rename(tmp, final)
    if not os.path.exists(os.path.join(final, "tokenizer_config.json")):
        raise RuntimeError(f"could not place the embedded tokenizer in {final}")
    return final


def _train_tokenizer(out_dir: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents("train"), trainer=trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1 << 20,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "dist_marsm": {"corpus": "pydoc_data.topics", "digest": corpus_digest(), "vocab_size": vocab_size},
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)


def register_datasets() -> None:
    """Register both splits with torchtitan's text dataloader (idempotent)."""
    from datasets import Dataset
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    for name, split in ((TRAIN_DATASET, "train"), (VALIDATION_DATASET, "validation")):
        if name not in DATASETS:
            DATASETS[name] = DatasetConfig(
                path=f"pydoc_data.topics:{split}",
                sample_processor=lambda sample: sample["text"],
                loader=lambda path, split=split: Dataset.from_dict({"text": documents(split)}),
            )
