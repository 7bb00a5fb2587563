"""Build a tiny Qwen2-VL checkpoint with random weights, offline.

Run it with the engine's virtual environment, the ``.venv-vllm`` that
``tests/engine/setup_venv.sh`` builds (it has transformers, tokenizers and PIL;
the project's own ``.venv`` has no transformers):

    bash tests/engine/setup_venv.sh                      # once: makes .venv-vllm
    .venv-vllm/bin/python tests/engine/make_tiny_qwen2vl.py OUT_DIR

The model is small enough for vLLM's CPU build on a 2-core machine and real
enough to exercise everything the vLLM adapter touches: a vision tower whose
output length depends on the image size (dynamic resolution, 2x2 patch merge),
mrope positions, Qwen's chat template and special tokens.

- language model: hidden 128, 2 layers, 4 heads / 2 KV heads (head size 32,
  the least vLLM's CPU attention takes), mrope sections [4, 6, 6], vocab 512;
- vision tower: depth 2, width 64, 4 heads, output width 128 (the LM width);
- tokenizer: a byte-level BPE trained here (``tokenizers``) with Qwen's chat
  and vision special tokens;
- processor: at most 112x112 pixels, so an image is 4 (56x56) to 16 (112x112)
  embedding tokens.

Weights come from ``torch.manual_seed(SEED)``: the same directory every run.
"""

from __future__ import annotations

import json
import os
import sys

SEED = 1234
MAX_PIXELS = 112 * 112
MIN_PIXELS = 28 * 28
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
VOCAB = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Describe this image in one sentence.",
    "What is in the picture? A cat sits on a red chair next to a window.",
    "The quick brown fox jumps over the lazy dog.",
    "A photo of a mountain lake at sunrise, with pine trees and a small boat.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, colours: red green blue yellow black white.",
    "You are a helpful assistant. Answer briefly and precisely.",
]


def build_tokenizer(out: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 64, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build(out: str) -> None:
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    os.makedirs(out, exist_ok=True)
    tok = build_tokenizer(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    assert len(tok) <= VOCAB, len(tok)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 6, 6]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
                         torch_dtype="float32"),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False, torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        # random init at std 0.02 makes every logit nearly equal: widen it so that
        # greedy decoding depends strongly on the image (a swapped embedding shows)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(4.0)
    model.save_pretrained(out, safe_serialization=True)
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                            patch_size=14, merge_size=2, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                            patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                   "pad_token_id": ids["<|endoftext|>"], "do_sample": False}, f)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_tiny_qwen2vl.py OUT_DIR")
    build(sys.argv[1])
    print(sys.argv[1])
