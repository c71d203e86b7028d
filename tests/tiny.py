"""Tiny random causal LMs of several architectures, built from configs (no download), and batches for them."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 64


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny causal LM with random weights; the same (arch, seed) always gives the same weights."""
    with torch.random.fork_rng():  # building a model draws from the global RNG: keep the tests' RNG untouched
        torch.manual_seed(seed)
        if arch == "llama":
            cfg = LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            )
            m = LlamaForCausalLM(cfg)
        elif arch == "gpt2":  # tied wte / lm_head
            cfg = GPT2Config(
                vocab_size=VOCAB,
                n_embd=16,
                n_layer=2,
                n_head=2,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
            m = GPT2LMHeadModel(cfg)
        elif arch == "opt":
            cfg = OPTConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                ffn_dim=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                word_embed_proj_dim=16,
                max_position_embeddings=64,
                dropout=0.0,
            )
            m = OPTForCausalLM(cfg)
        else:
            raise ValueError(arch)
    return m.to(dtype).eval()


ARCHS = ["llama", "gpt2", "opt"]


def tiny_batch(seed: int = 0, batch: int = 4, seq: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def tiny_tokenizer(texts: list[str], vocab_size: int = 300):
    """A real byte-level BPE tokenizer trained on ``texts`` in well under a second (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def save_tiny_model(folder, texts: list[str], seed: int = 0, positions: int = 128) -> str:
    """A tiny random Llama with a BPE tokenizer trained on ``texts``, saved as a Hugging Face folder."""
    tok = tiny_tokenizer(texts)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=positions,
            tie_word_embeddings=True,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
        )
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
