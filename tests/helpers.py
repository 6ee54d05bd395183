"""Test helpers: tiny random-weight models for every family in melayer's adapter table, input builders,
tiny tokenizers, and an independent re-implementation of the paper's WeMask'd Qwen3 layer (a parity oracle)."""
from __future__ import annotations

import contextlib
import math

import torch

from melayer.adapters import ADAPTERS
from melayer.text import left_pad

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
# what a family's config needs beyond TINY (a family registered later needs an entry only if it needs more)
TINY_EXTRA = {
    "mistral": dict(sliding_window=None),
    "qwen3": dict(head_dim=16),
    "gemma": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=64),
    "gemma3_text": dict(head_dim=16, sliding_window=64),
}
FAMILIES = sorted(ADAPTERS)  # every test parametrised over FAMILIES covers the whole adapter table
PAD = 0


def tiny_config(family: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **TINY, **TINY_EXTRA.get(family, {}))


def make_tiny(family: str = "llama", seed: int = 0, dtype=torch.float32, **attn):
    """A deterministic random-weight CausalLM of the given family (eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=dtype, **attn)
    with torch.no_grad():  # random norms so that γ is informative (HF initialises them to 1 or 0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def random_seqs(lengths, seed: int = 0, vocab: int = 320) -> list[list[int]]:
    """Random token sequences of the given lengths (ids 3 and up: no pad/BOS/EOS)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def left_padded(lengths, seed: int = 0, vocab: int = 320) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of random sequences: (input_ids, attention_mask)."""
    return left_pad(random_seqs(lengths, seed, vocab), PAD)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` builds them: 0 at each sequence's first real token."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def has_hooks(model) -> bool:
    return any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


# -- tokenizers -------------------------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def byte_tokenizer():
    """ids 0 <pad>, 1 <s>, 2 </s>, then the 256 byte symbols: any text encodes, nothing exceeds id 258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.padding_side = "left"
    fast.chat_template = CHAT_TEMPLATE
    return fast


def word_tokenizer():
    """'w<i>' is token i (4 <= i < 320); 0 <pad>, 1 <s>, 2 </s>, 3 <unk>: outputs are easy to read back."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 320)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny(folder, family: str = "llama", tokenizer=None, **config_overrides):
    """A tiny model folder (word tokenizer unless given) that ``melayer.load_model`` opens; returns the model."""
    model = make_tiny(family)
    for k, v in config_overrides.items():
        setattr(model.config, k, v)
    model.save_pretrained(folder)
    (tokenizer or word_tokenizer()).save_pretrained(folder)
    return model


def tiny_chat_model(tokenizer, seed: int = 0):
    """make_tiny('llama') with its vocabulary grown to the tokenizer's (so TRL can tokenise chats)."""
    model = make_tiny("llama", seed=seed)
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, key)
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    return model


# -- the paper's WeMask, re-implemented independently ----------------------------------------------------------

def paper_decoder_layer_forward(layer, rate: float):
    """A Qwen3 decoder-layer forward with the paper's mask between input_layernorm and self-attention.

    Written from the paper's description (not from the official code or melayer): after the pre-attention
    RMSNorm, take index 0 of whatever chunk the layer sees, average |h[:, 0, :]| over the batch, and zero the
    top-k dims of h[:, 0, :] in every sequence. A plain forward override: no hooks, no melayer code.
    """

    def forward(hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        residual = hidden_states
        h = layer.input_layernorm(hidden_states)
        k = math.floor(rate * h.shape[-1])
        if k > 0:
            dims = torch.topk(h[:, 0, :].abs().mean(dim=0), k).indices
            h = h.clone()
            h[:, 0, dims] = 0.0
        attn, _ = layer.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                                  position_embeddings=position_embeddings, **kwargs)
        h = residual + attn
        return h + layer.mlp(layer.post_attention_layernorm(h))

    return forward


@contextlib.contextmanager
def paper_wemask(model, layers: list[int], rate: float):
    """Swap in the paper forward for the given 0-based blocks of a Qwen3 model; restore on exit."""
    assert model.config.model_type == "qwen3"
    blocks = [model.model.layers[i] for i in layers]
    for block in blocks:
        block.forward = paper_decoder_layer_forward(block, rate)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
