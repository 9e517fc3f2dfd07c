"""Tiny offline stand-ins for a chat LLM: a random Llama and a word-level tokenizer with a ChatML template."""

import torch

VOCAB_TEXT = ("hello there how are you today i am fine thank and what is the capital of france paris cat sat on "
              "mat do like pizza or pasta with cheese tell me about weather it sunny warm be brief . a one word "
              "answer in system user assistant")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(VOCAB_TEXT.split())))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab: int, tie: bool = True, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg).eval()


_FOLDER = {}


def tiny_llm_folder() -> str:
    """A tiny random Llama and the word-level ChatML tokenizer saved as a local model folder (once per
    process): what ``model.backbone`` takes for an offline causal LM in end-to-end tests."""
    if "path" not in _FOLDER:
        import tempfile

        tok = tiny_tokenizer()
        dest = tempfile.mkdtemp(prefix="fedpers-tiny-llama-")
        tiny_llama(len(tok)).save_pretrained(dest)
        tok.save_pretrained(dest)
        _FOLDER["path"] = dest
    return _FOLDER["path"]


def llm_tiny_overrides(out_dir, adapter: str = "lora", **extra) -> list[str]:
    """A tiny chitchat federation on the tiny Llama: 4 speakers, 8 training replies each, short budgets."""
    from tests.conftest import tiny_overrides

    llm = {
        "model.modality": "llm",
        "model.backbone": tiny_llm_folder(),
        "model.adapter": adapter,
        "model.num_prompts": 4,
        "model.lora.r": 4,
        "model.llm.context_tokens": 40,
        "model.llm.target_tokens": 12,
        "model.llm.generations": 1,
        "model.llm.max_new_tokens": 4,
        "data.dataset": "chitchat",
        "data.partitioner.name": "natural_id",
        "data.partitioner.id_column": "user",
        "data.max_train_per_client": 8,
        "run.num_clients": 4,
        "run.clients_per_round": 4,
        "client.batch_size": 4,
        "client.lr": 0.01,
    }
    llm.update(extra)
    return tiny_overrides(out_dir, **llm)


# ---- a tiny PeftCausalLM and its inputs, shared by the llm-modality test files ----------------------------
SYSTEM = "be brief ."
ADAPTERS = ("prompt", "prefix", "lora")
EXAMPLES = [
    {"context": [{"role": "user", "content": "hello there how are you today"},
                 {"role": "assistant", "content": "i am fine thank you"},
                 {"role": "user", "content": "what is the capital of france"}],
     "target": "paris is the capital of france"},
    {"context": [{"role": "user", "content": "tell me about the weather"}], "target": "it is sunny"},
    {"context": [{"role": "user", "content": "do you like pizza or pasta"}], "target": "i like pizza with cheese"},
]


def tiny_model(adapter: str, context_tokens: int = 40, target_tokens: int = 8, layers: int = 2, **kw):
    from fedpers.models.llm import PeftCausalLM

    tok = tiny_tokenizer()
    return PeftCausalLM(tiny_llama(len(tok), layers=layers), tok, adapter, num_prompts=3, r=4, alpha=8.0,
                        context_tokens=context_tokens, target_tokens=target_tokens, system_prompt=SYSTEM, **kw)


def random_tensors(m, seed: int = 0, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Non-trivial client tensors (LoRA B is zero at init, which would hide the adapter)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in m.read_tensors().items()}
