"""`ms-temba convert-release SRC DST`: an official MS-Temba release `best_model.pth` -> this
project's model file (pipelines.bundle), so that `ms-temba predict` can use it.

The key mapping is ms_temba.convert's; this checks the file before anything unpickles it, and
writes the bundle.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from pipelines.tools.export import ExportError

# torch.save's legacy (non-zip) format starts with the pickled magic number 0x1950a86a20f9469cfc6c.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """ExportError saying what `path` is not, unless it looks like a torch.save file (a zip archive
    with a data.pkl, or the legacy format). Reads only the file's first bytes / zip directory."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"release checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ExportError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted download or copy?)")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if not any(name.endswith("/data.pkl") for name in names):
            raise ExportError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl among "
                              f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        return
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return
    if head[:1] == b"\x80":
        raise ExportError(f"{path} is a plain Python pickle, not a torch.save checkpoint; it was not loaded "
                          f"(unpickling an untrusted file can run code from it)")
    text = head.decode("utf-8", "replace")
    looks = "text" if text.isprintable() or text.strip().isprintable() else "binary data"
    raise ExportError(f"{path} is not a PyTorch checkpoint ({size} bytes of {looks}, starting {head[:24]!r})")


def convert_release(source: str | os.PathLike, destination: str | os.PathLike, class_names: list[str] | None = None,
                    extractor_metadata: dict | None = None, trust_pickle: bool = False):
    """Write the release checkpoint `source` as a pipelines.bundle model file at `destination`.

    The release does not record its features' extractor; `extractor_metadata` (shard metadata:
    backbone, fps, ...) may say it, otherwise the model file records only the feature dim and
    `ms-temba predict` asks for --extractor-config (or runs on existing shards with --features).
    """
    from ms_temba.convert import RELEASE_MODEL_NAME, ReleaseCheckpointError, load_release_checkpoint
    from pipelines.bundle import ModelBundle, save_bundle
    import dataclasses

    check_checkpoint_file(source)
    try:
        model = load_release_checkpoint(source, trust_pickle=trust_pickle)
    except ReleaseCheckpointError as error:
        message = str(error)
        if "weights_only" in message and "Unsupported global" not in message:
            # torch's text advises weights_only=False, i.e. running code from an untrusted file: not that.
            reason = message.split("WeightsUnpickler error:")[-1].strip().splitlines()
            reason = reason[0].strip() if reason and "weights_only" not in reason[0] else "unreadable pickle data"
            raise ExportError(f"{source} is not a PyTorch checkpoint that can be read safely ({reason}); it was not "
                              f"loaded any other way, as unpickling an untrusted file can run code from it") from None
        raise
    num_classes = model.config.num_classes
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ExportError(f"{len(class_names)} class names given for a checkpoint with {num_classes} classes")
    features = {**(extractor_metadata or {}), "dim": model.config.in_dim}
    bundle = ModelBundle(
        model_name=RELEASE_MODEL_NAME, model_config=dataclasses.asdict(model.config),
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, class_names=list(class_names),
        features=features, dataset=f"converted from {os.fspath(source)}", train_params={}, selected_epoch=0,
        val_map=math.nan, train_videos=[], val_videos=[])
    save_bundle(destination, bundle)
    return bundle


def convert_release_main(argv: list[str] | None = None) -> int:
    """`ms-temba convert-release SRC DST [--class-names FILE] [--trust-pickle]`."""
    from ms_temba.convert import ReleaseCheckpointError

    parser = argparse.ArgumentParser(prog="ms-temba convert-release",
                                     description="Convert an official MS-Temba release checkpoint (best_model.pth) "
                                                 "into this project's model file, for `ms-temba predict`.")
    parser.add_argument("source", help="the release checkpoint (.pth)")
    parser.add_argument("destination", help="the model file to write (e.g. models/release.pt)")
    parser.add_argument("--class-names", help="text file, one class name per line (line i = class i)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a checkpoint that pickles a whole module object (runs code from the file)")
    args = parser.parse_args(argv)
    try:
        names = None
        if args.class_names:
            names = [line.strip() for line in Path(args.class_names).read_text().splitlines() if line.strip()]
        bundle = convert_release(args.source, args.destination, names, trust_pickle=args.trust_pickle)
    except (ReleaseCheckpointError, ExportError, FileNotFoundError) as error:
        print(f"ms-temba convert-release: error: {error}", file=sys.stderr)
        return 2
    print(f"converted {args.source} -> {args.destination} ({bundle.model_config})")
    return 0
