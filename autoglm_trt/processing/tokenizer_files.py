"""Processing files of a random-weight checkpoint: tokenizer, chat template, preprocessor config.

Real AutoGLM-Phone-9B weights are not reachable from our machines, so `init-random` writes a
checkpoint in the real Hugging Face layout. The tokenizer written here is a real byte-level BPE
(trained in a few milliseconds on `bpe_corpus.txt`) whose special tokens sit at the real GLM-4 ids,
so every id the engine, the template and the image expansion use is the one of the real model.
Regular BPE tokens take ids 0..~1,600; ids between them and 151329 decode to nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

PRESETS = ("autoglm-phone-9b", "phone-9b", "glm-4.1v-9b-thinking", "tiny")

# (id, content, special). `special` is the Hugging Face flag: special tokens are dropped by
# decode(skip_special_tokens=True). The reasoning tags stay visible text, as the glm45 reasoning
# parsers of vLLM and SGLang find them in the decoded text.
# NOTE: ids 151345-151348 could not be confirmed from a stored copy of the GLM-4.1V-Thinking
# tokenizer; they follow <|video|> in order, which makes 151348 (an eos id of the real
# generation_config) the closing </answer>.
SPECIAL_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151329, "<|endoftext|>", True),
    (151330, "[MASK]", True),
    (151331, "[gMASK]", True),
    (151332, "[sMASK]", True),
    (151333, "<sop>", True),
    (151334, "<eop>", True),
    (151335, "<|system|>", True),
    (151336, "<|user|>", True),
    (151337, "<|assistant|>", True),
    (151338, "<|observation|>", True),
    (151339, "<|begin_of_image|>", True),
    (151340, "<|end_of_image|>", True),
    (151341, "<|begin_of_video|>", True),
    (151342, "<|end_of_video|>", True),
    (151343, "<|image|>", True),
    (151344, "<|video|>", True),
    (151345, "<think>", False),
    (151346, "</think>", False),
    (151347, "<answer>", False),
    (151348, "</answer>", False),
)
EOS_TOKEN_IDS = [151329, 151336, 151338, 151348]
PAD_TOKEN_ID = 151329
VOCAB_SIZE = 151552  # rows of the embedding table; every token id is below it

# GLM-4.1V-9B-Thinking chat template, as published (also reference/autoglm-phone-9b.md).
CHAT_TEMPLATE = """[gMASK]<sop>
{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- elif msg.role == 'user' %}
<|user|>{{ '\\n' }}

        {%- if msg.content is string %}
{{ msg.content }}
        {%- else %}
            {%- for item in msg.content %}
                {%- if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>
                {%- elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>
                {%- elif item.type == 'text' %}
{{ item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- elif msg.role == 'assistant' %}
        {%- if msg.metadata %}
<|assistant|>{{ msg.metadata }}
{{ msg.content }}
        {%- else %}
<|assistant|>
{{ msg.content }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Values of the published GLM-4.1V-9B-Thinking preprocessor_config.json. transformers' own class
# default for longest_edge is 28*28*15000 = 11,760,000; the checkpoint ships 28*28*12288.
PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": OPENAI_CLIP_MEAN,
    "image_processor_type": "Glm4vImageProcessor",
    "image_std": OPENAI_CLIP_STD,
    "merge_size": 2,
    "patch_size": 14,
    "processor_class": "Glm4vProcessor",
    "resample": 3,  # PIL bicubic
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 112 * 112, "longest_edge": 28 * 28 * 12288},
    "temporal_patch_size": 2,
}

# Pre-tokenizer split of the GLM-4 / cl100k family: contractions, letter runs with one leading
# non-letter, digit triples, punctuation runs, newlines, spaces.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CORPUS = Path(__file__).with_name("bpe_corpus.txt")
_MAX_VOCAB = 4096  # 256 byte symbols + at most ~3,800 merges


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE (deterministic, ~30 ms) and place the special tokens at their ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_MAX_VOCAB, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = _CORPUS.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines * 3, trainer)  # NOTE: x3 so single-use pairs still merge
    data = json.loads(tok.to_str())
    # NOTE: tokenizers ignores the ids listed under "added_tokens" unless the model vocab already
    # holds the token; putting them in the BPE vocab is what pins them to the GLM-4 ids.
    vocab = data["model"]["vocab"]
    assert max(vocab.values()) < SPECIAL_TOKENS[0][0]
    for token_id, content, _ in SPECIAL_TOKENS:
        vocab[content] = token_id
    data["added_tokens"] = [
        {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for token_id, content, special in SPECIAL_TOKENS
    ]
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def tokenizer_config() -> dict:
    added = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": s} for i, c, s in SPECIAL_TOKENS}
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for _, c, s in SPECIAL_TOKENS if s],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 65536,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "processor_class": "Glm4vProcessor",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def generation_config() -> dict:
    return {"_from_model_config": True, "eos_token_id": list(EOS_TOKEN_IDS), "pad_token_id": PAD_TOKEN_ID}


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_processing_files(out_dir: Path, preset: str = "autoglm-phone-9b") -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json.

    Also writes generation_config.json (eos ids) unless the directory already has one. Every
    preset gets the same files: the token ids and image geometry are those of the real model.
    Returns the paths written.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "tokenizer.json", out / "tokenizer_config.json", out / "chat_template.jinja",
               out / "preprocessor_config.json"]
    build_tokenizer().save(str(written[0]))
    _dump(written[1], tokenizer_config())
    written[2].write_text(CHAT_TEMPLATE, encoding="utf-8")
    _dump(written[3], PREPROCESSOR_CONFIG)
    gen = out / "generation_config.json"
    if not gen.exists():
        _dump(gen, generation_config())
        written.append(gen)
    return written
