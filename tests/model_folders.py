"""Tiny classifier folders made on the spot, as Loom stores them (safetensors, no hub).

Importable from every tier (``tests/`` is on ``sys.path`` through its conftest):

    folder = make_digits_folder(tmp_path / "digits", arch="cnn")
    folder = make_text_classifier_folder(tmp_path / "sentiment", labels=("neg", "pos"))
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.bundled import bundled_model_dir
from models.engines.classify import save_family_model
from models.families.digits import DigitsConfig, build_digits


def make_digits_folder(folder: Path, *, arch: str = "mlp", seed: int = 0) -> Path:
    """A randomly initialised digits model (config.json + model.safetensors) in ``folder``."""
    torch.manual_seed(seed)
    config = DigitsConfig(arch=arch, hidden=16)
    save_family_model(build_digits(config).eval(), config, folder)
    return folder


def make_text_classifier_folder(
    folder: Path,
    *,
    labels: tuple[str, ...] = ("negative", "neutral", "positive"),
    problem_type: str | None = None,
    seed: int = 0,
) -> Path:
    """A 1-layer BertForSequenceClassification over the bundled MiniLM's tokenizer (30,522
    tokens x 16 wide: ~0.5 M parameters), saved as safetensors with its tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type=problem_type,
        # wide weights, so different texts get visibly different probabilities (at the default
        # 0.02 every text gets ~[0.15, 0.19, 0.65] and a mix-up of rows would go unseen)
        initializer_range=0.5,
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


TINY_GPT2_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model serves requests and streams tokens back",
    "once upon a time there was a tiny language model",
] * 20


def make_tiny_gpt2_folder(folder: Path, *, n_positions: int = 64, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (32 wide, ~30 k parameters) with a 300-token byte-level BPE tokenizer
    trained here, saved as safetensors: generates real (random) text in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"])
    bpe.train_from_iterator(TINY_GPT2_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    return folder
