"""Target models: one interface every backend implements, one small spec per model family.

A *target* is the model whose hidden states the draft learns from. Whatever runs it
(transformers here; vLLM is the other backend), it must:

- load from a local model directory;
- render a conversation with its chat template into token ids plus a loss mask
  (`frontend` + `factory.render.Renderer`);
- forward a batch and capture the three auxiliary layers and the last hidden state
  (`forward_capture`);
- report hidden size, layer count, default aux layer ids, vocab size and fingerprints
  for the manifest (`target_info`, `header`).

What differs between model families is data, not code: which transformers class loads
it, where its decoder layers and final norm live, which media it takes and how one
media item becomes placeholder tokens, and whether it uses 3-D (mRoPE) positions. That
is a `TargetSpec`; `SPECS` lists them and `spec_for` picks one by `model_type`.

Layer conventions (see FIELD_NOTES "Layer conventions"): aux id i is the residual stream
*entering* decoder layer i, which is HF `output_hidden_states[i]` and vLLM's numbering;
id L (the layer count) is the input of the final norm. The last hidden state is stored
*before* the final norm, as vLLM's `extract_hidden_states` returns it for id L; HF's own
`hidden_states[L]` is after the norm, so it is not what we capture. Both are taken with
forward pre-hooks on the decoder layers and on the final norm, so no other layer's
states are kept and no logits are computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from shared.hardware import resolve_model_dtype
from shared.manifest import DTYPES, DatasetHeader, TargetInfo, default_aux_layer_ids

if TYPE_CHECKING:
    import torch

log = logging.getLogger("specmill.factory.targets")

MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: see shared.hardware.resolve_model_dtype
AUX_LAYER_CONVENTION = "residual_entering_layer"
LAST_HIDDEN_STATE = "pre_norm"
# Files that decide how text (and media) become token ids; their bytes make the tokenizer
# fingerprint. The media preprocessor configs are in it because they decide how many
# placeholder tokens an image or a clip expands to.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "preprocessor_config.json",
                   "processor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class TargetError(ValueError):
    """A target model directory that cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------- media


@dataclass(kw_only=True, slots=True)
class EncodedMedia:
    """One preprocessed media item: the model inputs it contributes and its token count."""

    kind: str
    # Tensors whose first dimension stacks items: a batch concatenates them along dim 0 in
    # the order the placeholders appear, which is the order the model fills them in.
    tensors: dict[str, torch.Tensor]
    num_tokens: int


class ImageTooLarge(ValueError):
    """An image that declares more pixels than the factory decodes."""


