"""Tiny seeded models and data for tests and examples.

Each ``tiny_*`` builds a real ``transformers`` architecture shrunk to two
layers with random weights (seeded), so tests exercise the same module code as
the full models in well under a second. ``save_tiny_text_model`` writes one to
a folder with a word-level tokenizer, so the "local Hugging Face folder" path
is tested end to end without any download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

TEXT_ARCHS = ("bert", "gpt2", "llama", "qwen2", "mistral")
VOCAB_WORDS = ("good great fine bad awful movie film plot actor story boring fun dull superb weak strong "
               "the a and of it was is very not").split()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_config(arch: str, layers: int = 2, vocab: int = 64):
    """A two-layer random config of ``arch`` (hidden 32, 4 heads)."""
    from transformers import (BertConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config,
                              ViTConfig)
    common = dict(vocab_size=vocab)
    if arch == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=3, **common)
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
        return cls(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=64, **common)
    if arch == "vit":
        return ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                         image_size=16, patch_size=4, num_channels=3)
    raise ValueError(f"unknown tiny arch {arch!r}")


def tiny_hf_model(arch: str, layers: int = 2, seed: int = 0, head: bool = False, num_labels: int = 2):
    """A seeded random HF model; ``head=True`` adds a sequence/image classification head."""
    from transformers import AutoModel, AutoModelForImageClassification, AutoModelForSequenceClassification
    _seed(seed)
    cfg = tiny_config(arch, layers)
    if head:
        cfg.num_labels = num_labels
        if arch in ("gpt2", "llama", "qwen2", "mistral"):
            cfg.pad_token_id = 0
        cls = AutoModelForImageClassification if arch == "vit" else AutoModelForSequenceClassification
        model = cls.from_config(cfg)
    else:
        model = AutoModel.from_config(cfg)
    return model.eval()


def tiny_tokenizer():
    """A word-level fast tokenizer over :data:`VOCAB_WORDS` with [PAD]/[UNK]/[CLS]/[SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *VOCAB_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                               ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def save_tiny_text_model(path, arch: str = "bert", seed: int = 0, head: bool = False) -> Path:
    """Write a tiny model + tokenizer to ``path`` as a Hugging Face folder."""
    path = Path(path)
    model = tiny_hf_model(arch, seed=seed, head=head)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_sentences(n: int = 40, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` short sentences of varying length with a binary label (positive words -> 1)."""
    rng = np.random.default_rng(seed)
    pos, neg = ["good", "great", "fun", "superb", "strong"], ["bad", "awful", "boring", "dull", "weak"]
    filler = ["the", "movie", "film", "plot", "actor", "story", "was", "is", "very", "and", "of", "it"]
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = list(rng.choice(filler, size=int(rng.integers(1, 9))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(pos if y else neg)))
        texts.append(" ".join(words))
        labels.append(y)
    return texts, np.array(labels)


def tiny_text_dataset(n: int = 40, seed: int = 0):
    from .data import Dataset
    texts, labels = tiny_sentences(n, seed)
    return Dataset("tiny-text", "text", texts, labels, ["neg", "pos"], np.arange(n).astype(str), source="testing")


def tiny_image_dataset(n: int = 40, size: int = 16, seed: int = 0, classes: int = 2):
    """Images (n, size, size) uint8 whose class sets which half is bright."""
    from .data import Dataset
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 80, size=(n, size, size)).astype(np.uint8)
    for i in range(n):
        x[i, :, y[i] * size // classes:(y[i] + 1) * size // classes] += 150
    return Dataset("tiny-images", "image", x, y, [str(c) for c in range(classes)], np.arange(n).astype(str),
                   source="testing")


class TinyResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN with a residual when shapes match (like an MBConv)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return x + y if self.skip else y


class TinyCNN(nn.Module):
    """stem -> 4 residual blocks (one downsampling) -> pool -> fc."""

    def __init__(self, channels: int = 8, num_classes: int = 2, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, 1, 1), nn.ReLU())
        self.blocks = nn.ModuleList([TinyResBlock(channels, channels), TinyResBlock(channels, 2 * channels, 2),
                                     TinyResBlock(2 * channels, 2 * channels),
                                     TinyResBlock(2 * channels, 2 * channels)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * channels, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.fc(self.pool(x).flatten(1))


def tiny_cnn(seed: int = 0, **kw) -> TinyCNN:
    """Factory for ``module:factory`` tests: ``lamina.testing:tiny_cnn``."""
    _seed(seed)
    return TinyCNN(**kw).eval()


class NoStack(nn.Module):
    """A model with no repeated block list (discovery must fail helpfully)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    def forward(self, x):
        return self.body(self.b(self.a(x)))


def no_stack() -> NoStack:
    _seed(0)
    return NoStack().eval()


class _NaNLinear(nn.Linear):
    """A linear layer that, when ``poison`` is set, turns row 1 of its output into NaN."""

    poison = False

    def forward(self, x):
        y = super().forward(x)
        if self.poison:
            y = y.clone()
            y[1] = float("nan")
        return y


class NaNModel(nn.Module):
    """Two blocks; the second emits NaN for sample 1 (for the NaN/inf error test)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_NaNLinear(4, 4), _NaNLinear(4, 4)])
        self.layers[1].poison = True

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def nan_model() -> NaNModel:
    _seed(0)
    return NaNModel().eval()


class _SlowCNN(TinyCNN):
    def forward(self, x):
        import time
        time.sleep(0.15)  # long enough for a test to kill the process mid-capture
        return super().forward(x)


def slow_tiny_cnn(seed: int = 0) -> TinyCNN:
    """``tiny_cnn`` with the same weights that sleeps 0.15 s per batch."""
    _seed(seed)
    return _SlowCNN().eval()


def tiny_causal_lm(arch: str = "llama", layers: int = 2, seed: int = 0):
    """A seeded random ``*ForCausalLM`` (vocabulary 64: the tiny tokenizer's ids fit)."""
    from transformers import AutoModelForCausalLM
    _seed(seed)
    cfg = tiny_config(arch, layers)
    cfg.pad_token_id = 0
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_tiny_causal_lm(path, arch: str = "llama", layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny causal LM + the word-level tokenizer to ``path`` as a Hugging Face folder."""
    path = Path(path)
    tiny_causal_lm(arch, layers, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_tiny_gguf(path, seed: int = 0):
    """Write a 2-block random Llama as a float32 GGUF file (llama.cpp's tensor names and q/k row order).

    Returns the ``LlamaForCausalLM`` it was written from, so a test can check
    that reading the file back gives exactly its state dict.
    """
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    _seed(seed)
    vocab, heads, kv = 64, 4, 2
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(48)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(32 // heads)
    w.add_vocab_size(vocab)
    toks = [b"<unk>", b"<s>", b"</s>"] + [bytes([97 + i % 26]) * (1 + i // 26) for i in range(vocab - 3)]
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def perm(x, nh):  # llama.cpp interleaves the rotary halves of q and k rows; readers undo it
        return x.reshape(nh, 2, x.shape[0] // nh // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", perm(sd[p + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", perm(sd[p + "self_attn.k_proj.weight"], kv))
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
