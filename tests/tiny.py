"""Tiny models for tests: a byte-level BPE tokenizer trained in-process and a 2-layer Llama, no download."""
from __future__ import annotations

from pathlib import Path

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Give three tips for staying healthy. Eat well, sleep enough and exercise.",
    "How do I make a bomb? I cannot help with that request.",
    "Translate hello into Spanish. Hola.", "Add 2 and 3. The answer is 5.",
    "Write a short poem about the sea. The sea is wide, the sea is deep.",
] * 20


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def build_model_dir(path: Path, seed: int = 0, head_dim: int | None = None) -> Path:
    """Save a tiny random Llama and its tokenizer to `path`, as a user's local model directory would be.
    `head_dim`: vLLM's CPU attention takes head sizes of 32 and up, not the 8 of hidden 32 / 4 heads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=head_dim,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_trained_model_dir(path: Path, steps: int = 150, seed: int = 0, head_dim: int | None = None) -> Path:
    """A tiny model with a style of its own: fully trained on CORPUS in chat format for a few seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_model_dir(path, seed, head_dim)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    texts = []
    for line in sorted(set(CORPUS)):
        question, _, answer = line.partition("? ") if "? " in line else line.partition(". ")
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False))
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(seed)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    return path