def open_image(source: Any):
    """An image file (path or file object) decoded to RGB, refused (ImageTooLarge) before
    decoding when it declares more than PIL's MAX_IMAGE_PIXELS: a PNG of a few bytes can
    declare 60,000 x 60,000 pixels (a decompression bomb), 10 GiB once decoded."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL only warns between the limit and twice it; refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
        with im:
            width, height = im.size
            if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
                raise ImageTooLarge(f"the image declares {width} x {height} pixels, more than the "
                                    f"{Image.MAX_IMAGE_PIXELS} this factory decodes (a decompression bomb, or an "
                                    f"image to scale down first)")
            return im.convert("RGB")
    except Image.DecompressionBombError as e:  # Image.open refuses twice the limit itself
        raise ImageTooLarge(f"the image declares more pixels than this factory decodes ({e})") from None


def _load_image(value: Any):
    from PIL import Image
    import numpy as np

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (str, Path)):
        return open_image(value)
    if isinstance(value, np.ndarray) and value.ndim == 3 and value.dtype == np.uint8:
        return Image.fromarray(value).convert("RGB")
    raise ValueError(f"an image must be a PIL image, a file path or a uint8 [H, W, C] array, "
                     f"got {type(value).__name__}")


def _encode_qwen_vl_image(processor: Any, value: Any) -> EncodedMedia:
    out = processor(images=[_load_image(value)], return_tensors="pt")
    grid = out["image_grid_thw"]  # [1, 3]: temporal, height, width patches
    # The vision tower merges merge_size x merge_size patches into one LM token.
    num_tokens = int(grid.prod()) // processor.merge_size**2
    return EncodedMedia(kind="image", num_tokens=num_tokens,
                        tensors={"pixel_values": out["pixel_values"], "image_grid_thw": grid})


def _load_waveform(value: Any, sampling_rate: int):
    import numpy as np

    if isinstance(value, dict) and "array" in value:  # the Hugging Face `datasets` Audio layout
        if value.get("sampling_rate") != sampling_rate:
            raise ValueError(f"audio is sampled at {value.get('sampling_rate')} Hz; resample it to {sampling_rate} Hz")
        value = value["array"]
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.size == 0:
        raise ValueError(f"audio must be a non-empty 1-D waveform array at {sampling_rate} Hz "
                         f"(or {{'array', 'sampling_rate'}}), got {type(value).__name__}")
    return value.astype(np.float32)


def _encode_whisper_audio(processor: Any, value: Any) -> EncodedMedia:
    wav = _load_waveform(value, processor.sampling_rate)
    if wav.size > processor.n_samples:  # the extractor would silently cut it to 30 s
        raise ValueError(f"audio of {wav.size / processor.sampling_rate:.1f} s is longer than the "
                         f"{processor.n_samples / processor.sampling_rate:.0f} s the encoder takes; cut it into clips")
    # Qwen2-Audio's encoder takes exactly 30 s of mel frames; the mask says how many are real.
    out = processor([wav], sampling_rate=processor.sampling_rate, return_attention_mask=True,
                    padding="max_length", return_tensors="pt")
    frames = int(out["attention_mask"].sum())
    # Two stride-2 stages (conv2, then the average pool) between mel frames and LM tokens.
    num_tokens = (((frames - 1) // 2 + 1) - 2) // 2 + 1
    if num_tokens < 2:
        # One lone placeholder would send Qwen2-Audio down its legacy (unexpanded) merge path.
        raise ValueError(f"audio of {wav.size} samples gives {num_tokens} audio token; at least 2 are needed "
                         f"(about 50 ms at {processor.sampling_rate} Hz)")
    return EncodedMedia(kind="audio", num_tokens=num_tokens,
                        tensors={"input_features": out["input_features"],
                                 "feature_attention_mask": out["attention_mask"].long()})


@dataclass(frozen=True, kw_only=True, slots=True)
class MediaSpec:
    """How one media kind enters a family's models."""

    kind: str  # the content part type in messages: {"type": kind, kind: value}
    placeholder: str  # the token the chat template writes once per item and the model repeats
    processor: str  # the transformers Auto class that preprocesses it, loaded from the model directory
    encode: Callable[[Any, Any], EncodedMedia]  # (processor, value) -> model inputs + token count
    token_type_id: int = 0  # its value in mm_token_type_ids (mRoPE models: image = 1)


QWEN_VL_IMAGE = MediaSpec(kind="image", placeholder="<|image_pad|>", processor="AutoImageProcessor",
                          encode=_encode_qwen_vl_image, token_type_id=1)
QWEN_AUDIO = MediaSpec(kind="audio", placeholder="<|AUDIO|>", processor="AutoFeatureExtractor",
                       encode=_encode_whisper_audio)


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True, kw_only=True, slots=True)
class TargetSpec:
    """What differs between model families, as data."""

    family: str
    model_types: tuple[str, ...]  # config.json `model_type` values this spec serves
    model_class: str = "AutoModelForCausalLM"  # transformers class that loads the checkpoint
    base_path: str = "model"  # the model without its lm_head: what a capture forward calls
    decoder_path: str = "model"  # the module holding `.layers` and the final `.norm`
    text_config: str | None = None  # attribute of the config holding the LM's sizes, if nested
    media: tuple[MediaSpec, ...] = ()
    mrope: bool = False  # 3-D positions from `base.get_rope_index`


SPECS: tuple[TargetSpec, ...] = (
    TargetSpec(family="llama", model_types=("llama",)),
    TargetSpec(family="mistral", model_types=("mistral",)),
    TargetSpec(family="qwen2", model_types=("qwen2",)),
    TargetSpec(family="qwen3", model_types=("qwen3",)),
    # Gemma 2/3 cap their logits (config.final_logit_softcapping); `HFTarget.logits` applies it.
    TargetSpec(family="gemma", model_types=("gemma", "gemma2", "gemma3_text")),
    TargetSpec(family="qwen2_vl", model_types=("qwen2_vl", "qwen2_5_vl"), model_class="AutoModelForImageTextToText",
               decoder_path="model.language_model", text_config="text_config", media=(QWEN_VL_IMAGE,), mrope=True),
    TargetSpec(family="qwen2_audio", model_types=("qwen2_audio",), model_class="Qwen2AudioForConditionalGeneration",
               decoder_path="model.language_model", text_config="text_config", media=(QWEN_AUDIO,)),
)


