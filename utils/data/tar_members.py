"""Images inside tar archives, listed as the archive is read and read back by position, so a
million images can travel as a few large files (the shards of :mod:`utils.data.shards`) and be
listed, dealt to processes and read in any order with constant memory.

A member is named ``ARCHIVE:MEMBER`` (``shard-000.tar:n01440764/n01440764_10026.JPEG``), the
name its prediction row carries; where its bytes lie travels with that name.
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import Callable, Iterator, Optional

from PIL import Image

from ..errors import ConfigError, DataError
from .images import decode_rgb, load_rgb


class TarMember(str):
    """One file of an archive: the string ``archive:member``, with the archive's path and the
    offset and size of the member's bytes in it (uncompressed archives only)."""

    archive: str
    member: str
    offset: int
    size: int

    def __new__(cls, archive: str, member: str, offset: int, size: int) -> "TarMember":
        self = super().__new__(cls, f"{archive}:{member}")
        self.archive, self.member, self.offset, self.size = archive, member, offset, size
        return self

    def __reduce__(self):
        return TarMember, (self.archive, self.member, self.offset, self.size)

    def read(self) -> bytes:
        with open(self.archive, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise DataError(f"cannot read image {self}: the archive ends {self.size - len(data)} bytes early")
        return data


def is_tar_name(path: str) -> bool:
    return path.lower().endswith(".tar")


def iter_tar_members(archive: str, keep: Callable[[str], bool]) -> Iterator[TarMember]:
    """The regular files of ``archive`` whose base name ``keep`` accepts, in archive order. Only
    the headers are read (the reader seeks over the data), and none is kept: constant memory
    for an archive of any size."""
    try:
        tf = tarfile.open(archive, mode="r:")
    except (OSError, tarfile.TarError) as e:
        raise ConfigError(f"cannot read the tar archive {archive} (uncompressed .tar only): {e}") from None
    with tf:
        while True:
            try:
                info = tf.next()
            except tarfile.TarError as e:
                raise DataError(f"cannot read the tar archive {archive}: {e}") from None
            if info is None:
                return
            tf.members.clear()  # tarfile keeps every header it has read otherwise
            if info.isfile() and keep(os.path.basename(info.name)):
                yield TarMember(archive, info.name, info.offset_data, info.size)


def open_rgb(path: str, exif_orientation: bool = False, draft: Optional[int] = None) -> Image.Image:
    """An image file, or a :class:`TarMember`, as 8-bit RGB (see :func:`utils.data.images.load_rgb`)."""
    if isinstance(path, TarMember):
        try:
            data = path.read()
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e.strerror or e}") from None
        return decode_rgb(io.BytesIO(data), path, exif_orientation, draft)
    return load_rgb(path, exif_orientation, draft)
