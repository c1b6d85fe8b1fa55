"""The tiny test model: a deterministic random-weight causal LM with a real byte-level BPE tokenizer
and a ChatML template, for tests (and smoke runs) that need no real weights.
"""

from __future__ import annotations

from pathlib import Path

from eslora.models.fetch import fix_for_older_readers


# ~400 words in the register of the tasks (chat, arithmetic, tags), so prompts tokenise sensibly.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model learns to answer short questions.
You are a helpful assistant. Answer the question in one short sentence.
What is the capital of France? The capital of France is Paris.
What is the capital of Italy? The capital of Italy is Rome.
Using the numbers 3, 5, 7 and 11, create an equation that equals 24.
You can use basic arithmetic operations (+, -, *, /) and each number can only be used once.
Show your work in <think> </think> tags and return the final answer in <answer> </answer> tags.
<think> 7 - 3 = 4, 4 * 5 = 20, 20 + 11 = 31. That is too big. Try 11 - 5 = 6 and 6 * 4 = 24. </think>
<answer> (11 - 5) * (7 - 3) </answer>
<answer> (25 - 1) / 2 + 12 </answer> <answer> 8 * 3 </answer> <answer> 100 - 76 </answer>
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 30 42 50 64 99 100 128 256
Evolution strategies perturb the weights with noise, score each member of the population and
move the mean in the direction of the members that scored well. The reward is a number; a
higher reward is better. Low rank adapters keep the number of trainable parameters small.
Please write a concise answer. Keep it brief and clear. Be short. Say it in a few words.
Hello! How can I help you today? I am fine, thank you. Good morning and good night.
The sun rises in the east and sets in the west. Water boils at one hundred degrees.
Cats and dogs are animals. Birds can fly and fish can swim in the river and the sea.
A list of words: apple, banana, cherry, orange, lemon, grape, melon, peach, pear, plum.
Colors: red, green, blue, yellow, black, white, purple, pink, brown, gray.
Numbers in words: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
The model reads the prompt, thinks step by step, and writes the answer at the end.
If the answer is correct the reward is one; if the format is right but the answer is wrong the
reward is a tenth; otherwise the reward is zero. The target length is twenty characters.
Question: what is 2 + 2? Answer: 4. Question: what is 6 * 7? Answer: 42.
Question: what is 10 - 3? Answer: 7. Question: what is 81 / 9? Answer: 9.
The user asks, the assistant answers, and the system sets the rules of the conversation.
def add(a, b): return a + b  # code is text too: print("hello world") if x > 0 else None
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June
July August September October November December spring summer autumn winter morning evening
"""

_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2.5 and SmolLM2 use, so prompts built for real models work on the tiny one.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_ARCHS = ("qwen2", "llama")

_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _train_tiny_tokenizer(vocab_size: int = 800):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Qwen2's exact pipeline: transformers 5 loads any qwen2-type folder with Qwen2Tokenizer, which
    # rebuilds this pipeline around our vocab, while transformers 4 (vLLM, SGLang) reads
    # tokenizer.json as is. The same pipeline in both keeps token ids identical across backends.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    # Training is deterministic for a fixed corpus (the BPE trainer breaks count ties by pair).
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, model_max_length=2048,
    )
    fast.chat_template = _TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(folder: str | Path, arch: str = "qwen2", seed: int = 0) -> Path:
    """Write a tiny random-weight causal LM with a real tokenizer to `folder`; return the folder.

    Dimensions follow the real models' shape (GQA, 7 projections per layer) at ~1.4M parameters;
    head_dim 64 because every attention kernel (vLLM CPU/GPU, SGLang, flash) supports it.
    Deterministic in `seed` (same files byte for byte); the global torch RNG is left untouched.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _train_tiny_tokenizer()
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    dims = dict(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=eos_id, pad_token_id=pad_id, rope_theta=10000.0,
    )
    if arch == "qwen2":
        config, cls = Qwen2Config(**dims), Qwen2ForCausalLM
    else:
        config, cls = LlamaConfig(**dims), LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=False,
    )
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    fix_for_older_readers(folder, 10000.0, "float32")
    return folder