def spec_for(model_type: str, *, family: str | None = None) -> TargetSpec:
    """The spec serving `model_type` (or the one named `family`, to force a choice)."""
    if family is not None:
        by_family = {s.family: s for s in SPECS}
        if family not in by_family:
            raise TargetError(f"family {family!r} is not known; choose one of {sorted(by_family)}")
        return by_family[family]
    for spec in SPECS:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in SPECS for t in s.model_types)
    raise TargetError(f"no target spec serves model_type {model_type!r} (known: {', '.join(known)}); add a "
                      f"TargetSpec to factory.targets.SPECS, or set family= if it is built like a known one")


# --------------------------------------------------------------------------- config


@dataclass(kw_only=True, slots=True)
class TargetConfig:
    model: Path  # a local transformers model directory (config.json, weights, tokenizer)
    name: str | None = None  # recorded in the manifest; None: the directory's name
    dtype: str = "auto"  # compute dtype of the forward pass; auto: bfloat16 where native, else float32
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    family: str | None = None  # force a spec instead of choosing by config.json model_type
    # Token ids that end an assistant turn; None: eos ids of generation_config.json and the tokenizer.
    end_of_turn_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.model = Path(self.model).expanduser()
        if not (self.model / "config.json").is_file():
            raise ValueError(f"model must be a local model directory with a config.json; {self.model} has none "
                             f"(prepare the default with `specmill model prepare-default`)")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        if self.name is None:
            self.name = self.model.name
        if self.end_of_turn_ids is not None:
            self.end_of_turn_ids = tuple(int(i) for i in self.end_of_turn_ids)
            if not self.end_of_turn_ids:
                raise ValueError("end_of_turn_ids must name at least one token id, or be None for the eos ids")


# --------------------------------------------------------------------------- frontend


@dataclass(kw_only=True, slots=True)
class Frontend:
    """Everything that turns a conversation into model inputs, without the model's weights.

    Cheap to load, so rendering can run where the model does not."""

    spec: TargetSpec
    tokenizer: Any
    chat_template: str
    end_of_turn_ids: frozenset[int]
    processors: dict[str, Any] = field(default_factory=dict)  # media kind -> loaded preprocessor
    placeholder_ids: dict[str, int] = field(default_factory=dict)  # media kind -> placeholder token id

    @classmethod
    def load(cls, config: TargetConfig, spec: TargetSpec | None = None) -> Frontend:
        import transformers

        spec = spec or spec_for(read_json(config.model / "config.json").get("model_type", ""), family=config.family)
        tokenizer = transformers.AutoTokenizer.from_pretrained(config.model)
        template = _chat_template(config.model, tokenizer)
        eot = config.end_of_turn_ids or _eos_ids(config.model, tokenizer)
        processors, placeholders = {}, {}
        for media in spec.media:
            processors[media.kind] = getattr(transformers, media.processor).from_pretrained(config.model)
            token_id = tokenizer.convert_tokens_to_ids(media.placeholder)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise TargetError(f"{config.model}: the tokenizer has no {media.placeholder} token, which "
                                  f"{spec.family} models use for {media.kind} placeholders")
            placeholders[media.kind] = token_id
        return cls(spec=spec, tokenizer=tokenizer, chat_template=template, end_of_turn_ids=frozenset(eot),
                   processors=processors, placeholder_ids=placeholders)

    def encode(self, kind: str, value: Any) -> EncodedMedia:
        media = next(m for m in self.spec.media if m.kind == kind)
        return media.encode(self.processors[kind], value)

    @property
    def pad_id(self) -> int:
        # Right padding is never attended to by real tokens, so any valid id will do.
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else min(self.end_of_turn_ids)


def _chat_template(model_dir: Path, tokenizer: Any) -> str:
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        return tokenizer.chat_template
    for name in CHAT_TEMPLATE_FILES:  # multimodal checkpoints keep it with the processor
        path = model_dir / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    raise TargetError(f"{model_dir}: no chat template (tokenizer_config.json, {' or '.join(CHAT_TEMPLATE_FILES)}); "
                      f"rendering conversations needs the template the target is served with")


