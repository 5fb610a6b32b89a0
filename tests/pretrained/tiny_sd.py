"""Tiny Stable-Diffusion-format fixtures, built offline: a CLIP-format BPE vocabulary and (with torch) a
random-init diffusers pipeline saved with ``save_pretrained``.

The vocabulary has the layout of CLIP's ``vocab.json``: the 256 byte symbols of GPT-2's byte-to-unicode
map, the same with ``</w>``, the merged symbols in merge order, then ``<|startoftext|>`` and
``<|endoftext|>``. Its merges are learned by plain BPE (Sennrich et al. 2016) on a small corpus.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import re

CORPUS = (
  "a photograph of an astronaut riding a horse on the moon; a painting of a red fox in the snow, "
  "trending on artstation. an oil painting of the city at night with stars. a cat and a dog "
  "sitting on the sofa, highly detailed, 4k photo. the quick brown fox jumps over the lazy dog. "
  "a watercolor landscape of mountains and rivers at sunset, soft light, portrait of a woman "
  "wearing a hat, digital art, sharp focus. it's a photo of the sea and the beach, they're happy"
)


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode map (Radford et al. 2019)."""
  bs = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs), strict=True))


def learn_clip_vocab(
  num_merges: int = 120, corpus: str = CORPUS
) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """A CLIP-layout vocabulary and merges learned by BPE on ``corpus`` (deterministic)."""
  byte_map = bytes_to_unicode()
  base = list(byte_map.values())
  vocab_list = base + [c + "</w>" for c in base]
  words = collections.Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", corpus.lower()))
  splits = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for w, n in words.items():
      s = splits[w]
      for a, b in itertools.pairwise(s):
        pairs[(a, b)] += n
    if not pairs:
      break
    best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
    merges.append(best)
    vocab_list.append(best[0] + best[1])
    for w in words:
      s, out, i = splits[w], [], 0
      while i < len(s):
        if i + 1 < len(s) and (s[i], s[i + 1]) == best:
          out.append(s[i] + s[i + 1])
          i += 2
        else:
          out.append(s[i])
          i += 1
      splits[w] = out
  vocab_list += ["<|startoftext|>", "<|endoftext|>"]
  return {t: i for i, t in enumerate(vocab_list)}, merges


def write_clip_tokenizer(path: str, *, model_max_length: int = 16, pad_token: str = "<|endoftext|>") -> dict:
  """Writes ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` in CLIP's format; returns the vocab."""
  vocab, merges = learn_clip_vocab()
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  config = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": model_max_length,
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": pad_token,
  }
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  return vocab


# Stable-Diffusion-shaped but tiny: 8x8 latents, 16x16 images, 16-token prompts.
UNET_CONFIG = {
  "sample_size": 8,
  "in_channels": 4,
  "out_channels": 4,
  "block_out_channels": (32, 64),
  "layers_per_block": 1,
  "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
  "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
  "cross_attention_dim": 32,
  "attention_head_dim": (2, 4),  # diffusers reads it as heads per level
  "norm_num_groups": 8,
}
VAE_CONFIG = {
  "sample_size": 16,
  "in_channels": 3,
  "out_channels": 3,
  "block_out_channels": (16, 32),
  "down_block_types": ("DownEncoderBlock2D",) * 2,
  "up_block_types": ("UpDecoderBlock2D",) * 2,
  "layers_per_block": 1,
  "latent_channels": 4,
  "norm_num_groups": 8,
}
SCHEDULER_CONFIG = {  # Stable Diffusion 1.x's, a PNDMScheduler config as in the real repositories
  "beta_start": 0.00085,
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "num_train_timesteps": 1000,
  "set_alpha_to_one": False,
  "skip_prk_steps": True,
  "steps_offset": 1,
  "clip_sample": False,
}
MAX_LENGTH = 16


def perturb(torch, model, seed: int, scale: float = 0.05):
  """Adds noise to every tensor, so that a mis-assigned or mis-transposed one cannot cancel out."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model.eval()


def build_tiny_pipeline(directory: str, seed: int = 0):
  """A random-init ``StableDiffusionPipeline`` and ``ControlNetModel``, saved with ``save_pretrained``.

  The scheduler is SD's PNDMScheduler config; the returned pipelines use ``DDIMScheduler.from_config`` of
  it, which is what diffjax samples with.

  Returns:
      ``(pipe, controlnet_pipe)``: the torch ``StableDiffusionPipeline`` saved at ``directory/pipeline`` and
      a ``StableDiffusionControlNetPipeline`` over the same components with the ControlNet saved at
      ``directory/controlnet``.
  """
  import diffusers
  import torch
  import transformers

  torch.manual_seed(seed)
  tok_dir = os.path.join(directory, "_tokenizer_source")
  vocab = write_clip_tokenizer(tok_dir, model_max_length=MAX_LENGTH)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
  text_config = transformers.CLIPTextConfig(
    vocab_size=len(vocab),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    bos_token_id=vocab["<|startoftext|>"],
    eos_token_id=vocab["<|endoftext|>"],
    pad_token_id=vocab["<|endoftext|>"],
  )
  pipe = diffusers.StableDiffusionPipeline(
    unet=perturb(torch, diffusers.UNet2DConditionModel(**UNET_CONFIG), seed + 1),
    vae=perturb(torch, diffusers.AutoencoderKL(**VAE_CONFIG), seed + 2),
    text_encoder=perturb(torch, transformers.CLIPTextModel(text_config), seed + 3),
    tokenizer=tokenizer,
    scheduler=diffusers.PNDMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "clip_sample"}),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  path = os.path.join(directory, "pipeline")
  pipe.save_pretrained(path)
  # The SD repositories' file verbatim (older diffusers wrote clip_sample into PNDM configs).
  with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w") as f:
    json.dump({"_class_name": "PNDMScheduler", "trained_betas": None, **SCHEDULER_CONFIG}, f)
  pipe.scheduler = diffusers.DDIMScheduler.from_pretrained(path, subfolder="scheduler")
  pipe.set_progress_bar_config(disable=True)
  # A ControlNet copied from the U-Net (diffusers' from_unet), then perturbed; its conditioning embedder
  # halves the image once, like the VAE.
  controlnet = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16))
  controlnet = perturb(torch, controlnet, seed + 4)
  controlnet.save_pretrained(os.path.join(directory, "controlnet"))
  cn_pipe = diffusers.StableDiffusionControlNetPipeline(
    **{k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")},
    controlnet=controlnet,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  cn_pipe.set_progress_bar_config(disable=True)
  return pipe, cn_pipe
