"""The listing of an ImageFolder (``root/<class>/**/<image>``) that always ends.

torchvision's scan follows symbolic links with ``os.walk(followlinks=True)``: a link back to
a parent folder makes it walk for ever, growing its list, and it says nothing while it runs.
This scan gives the same classes and the same sample order as torchvision on an ordinary
tree, and besides:

* follows every real folder once (a folder reached again through a link is skipped), so
  symbolic-link loops end;
* stops with an error below ``max_depth`` levels of folders;
* ignores hidden files and folders (names starting with ``.``: ``.DS_Store``, macOS
  AppleDouble ``._x.png`` files, ``.ipynb_checkpoints``);
* reports how far it got every few seconds on large folders;
* calls ``stop()`` as it goes and raises :class:`ScanInterrupted` when it returns a signal
  number, so SIGTERM / SIGINT end a scan of a huge (or networked) folder.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_DEPTH = 32
REPORT_AFTER_S = 2.0  # first progress line after this long; then every REPORT_EVERY_S
REPORT_EVERY_S = 10.0


class ScanInterrupted(Exception):
    """A signal asked the scan to stop."""

    def __init__(self, signum: int, root: str) -> None:
        super().__init__(f"stopped by signal {signum} while listing {root}")
        self.signum = signum


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _hidden(name: str) -> bool:
    return name.startswith(".")


@dataclass
class ScanResult:
    """classes: sorted class folder names; samples: (path, class index) in torchvision's
    order; skipped: what was left out, by reason (hidden files, folders seen before, ...)."""
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


def list_classes(root: str | os.PathLike) -> list[str]:
    """The class folders of an ImageFolder root: its non-hidden sub-folders, sorted (cheap:
    one directory listing, so classes can be checked before the long scan)."""
    root = os.fspath(root)
    try:
        with os.scandir(root) as entries:
            visible = [e for e in entries if not _hidden(e.name)]
            classes = sorted(e.name for e in visible if e.is_dir())
    except OSError as e:
        raise DataError(f"cannot list {root}: {e.strerror or e}") from None
    if not classes and visible:  # e.g. ImageNet's validation archive, which unpacks without class folders
        files = f"{len(visible):,} file{'s' if len(visible) != 1 else ''}"
        raise DataError(f"{root} has no class folders, only {files} (expected {root}/<class>/<images>: "
                        f"move each image into the folder of its class, named as in the training split)")
    if not classes:
        raise DataError(f"{root} has no class folders (expected {root}/<class>/<images>)")
    return classes


class _Walker:
    """The state of one scan: folders seen, counts, progress and stop checks."""

    def __init__(self, root: str, extensions: Sequence[str], max_depth: int,
                 report: Optional[Callable[[str], None]], stop: Optional[Callable[[], Optional[int]]]) -> None:
        self.root = root
        self.extensions = tuple(e.lower() for e in extensions)
        self.max_depth = max_depth
        self.report = report
        self.stop = stop
        st = os.stat(root)
        self.seen: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}  # a link back to the root is a loop too
        self.skipped = {"hidden": 0, "folders seen before": 0, "broken links": 0}
        self.other_types: Counter[str] = Counter()  # files of other types, by suffix
        self.files = 0
        self.folders = 0
        self.started = time.monotonic()
        self.next_report = self.started + REPORT_AFTER_S

    def check(self) -> None:
        signum = self.stop() if self.stop is not None else None
        if signum:
            raise ScanInterrupted(signum, self.root)
        now = time.monotonic()
        if self.report is not None and now >= self.next_report:
            self.report(f"listing {self.root}: {self.files:,} images in {self.folders:,} folders so far "
                        f"({now - self.started:.0f} s)")
            self.next_report = now + REPORT_EVERY_S

    def walk(self, top: str) -> list[tuple[str, list[str]]]:
        """(folder path, sorted image names) of every real folder under ``top`` (itself
        included), each once; depth-first in sorted name order."""
        out: list[tuple[str, list[str]]] = []
        stack = [(top, 0)]
        while stack:
            path, depth = stack.pop()
            self.check()
            try:
                st = os.stat(path)
            except OSError:
                self.skipped["broken links"] += 1
                continue
            key = (st.st_dev, st.st_ino)
            if key in self.seen:
                self.skipped["folders seen before"] += 1
                continue
            self.seen.add(key)
            if depth > self.max_depth:
                raise DataError(f"{path} is more than {self.max_depth} folders below {self.root}: is there a "
                                "symbolic-link chain or a misplaced dataset? Images must be at most "
                                f"{self.max_depth} levels deep")
            self.folders += 1
            images, subdirs = [], []
            try:
                with os.scandir(path) as entries:
                    for entry in entries:
                        if _hidden(entry.name):
                            self.skipped["hidden"] += 1
                            continue
                        try:
                            is_dir = entry.is_dir()
                            is_file = not is_dir and entry.is_file()
                        except OSError:
                            is_dir = is_file = False
                        if is_dir:
                            subdirs.append(entry.name)
                        elif is_file and entry.name.lower().endswith(self.extensions):
                            images.append(entry.name)
                        elif not is_file and entry.is_symlink():
                            self.skipped["broken links"] += 1
                        else:
                            self.other_types[suffix_of(entry.name)] += 1
            except OSError as e:
                raise DataError(f"cannot list {path}: {e.strerror or e}") from None
            self.files += len(images)
            out.append((path, sorted(images)))
            stack.extend((os.path.join(path, d), depth + 1) for d in sorted(subdirs, reverse=True))
        return out


def scan_image_folder(
        root: str | os.PathLike,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        max_depth: int = MAX_DEPTH,
        report: Optional[Callable[[str], None]] = _stderr,
        stop: Optional[Callable[[], Optional[int]]] = None,
) -> ScanResult:
    """List an ImageFolder: classes and (path, class index) samples.

    Args:
        root: the folder holding one sub-folder per class.
        extensions: image file name endings (any case).
        max_depth: most levels of folders below a class folder.
        report: called with a progress line every few seconds of a long scan, and with a line
            counting the files left out for their type, by suffix (None: silent).
        stop: called as the scan goes; a non-zero return (a signal number) ends the scan
            with :class:`ScanInterrupted`.

    Raises:
        DataError: no class folders, a class without images, an unreadable or too deep folder.
        ScanInterrupted: ``stop()`` asked to stop.
    """
    root = os.fspath(root)
    classes = list_classes(root)
    walker = _Walker(root, extensions, max_depth, report, stop)
    samples: list[tuple[str, int]] = []
    empty = []
    for index, name in enumerate(classes):
        folders = walker.walk(os.path.join(root, name))
        folders.sort(key=lambda item: item[0])  # torchvision's order: folders by path, then names
        found = [(os.path.join(path, f), index) for path, names in folders for f in names]
        if not found:
            empty.append(name)
        samples.extend(found)
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(f"no images in the class folder(s) {shown} of {root} (image types: "
                        f"{', '.join(extensions)}); remove empty class folders or add images")
    if report is not None and time.monotonic() - walker.started >= REPORT_AFTER_S:
        report(f"listed {root}: {len(samples):,} images of {len(classes)} class{'es' if len(classes) != 1 else ''}")
    if report is not None and walker.other_types:
        report(left_out_line(root, walker.other_types, extensions))
    counts = {**walker.skipped, "other files": sum(walker.other_types.values())}
    return ScanResult(classes, samples, {k: v for k, v in counts.items() if v})


def suffix_of(name: str) -> str:
    """A file's type as :func:`left_out_line` counts it: its suffix in lower case, or ``no suffix``."""
    return os.path.splitext(name)[1].lower() or "no suffix"


def left_out_line(where: str, counts: Counter[str], extensions: Sequence[str]) -> str:
    """``WHERE: left out N files of other types (3 .heic, 1 .txt); images are read from ...``, the
    five commonest types first (ties by name, so the line is the same on any file system)."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kinds = ", ".join(f"{n:,} {suffix}" for suffix, n in ranked[:5]) + (", ..." if len(ranked) > 5 else "")
    total = sum(counts.values())
    return (f"{where}: left out {total:,} file{'s' if total != 1 else ''} of other types ({kinds}); images are "
            f"read from {', '.join(extensions)}")