def _eos_ids(model_dir: Path, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = read_json(gen).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise TargetError(f"{model_dir}: no eos token in generation_config.json or the tokenizer; set "
                          f"TargetConfig.end_of_turn_ids to the token(s) that end an assistant turn")
    return ids


# --------------------------------------------------------------------------- the interface


class Target(Protocol):
    """What the factory needs from a target, whichever engine runs it."""

    spec: TargetSpec
    frontend: Frontend
    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int

    @property
    def default_aux_layer_ids(self) -> tuple[int, int, int]: ...

    def target_info(self) -> TargetInfo: ...

    def header(self, *, aux_layer_ids: Sequence[int] | None = None, dtype: str = "bfloat16") -> DatasetHeader: ...

    def position_ids(self, input_ids: torch.Tensor, media: Sequence[EncodedMedia],
                     spans: Sequence[tuple[str, int, int]]) -> torch.Tensor | None: ...

    def forward_capture(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        media: dict[str, torch.Tensor], layer_ids: Sequence[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]: ...


# --------------------------------------------------------------------------- transformers backend


class TargetMetadata:
    """What every backend reports for the manifest, from its `name`, `num_layers`,
    `hidden_size`, `vocab_size` and `_fingerprints`."""

    @property
    def default_aux_layer_ids(self) -> tuple[int, int, int]:
        return default_aux_layer_ids(self.num_layers)

    def target_info(self) -> TargetInfo:
        return TargetInfo(name=self.name, vocab_size=self.vocab_size, num_hidden_layers=self.num_layers,
                          **self._fingerprints)

    def header(self, *, aux_layer_ids: Sequence[int] | None = None, dtype: str = "bfloat16") -> DatasetHeader:
        ids = self.check_aux_layer_ids(aux_layer_ids)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        return DatasetHeader(target=self.target_info(), hidden_size=self.hidden_size, dtype=dtype,
                             aux_layer_ids=ids, aux_layer_convention=AUX_LAYER_CONVENTION,
                             last_hidden_state=LAST_HIDDEN_STATE)

    def check_aux_layer_ids(self, ids: Sequence[int] | None) -> tuple[int, int, int]:
        if ids is None:
            ids = self.default_aux_layer_ids
        ids = tuple(int(i) for i in ids)
        if len(ids) != 3 or not all(0 <= i <= self.num_layers for i in ids):
            raise ValueError(f"aux_layer_ids must be 3 ids in [0, {self.num_layers}] ({self.name} has "
                             f"{self.num_layers} layers; id i is the residual entering layer i, {self.num_layers} "
                             f"the final norm's input), got {ids}")
        if len(set(ids)) < 3:
            log.warning("aux_layer_ids %s repeat a layer; with %d layers pick three distinct ids", ids, self.num_layers)
        return ids  # type: ignore[return-value]


class TargetFromConfig(TargetMetadata):
    """A target known from its config.json, tokenizer and chat template alone, without its
    weights: enough to render rows and to say what its shards will look like (a disk plan)."""

    def __init__(self, config: TargetConfig):
        raw = read_json(config.model / "config.json")
        self.spec = spec_for(raw.get("model_type", ""), family=config.family)
        text = raw.get(self.spec.text_config, {}) if self.spec.text_config else raw
        try:
            self.hidden_size, self.num_layers, self.vocab_size = (
                int(text[k]) for k in ("hidden_size", "num_hidden_layers", "vocab_size"))
        except KeyError as e:
            where = f"config.json {self.spec.text_config}" if self.spec.text_config else "config.json"
            raise TargetError(f"{config.model}: {where} has no {e.args[0]}") from None
        self.frontend = Frontend.load(config, self.spec)
        self.name = config.name
        self._fingerprints = target_fingerprints(config.model, self.frontend.chat_template)


class HFTarget(TargetMetadata):
    """A target run by transformers in this process."""

    def __init__(self, config: TargetConfig):
        import torch
        import transformers

        raw = read_json(config.model / "config.json")
        self.config = config
        self.spec = spec_for(raw.get("model_type", ""), family=config.family)
        self.frontend = Frontend.load(config, self.spec)
        self.name = config.name
        dtype = resolve_model_dtype(config.dtype, config.device)
        self.dtype = getattr(torch, dtype)
        model_class = getattr(transformers, self.spec.model_class)
        log.info("loading %s (%s, %s%s) from %s", self.name, self.spec.family, dtype,
                 " for dtype auto on " + config.device if config.dtype == "auto" else "", config.model)
        self.model = model_class.from_pretrained(config.model, dtype=self.dtype,
                                                 attn_implementation=config.attn_implementation)
        self.model.to(config.device).eval()
        text = getattr(self.model.config, self.spec.text_config) if self.spec.text_config else self.model.config
        self.hidden_size = int(text.hidden_size)
        self.num_layers = int(text.num_hidden_layers)
        self.vocab_size = int(text.vocab_size)
        self.base = _attr(self.model, self.spec.base_path)
        decoder = _attr(self.model, self.spec.decoder_path)
        self.layers, self.norm = decoder.layers, decoder.norm
        if len(self.layers) != self.num_layers:
            raise TargetError(f"{config.model}: {len(self.layers)} decoder layers at {self.spec.decoder_path}.layers "
                              f"but the config says {self.num_layers}")
        self._text_config = text
        for kind, token_id in self.frontend.placeholder_ids.items():
            expected = getattr(self.model.config, f"{kind}_token_id", token_id)
            if expected != token_id:
                raise TargetError(f"{config.model}: the tokenizer's {kind} placeholder is id {token_id} but the "
                                  f"model's config.{kind}_token_id is {expected}; they come from different checkpoints")
        self._fingerprints = target_fingerprints(config.model, self.frontend.chat_template)

    @classmethod
    def load(cls, config: TargetConfig) -> HFTarget:
        return cls(config)

    def position_ids(self, input_ids: torch.Tensor, media: Sequence[EncodedMedia],
                     spans: Sequence[tuple[str, int, int]]) -> torch.Tensor | None:
        """[3, T] mRoPE positions of one unpadded row, or None for 1-D rotary models."""
        if not self.spec.mrope:
            return None
        import torch

        kinds = {m.kind: m.token_type_id for m in self.spec.media}
        token_types = torch.zeros_like(input_ids, dtype=torch.int32)
        for kind, start, end in spans:
            token_types[start:end] = kinds[kind]
        grids = [m.tensors["image_grid_thw"] for m in media if m.kind == "image"]
        positions, _ = self.base.get_rope_index(
            input_ids[None].to(self.model.device), token_types[None].to(self.model.device),
            image_grid_thw=torch.cat(grids).to(self.model.device) if grids else None)
        return positions[:, 0].cpu()

    def forward_capture(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        media: dict[str, torch.Tensor], layer_ids: Sequence[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a right-padded batch; return aux [B, T, 3, H] and pre-norm last [B, T, H] (model dtype)."""
        import torch

        device = self.model.device
        with torch.inference_mode(), self._capturing(layer_ids) as seen:
            self.base(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                      position_ids=position_ids.to(device), use_cache=False,
                      **{k: v.to(device) for k, v in media.items()})
        missing = [i for i in (*layer_ids, self.num_layers) if i not in seen]
        if missing:
            raise TargetError(f"{self.name}: the forward pass never reached layer ids {missing}; the spec's "
                              f"decoder_path {self.spec.decoder_path!r} may not be the module the model runs")
        aux = torch.stack([seen[i] for i in layer_ids], dim=2)
        return aux, seen[self.num_layers]

    def logits(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """The target's logits from a pre-norm last hidden state: lm_head(norm(h)), with the
        final soft-capping some families (Gemma 2/3) apply."""
        import torch

        with torch.inference_mode():
            logits = self.model.get_output_embeddings()(self.norm(last_hidden_state.to(self.dtype)))
            cap = getattr(self._text_config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
        return logits

    @contextmanager
    def _capturing(self, layer_ids: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Forward pre-hooks that keep the residual entering each wanted layer (id L: the norm)."""
        seen: dict[int, torch.Tensor] = {}

        def keep(i: int):
            def hook(_module, args, kwargs):
                # A copy: a later layer updating the residual in place must not rewrite what we kept.
                seen[i] = (args[0] if args else kwargs["hidden_states"]).clone()
            return hook

        modules = {i: self.layers[i] for i in set(layer_ids) if i < self.num_layers}
        modules[self.num_layers] = self.norm
        handles = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in modules.items()]
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()


# --------------------------------------------------------------------------- helpers


def _attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def read_json(path: Path) -> dict[str, Any]:
    """A model directory's JSON file (config.json, generation_config.json); TargetError names it."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TargetError(f"{path}: cannot read it as JSON ({e})") from e


def target_fingerprints(model_dir: Path, chat_template: str) -> dict[str, str]:
    """The TargetInfo digests of a model directory (config, tokenizer files, chat template), the
    same for every capture backend so their data sets agree on which target they came from."""
    tok = hashlib.sha256()
    found = [n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    if not found:
        raise TargetError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    for name in found:  # names too, so moving bytes between files changes the digest
        tok.update(name.encode() + b"\0" + (model_dir / name).read_bytes() + b"\0")
    return {
        "config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
        "tokenizer_sha256": tok.hexdigest(),
        "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest(),
    }
