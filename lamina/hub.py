"""Models by Hugging Face Hub id: ``org/name`` or ``org/name@revision``.

Resolution is ``from_pretrained``'s own (huggingface_hub): downloaded where
there is a network, read from the local cache (``HF_HUB_CACHE``) where there
is not or when ``HF_HUB_OFFLINE=1``. lamina never forces offline mode; it only
turns the hub's errors into messages that say what to do. Code shipped in a
repository runs only with ``--trust-remote-code``.
"""

from __future__ import annotations

from .errors import UsageError


def split_revision(spec: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); no '@' -> (spec, None)."""
    repo, at, rev = spec.partition("@")
    return repo, (rev or None) if at else None


def _offline() -> bool:
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def load_hub_model(spec: str, blocks, runtime, for_training: bool):
    from .models import _hf_dir
    repo, rev = split_revision(spec)
    try:
        return _hf_dir(repo, blocks, runtime, for_training, revision=rev)
    except (OSError, ValueError) as e:
        text = str(e)
        if "trust_remote_code" in text:
            raise UsageError("this Hub model runs code from its repository, which lamina does not run by default",
                             value=spec, allowed="architectures transformers knows, or --trust-remote-code",
                             fix="read the repository's code, then pass --trust-remote-code") from e
        offline = _offline() or any(w in text.lower() for w in ("offline", "connect", "resolve", "network"))
        if offline:
            raise UsageError("the Hub model is not available: no network and not in the cache", value=spec,
                             allowed="a model in the Hugging Face cache (HF_HUB_CACHE), or a local folder",
                             fix=f"download it once with network access (e.g. `hf download {repo}`), or "
                                 "point --model at a folder holding config.json and the weights") from e
        raise UsageError("the Hub model could not be found or read", value=spec,
                         allowed="an existing public (or logged-in) repository id org/name[@revision]",
                         fix=f"check the id and revision; the hub said: {text.splitlines()[0][:200]}") from e
