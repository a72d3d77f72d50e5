"""The ``lamina`` command: a thin layer over the Python API.

Each verb maps to one public function; its flags are generated from that
function's config dataclass. Errors lamina can explain are printed as their
message (never a traceback) with exit code 2 for usage errors and 1 for
failures at run time; Ctrl-C exits 130 with a hint to resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ._cliargs import add_config_args, config_from_args
from .errors import LaminaError

_VERBS: dict[str, tuple] = {}


def verb(name: str, help_: str):
    def deco(fn):
        _VERBS[name] = (fn, help_)
        return fn
    return deco


# ---------------------------------------------------------------- capture ----
def _capture_args(p):
    from .capture import CaptureConfig
    p.add_argument("--model", required=True, help="minilm, efficientnet-lite0, a Hugging Face model folder, "
                                                    "or module:factory returning an nn.Module")
    p.add_argument("--data", required=True, help="rotten-tomatoes, mnist-5k, digits, fashion-mnist, a "
                                                  "CSV/JSONL/Parquet file, an image folder, or a .npz with x and y")
    add_config_args(p, CaptureConfig)


@verb("capture", "record every block's pooled output for every sample into OUT/features")
def _capture(ns):
    from .capture import CaptureConfig, capture
    from .store import FeatureStore
    res = capture(ns.model, ns.data, config_from_args(CaptureConfig, ns))
    if res.rank == 0:
        _print_store(FeatureStore.open(res.store), ns)
    return 0


_capture.add_args = _capture_args


# ------------------------------------------------------------------- info ----
def _info_args(p):
    p.add_argument("run", help="a run folder (or its features/ folder)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--verify", action="store_true", help="re-check every file's checksum")


@verb("info", "summarize a run folder's feature store")
def _info(ns):
    from .store import FeatureStore
    store = FeatureStore.open(ns.run)
    if ns.verify:
        bad = store.verify()
        if bad:
            raise LaminaError("files in the store do not match their checksums", value=", ".join(bad),
                              fix="capture again with --overwrite")
    _print_store(store, ns)
    return 0


_info.add_args = _info_args


def _print_store(store, ns) -> None:
    s = store.summary()
    if getattr(ns, "json", False):
        print(json.dumps(s, indent=2))
        return
    print(f"store    {s['path']}")
    print(f"model    {s['model']}    data {s['data']}    samples {s['n']}    pooling {s['pooling']}    "
          f"dtype {s['dtype']}    {s['bytes'] / 1e6:.1f} MB")
    for name, shape in s["layers"].items():
        print(f"  {name:<12} {tuple(shape)}")


# ------------------------------------------------------------------- demo ----
def _demo_args(p):
    p.add_argument("--out", default="demo-run", help="run folder (default: demo-run)")
    p.add_argument("--limit", type=int, default=2000, help="sentences to use (default: 2000)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=True,
                   help="replace an earlier demo run in OUT (default: true)")


@verb("demo", "the main job on the bundled MiniLM and Rotten Tomatoes sentences")
def _demo(ns):
    from .capture import CaptureConfig, capture
    from .store import FeatureStore
    res = capture("minilm", "rotten-tomatoes", CaptureConfig(out=ns.out, limit=ns.limit, overwrite=ns.overwrite))
    _print_store(FeatureStore.open(res.store), ns)
    print(f"captured {res.n} samples x {len(res.layers)} layers in {res.seconds:.1f} s -> {res.store}")
    return 0


_demo.add_args = _demo_args


# ------------------------------------------------------------------- main ----
def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="lamina", description="Open a pretrained network layer by layer: "
                                     "capture, analyze, report, compress, distill, bench.")
    parser.add_argument("--version", action="version", version=f"lamina {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (fn, help_) in _VERBS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        fn.add_args(p)
        p.set_defaults(_fn=fn)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)  # argparse exits 2 on unknown flags itself
    if not getattr(ns, "_fn", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(ns._fn(ns) or 0)
    except LaminaError as e:
        print(f"lamina {ns.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"lamina {ns.verb}: interrupted; run the same command with --resume to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
