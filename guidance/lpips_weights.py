"""The LPIPS (AlexNet) weights folder: its layout and its light checks, no torch (guidance/lpips.py loads it).

A folder of the two published files, read as they are published:

    alexnet.pth   torchvision's ImageNet AlexNet state dict (torch hub caches it as alexnet-owt-7be5be79.pth);
                  only its ``features.*`` tensors are read
    alex.pth      the LPIPS v0.1 linear heads (the ``lpips`` package's ``lpips/weights/v0.1/alex.pth``)

Their tensor names and shapes are read from the checkpoints' pickles without torch (a restricted unpickler
that builds no tensor and imports nothing), so a job refuses a wrong file before any model loads.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

from guidance.checks import check_weights_readable

BACKBONE_FILE = "alexnet.pth"
HEADS_FILE = "alex.pth"
CHANNELS = (64, 192, 384, 256, 256)  # AlexNet's five ReLU outputs LPIPS compares
BACKBONE_SHAPES = {  # the convolutions of torchvision's ``alexnet().features`` before the last ReLU LPIPS reads
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
}
HEAD_SHAPES = {f"lin{layer}.model.1.weight": (1, width, 1, 1) for layer, width in enumerate(CHANNELS)}
LAYOUT = (f"a folder holding {BACKBONE_FILE} (torchvision's ImageNet AlexNet, torch hub's alexnet-owt-7be5be79.pth) "
          f"and {HEADS_FILE} (the LPIPS v0.1 linear heads, the lpips package's lpips/weights/v0.1/alex.pth)")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's pre-1.6 (non-zip) format starts with this pickled number
ITEM_BYTES = {"DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
              "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1}


class _Shapes(pickle.Unpickler):
    """Unpickles a torch state dict into {name: shape} (tensors become their sizes), noting each storage's bytes."""

    def __init__(self, stream):
        super().__init__(stream)
        self.storage_bytes: dict[str, int] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, *rest: tuple(size)
        if module == "torch" and name in ITEM_BYTES:
            return name
        raise pickle.UnpicklingError(f"holds {module}.{name}, not a plain state dict of tensors")

    def persistent_load(self, pid):
        _, kind, key, _, numel = pid[:5]  # ("storage", type, key, location, numel[, view])
        self.storage_bytes[str(key)] = ITEM_BYTES[kind] * numel


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a torch checkpoint holding a state dict, without torch: the zip format's data.pkl,
    or the pre-1.6 format's pickles, whose storages must then fill the rest of the file exactly."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if len(pickles) != 1:
                raise ValueError("not a torch checkpoint (no single data.pkl in the zip)")
            shapes = _Shapes(io.BytesIO(archive.read(pickles[0]))).load()
    else:
        with path.open("rb") as stream:
            if _Shapes(stream).load() != LEGACY_MAGIC:
                raise ValueError("not a torch checkpoint")
            for _ in ("protocol version", "system info"):
                _Shapes(stream).load()
            unpickler = _Shapes(stream)
            shapes = unpickler.load()
            keys = _Shapes(stream).load()  # then each storage: its 8-byte length, its bytes
            described = stream.tell() + sum(8 + unpickler.storage_bytes[key] for key in keys)
        size = path.stat().st_size
        if described != size:
            raise ValueError(f"truncated or corrupted (its storages describe {described} bytes, the file holds {size})")
    if not isinstance(shapes, dict):
        raise ValueError(f"holds a {type(shapes).__name__}, not a state dict")
    return shapes


def check_lpips_file(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """One file of the folder: readable, a torch state dict, and holding ``expected`` names at their shapes."""
    check_weights_readable(path, "LPIPS weights")
    try:
        shapes = checkpoint_shapes(path)
    except (pickle.UnpicklingError, ValueError, EOFError, TypeError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"could not read LPIPS weights {path} (truncated, corrupted or not a torch state dict?): "
                         f"{error}") from error
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise ValueError(f"LPIPS weights {path} lack {len(missing)} tensor(s) ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}): the folder must be {LAYOUT}")
    wrong = [f"{name} {shapes[name]} (AlexNet's is {shape})"
             for name, shape in expected.items() if shapes[name] != shape]
    if wrong:
        raise ValueError(f"LPIPS weights {path} hold other shapes than AlexNet LPIPS: {'; '.join(wrong[:2])}")


def check_lpips_weights(folder: str | os.PathLike) -> None:
    """The LPIPS weights folder exists and both its files hold AlexNet LPIPS's tensors (names and shapes read,
    nothing loaded): what ``lpips.load_lpips`` reads, checked before any model loads."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"LPIPS weights folder not found: {path}; give {LAYOUT} (nothing is downloaded)")
    for name, expected in ((BACKBONE_FILE, BACKBONE_SHAPES), (HEADS_FILE, HEAD_SHAPES)):
        if not (path / name).is_file():
            raise FileNotFoundError(f"LPIPS weights folder {path} has no {name}; give {LAYOUT}")
        check_lpips_file(path / name, expected)
