"""Images in chat messages: checked and decoded here, preprocessed and tokenised by mistral-common.

The token grid and the pixel values must be exactly mistral-common's (ARCHITECTURE.md §3.4-3.5: RGBA composited on
white, the longest side brought to `max_image_size`, a grid of 28-pixel cells, bicubic resize, CLIP normalisation),
so they are not re-implemented: `infer.chat.encode_chat` hands the messages to mistral-common's
`encode_chat_completion`, whose image encoder returns both the `[IMG]` / `[IMG_BREAK]` / `[IMG_END]` ids and the
[C, H, W] arrays the vision encoder takes.

What this module adds is the part a server needs before that: every image part is turned into a `data:` URL whose
bytes pillow has fully decoded, and anything else is refused with an InputError naming the message and part:
- `image_url` parts (OpenAI: `{"type": "image_url", "image_url": {"url": ...}}` or the URL as a plain string);
- `data:` URLs with base64 payloads; a plain path or `file://` URL only when the caller names an allowed directory
  (`image_dir`), and only to a file inside it; http(s) and every other scheme are refused: nothing is fetched;
- empty, truncated, corrupt or unrecognised data, and images over pillow's decompression-bomb limit.

`image_hash` identifies an image by the pixels the model sees (the preprocessed array), for the prefix cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from small4_jax.errors import InputError

_PART_TYPES = ("image_url", "image")


def is_image_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in _PART_TYPES


def decode_image(data: bytes, where: str):
    """A fully decoded PIL image from encoded bytes (PNG, JPEG, WebP, GIF, BMP, TIFF, ...); InputError otherwise."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError(f"{where}: the image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise InputError(f"{where}: not an image in a supported format (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") \
            from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{where}: image too large to decode ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:  # pillow's truncated / corrupt data errors
        raise InputError(f"{where}: truncated or corrupt image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InputError(f"{where}: the image has zero size ({w}x{h} pixels)")
    return img


def _part_url(part: dict, where: str) -> str:
    if part.get("type") == "image":  # mistral-common's own chunk: {"type": "image", "image": <data URL or base64>}
        url = part.get("image")
    else:
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
    if not isinstance(url, str) or not url:
        raise InputError(f'{where}: an image part needs {{"type": "image_url", "image_url": {{"url": "data:..."}}}}')
    return url


def _read_local(url: str, image_dir: Path | None, where: str) -> bytes:
    path_text = urllib.parse.unquote(url.removeprefix("file://")) if url.startswith("file://") else url
    if image_dir is None:
        raise InputError(f"{where}: local image files are not allowed here (send the image as a data: URL; a "
                         "server reads files only from the directory named by --image-dir)")
    root = Path(image_dir).resolve()
    path = Path(path_text)
    path = (root / path if not path.is_absolute() else path).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"{where}: image file {path_text!r} is outside the allowed image directory")
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"{where}: cannot read image file {path_text!r} ({e.strerror or e})") from None


def image_part_data(part: dict, where: str, image_dir: str | os.PathLike | None = None) -> bytes:
    """The encoded bytes of one image part (see the module docstring for what is accepted)."""
    url = _part_url(part, where)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "data":
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InputError(f"{where}: a data: URL must be 'data:image/...;base64,<payload>'")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{where}: the data: URL's payload is not valid base64") from None
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise InputError(f"{where}: image URLs are not fetched; send the image as a data: URL")
    if scheme in ("", "file") or len(scheme) == 1:  # a path (a Windows drive letter is not a scheme)
        return _read_local(url, Path(image_dir) if image_dir is not None else None, where)
    if part.get("type") == "image":  # mistral-common also takes bare base64
        try:
            return base64.b64decode(url, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise InputError(f"{where}: unsupported image URL scheme {scheme!r}; send the image as a data: URL")


def data_url(data: bytes, img) -> str:
    fmt = (img.format or "png").lower()
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode("ascii")


def prepare_messages(messages: Sequence, image_dir: str | os.PathLike | None = None) -> tuple[list, int]:
    """Copies of `messages` whose image parts are checked, decodable `data:` URLs; returns (messages, image count)."""
    out, count = [], 0
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list) or not any(is_image_part(p) for p in content):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            if not is_image_part(part):
                parts.append(part)
                continue
            where = f"messages[{i}].content[{j}]"
            if m.get("role") != "user":
                raise InputError(f"{where}: images are only accepted in user messages")
            data = image_part_data(part, where, image_dir)
            img = decode_image(data, where)
            parts.append({"type": "image_url", "image_url": {"url": data_url(data, img)}})
            count += 1
        out.append({**m, "content": parts})
    return out, count


def file_part(path: str | os.PathLike) -> dict:
    """An `image_url` part (data: URL) holding the image file at `path` (a command-line --image)."""
    where = f"--image {path}"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{where}: cannot read the file ({e.strerror or e})") from None
    return {"type": "image_url", "image_url": {"url": data_url(data, decode_image(data, where))}}


def image_hash(image: np.ndarray) -> str:
    """sha256 (hex) of a preprocessed image [C, H, W]: equal exactly when the model sees the same pixels."""
    a = np.ascontiguousarray(np.asarray(image, np.float32))
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()
