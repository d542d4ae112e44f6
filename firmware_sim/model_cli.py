"""``firmware-sim model build OUT.onnx``: write a small ONNX classifier for tests and the demo.

The model is built at run time with the ``onnx`` package (:mod:`firmware_sim.testmodel`; nothing is
downloaded): input ``input`` float32 ``[N, 16]``, output ``scores`` float32 ``[N, 10]``. ``--size-mb``
makes a larger one with the same interface (for unlock and decryption timings). The same seed gives
the same bytes. The file is a test model, not a secret; publish it with ``fleet-server model publish``
or drive a fleet with ``firmware-sim fleet --model OUT.onnx``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError


def register(sub: Any) -> None:
    model = sub.add_parser("model", help="build a small ONNX model for tests and the demo")
    msub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p = msub.add_parser("build", help="write a test classifier (input float32[N,16] -> scores float32[N,10])")
    p.add_argument("out", type=Path, metavar="OUT.onnx")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    p.add_argument("--size-mb", type=int, default=0, metavar="MB",
                   help="about this many MB of weights (default: the small 3 KB model)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(handler=_cmd_build)


def _cmd_build(args: argparse.Namespace) -> int:
    if not 0 <= args.seed < 2**32:
        raise ConfigError("--seed: must be between 0 and 2^32-1")
    if not 0 <= args.size_mb <= 4096:
        raise ConfigError("--size-mb: must be between 0 and 4096")
    out: Path = args.out
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent} is not a folder")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists (use --force to overwrite)")
    from firmware_sim.testmodel import large_classifier, small_classifier

    data = large_classifier(args.size_mb, seed=args.seed) if args.size_mb else small_classifier(args.seed)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    print(f"{out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


__all__ = ["register"]
