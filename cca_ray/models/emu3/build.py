"""A tiny random-init Emu3 in the real layout and vocabulary mapping, built offline (tests and the demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from cca_ray.models.emu3.adapter import BOS, EOS, PAD, SPECIALS, Emu3Adapter, visual_token

_BASE_CORPUS = [
    "a handwritten digit zero one two three four five six seven eight nine",
    "a photo of a cat on a mat", "an image of", "0 1 2 3 4 5 6 7 8 9 * 10 11 12 16 28 32 64 90",
]


def build_tiny_emu3(
    out_dir,
    *,
    codebook_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_prompt_tokens: int = 32,
    prompts: Sequence[str] = (),
    bpe_vocab_size: int = 400,
    max_positions: int = 4096,
    seed: int = 0,
) -> Path:
    """Build, save (save_pretrained) and return the path of a random-init Emu3 with a byte-level
    BPE trained on `prompts`, Emu3's special tokens and `codebook_size` visual tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3TextConfig, Emu3VQVAEConfig
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(list(_BASE_CORPUS) + list(prompts), trainer=trainer)
    bpe.add_special_tokens([visual_token(k) for k in range(codebook_size)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    vocab = tok.get_vocab()

    torch.manual_seed(seed)
    text = Emu3TextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        attention_dropout=0.0,
    )
    vq = Emu3VQVAEConfig(
        codebook_size=codebook_size, base_channels=32, channel_multiplier=[1, 1, 1, 1],
        num_res_blocks=1, attn_resolutions=[], hidden_size=32, embed_dim=4, latent_channels=4,
    )
    hf = Emu3ForConditionalGeneration(Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocab))
    adapter = Emu3Adapter(hf, tok, max_prompt_tokens=max_prompt_tokens)
    adapter.save(out_dir)
    return out_dir


def build_tiny_from_config(out_dir, model_cfg, *, codebook_size: int, prompts: Sequence[str] = (), **_) -> Path:
    """The registry's build_tiny: a tiny Emu3 of model_cfg's size (class facts are not needed: Emu3 reads prompts)."""
    return build_tiny_emu3(
        out_dir, codebook_size=codebook_size, hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers,
        num_heads=model_cfg.num_heads, num_kv_heads=model_cfg.num_kv_heads,
        intermediate_size=model_cfg.intermediate_size, max_prompt_tokens=model_cfg.max_prompt_tokens,
        prompts=prompts, seed=model_cfg.seed)
