"""Annotation lists, class-name CSVs and few-shot subsets.

Formats (one video per line; blank lines and ``#`` comments ignored; paths may contain spaces; a path that starts
with ``#``, such as HMDB-51's ``#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi``, is written ``./#20_...``):
- ``video``:  ``relative/path.mp4 label``
- ``frames``: ``folder num_frames label`` (TSN frame folders)
Class names: a CSV ``id,name`` with a header, ids ``0..C-1`` (MoTE's ``*_labels.csv``).
Both are UTF-8, with or without a byte-order mark.
"""

from __future__ import annotations

import collections
import csv
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LIST_FORMATS = ("video", "frames")
_DECIMAL = re.compile(r"-?[0-9]+")  # a '-' is let through to be refused as a negative label or count

# The official annotation files of UCF-101 / HMDB-51 / Kinetics / SSv2, which `mergevid data lists` converts
_UCF_VIDEO = re.compile(r"(\w+)/v_\w+_g[0-9]+_c[0-9]+\.avi")
_UCF_TESTLIST = re.compile(r"testlist0[1-9]\.txt")
_UCF_TRAINLIST = re.compile(r"trainlist0[1-9]\.txt")
_HMDB_SPLIT = re.compile(r".+_test_split[123]\.txt")
_UCF_CLASS_INDEX = re.compile(r"[0-9]+ \w+")


def quoted_excerpt(text: str, limit: int = 200) -> str:
    """``repr(text)``, cut to about ``limit`` characters (a one-line JSON file is megabytes)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _official_format_hint(path: Path, line: str, *, no_label: bool) -> str:
    """What to do when an annotation list's ``line`` (``no_label``: a path alone) is one of an official annotation
    file (empty if it is not)."""
    if no_label and (_UCF_TESTLIST.fullmatch(path.name) or _UCF_VIDEO.fullmatch(line)):
        return "; official UCF-101 test lists have no labels: convert them with mergevid data lists ucf101"
    if line.replace(" ", "").startswith(("label,youtube_id", "youtube_id,")):
        return "; this is an official Kinetics CSV: convert it with mergevid data lists kinetics"
    if line.startswith(("[", "{")) and path.suffix.lower() == ".json":
        return "; this is JSON (Something-Something v2's?): convert it with mergevid data lists ssv2"
    if path.name.lower() == "classind.txt":
        return "; this is UCF-101's class index, not a list: mergevid data lists ucf101 converts the ucfTrainTestlist/ folder"
    return ""


def _refuse_official_list(path: Path, records: list[VideoRecord]) -> None:
    """Refuse an official split file that parses as a list but whose numbers are not class ids."""
    labels = {r.label for r in records}
    # the official files name bare videos ('<video>.avi 1'); ours and the K600 splits (k160_test_split1.txt) have folders or more labels
    if _HMDB_SPLIT.fullmatch(path.name) and {1, 2} <= labels <= {0, 1, 2} and not any("/" in r.path for r in records):
        raise ValueError(f"{path}: an official HMDB-51 split file (1 = train, 2 = test, not class ids): convert with "
                         "mergevid data lists hmdb51")
    if (_UCF_TRAINLIST.fullmatch(path.name) and min(labels) == 1 and max(labels) == 101
            and all(_UCF_VIDEO.fullmatch(r.path) for r in records[:20])):
        raise ValueError(f"{path}: an official UCF-101 train list (labels 1..101, ours are 0-based): convert it with "
                         "mergevid data lists ucf101")


@dataclass(frozen=True)
class VideoRecord:
    """One annotated video: path relative to the dataset root, class id, frame count (frame folders)."""

    path: str
    label: int
    num_frames: int | None = None


def _read_utf8(path: Path, what: str) -> str:
    """The text of ``path`` decoded as UTF-8 (a byte-order mark dropped); other encodings raise
    ValueError naming the file, the line and the byte that failed."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not part of the first path
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        hint = ""
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            hint = " It looks like UTF-16 (it starts with a UTF-16 byte-order mark)."
        elif b"\x00" in data[:200]:
            hint = " It looks like UTF-16 (it holds NUL bytes)."
        raise ValueError(f"{path}:{line}: {what} must be UTF-8 text; byte 0x{data[e.start]:02x} at offset {e.start} "
                         f"(line {line}) is not valid UTF-8 ({e.reason}).{hint} Re-save the file as UTF-8.") from None


def _entry_fields(line: str, fields: int) -> list[str] | None:
    """``line`` split as an entry (``path label`` / ``folder num_frames label``) when its numbers are whole, else None."""
    parts = line.rsplit(maxsplit=fields - 1)
    if len(parts) != fields or not all(re.fullmatch("[0-9]+", p) for p in parts[1:]):
        return None
    return parts


def read_annotation_list(path: str | os.PathLike, list_format: str = "video") -> list[VideoRecord]:
    """Parse an annotation list into :class:`VideoRecord` objects; errors name the file and line.

    A line starting with ``#`` is a comment, always; one that reads as an entry with ``#`` right before its path
    (``#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 3``: HMDB-51 has such videos) is logged as a warning once per call,
    naming the first such line: such a video is listed as ``./#20_...``, a comment written ``# ...``."""
    if list_format not in LIST_FORMATS:
        raise ValueError(f"list_format must be one of {LIST_FORMATS}, got {list_format!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation list {path} is a folder; give the list file in it" if path.is_dir()
                                else f"annotation list not found: {path}")
    fields = 2 if list_format == "video" else 3
    example = "relative/path.mp4 label" if list_format == "video" else "folder num_frames label"
    records = []
    looks_like_entries: list[tuple[int, str]] = []  # '#' lines that read as entries: (line number, line)
    text = _read_utf8(path, "an annotation list")
    for lineno, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        line = line.strip()
        if line.startswith("#") and len(line) > 1 and not line[1].isspace() and _entry_fields(line, fields):
            looks_like_entries.append((lineno, line))
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=fields - 1)
        if len(parts) != fields:
            raise ValueError(f"{path}:{lineno}: expected '{example}', got {quoted_excerpt(line)}{_official_format_hint(path, line, no_label=len(parts) == 1)}")
        for name, text in (("label", parts[-1]), ("frame count", parts[1])) if fields == 3 else (("label", parts[-1]),):
            if not _DECIMAL.fullmatch(text):  # int() also takes '1_0', '+1' and non-ASCII digits
                raise ValueError(f"{path}:{lineno}: {name} {text!r} is not a whole number (digits 0-9 only); "
                                 f"expected '{example}' with integer fields, got {quoted_excerpt(line)}{_official_format_hint(path, line, no_label=False)}")
        label = int(parts[-1])
        num_frames = int(parts[1]) if fields == 3 else None
        if label < 0:
            raise ValueError(f"{path}:{lineno}: negative label {label}")
        if num_frames is not None and num_frames < 0:
            raise ValueError(f"{path}:{lineno}: negative frame count {num_frames}")
        records.append(VideoRecord(path=parts[0], label=label, num_frames=num_frames))
    if looks_like_entries:
        lineno, line = looks_like_entries[0]
        more = len(looks_like_entries) - 1
        log.warning("%s:%d: %s starts with '#', so it is a comment, not a video%s; to list a video whose name starts "
                    "with '#', write its path as ./%s (and a comment as '# ...')", path, lineno, quoted_excerpt(line),
                    f" (and {more} more such line{'s' * (more != 1)})" if more else "", line.rsplit(maxsplit=fields - 1)[0])
    if not records:
        raise ValueError(f"annotation list {path} has no entries")
    if list_format == "video":
        _refuse_official_list(path, records)
    return records


def write_annotation_list(path: str | os.PathLike, records: list[VideoRecord], *, overwrite: bool = True) -> Path:
    """Write records atomically in the format they carry (with frame counts if they have them); a path that starts
    with ``#`` is written ``./#...`` (else it would read back as a comment)."""
    from ..utils.io import atomic_write_text

    lines = []
    for r in records:
        if any(c in r.path for c in "\n\r"):
            raise ValueError(f"path {r.path!r} contains a newline")
        p = f"./{r.path}" if r.path.startswith("#") else r.path
        lines.append(f"{p} {r.label}" if r.num_frames is None else f"{p} {r.num_frames} {r.label}")
    return atomic_write_text(path, "\n".join(lines) + "\n", overwrite=overwrite)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


class ClassNames(list):
    """The class names :func:`read_class_names` returns: a plain list of str that also knows its CSV (``source``),
    so a mismatch with an annotation list can name the file."""

    source: Path | None = None


def _comparable(name: str) -> str:
    """A class name as CLIP's tokenizer sees it: lower case, runs of whitespace as one space."""
    return " ".join(name.lower().split())


def read_class_names(csv_path: str | os.PathLike) -> list[str]:
    """Class names from a CSV ``id,name`` with a two-column header (any names, such as ``idx,label``; more columns are
    refused); ids must be exactly ``0..C-1`` (any order; a negative or repeated id is refused) and names non-empty.
    Names that differ only in case or spacing (which CLIP's tokenizer reads alike) are logged as a warning.

    Returns a :class:`ClassNames` (a list whose ``source`` is the CSV's path)."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name CSV not found: {path}")
    names: dict[int, str] = {}
    first_line: dict[str, int] = {}  # name -> the line it first appears on
    text = _read_utf8(path, "a class-name CSV")
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header is None:
        raise ValueError(f"{path}: expected a header 'id,name'")
    if len(header) < 2 or _is_int(header[0]):  # a first row of data would be dropped as the header
        hint = ""
        if path.name.lower() == "classind.txt" or (len(header) == 1 and _UCF_CLASS_INDEX.fullmatch(header[0].strip())):
            hint = ("; this looks like UCF-101's classInd.txt ('1 ApplyEyeMakeup', ids from 1): mergevid data lists ucf101 "
                    "converts the official ucfTrainTestlist/ folder and writes the class CSV (ucf_labels.csv)")
        elif path.suffix.lower() == ".json":
            hint = "; this is JSON (Something-Something v2's labels?): mergevid data lists ssv2 writes the class CSV"
        raise ValueError(f"{path}: expected a header 'id,name', got {quoted_excerpt(','.join(header))}{hint}")
    if len(header) > 2:  # the extra columns would end up in the names ("red circle,x")
        hint = ""
        if {"label", "youtube_id"} <= {h.strip() for h in header}:
            hint = "; this is an official Kinetics CSV: mergevid data lists kinetics writes the class CSV"
        raise ValueError(f"{path}: expected a header 'id,name' (two columns: a class id and its name), got "
                         f"{quoted_excerpt(','.join(header))} ({len(header)} columns); remove the other columns "
                         f"(a name that contains a comma is quoted: 1,\"Baby, Crawling\"){hint}")
    for lineno, row in enumerate(rows, 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise ValueError(f"{path}:{lineno}: expected 'id,name', got {row!r}")
        if not _DECIMAL.fullmatch(row[0].strip()):  # int() also takes '1_0', '+1' and non-ASCII digits
            raise ValueError(f"{path}:{lineno}: class id {row[0]!r} is not a whole number (digits 0-9 only)")
        cid = int(row[0])
        if cid in names:
            raise ValueError(f"{path}:{lineno}: duplicate class id {cid}")
        if cid < 0:
            raise ValueError(f"{path}:{lineno}: class id {cid} is negative; ids are 0..C-1")
        name = ",".join(row[1:]).strip()
        if not name:  # its prompts would be the templates alone ("a photo of .")
            raise ValueError(f"{path}:{lineno}: class {cid} has an empty name")
        first_line.setdefault(_comparable(name), lineno)
        names[cid] = name
    if not names:
        raise ValueError(f"{path}: no classes")
    missing = sorted(set(range(len(names))) - names.keys())
    if missing:
        raise ValueError(f"{path}: class ids must be 0..{len(names) - 1}; missing {missing[:10]}")
    by_text = collections.defaultdict(list)  # comparable name -> class ids
    for cid in sorted(names):
        by_text[_comparable(names[cid])].append(cid)
    repeated = sorted((ids for key, ids in by_text.items() if len(ids) > 1), key=lambda ids: first_line[_comparable(names[ids[0]])])
    if repeated:  # one text feature for several classes: a classifier cannot tell them apart
        ids = repeated[0]
        log.warning("%s: %d name%s shared by several classes (the first: classes %s, %s): CLIP's tokenizer ignores "
                    "case and spacing, so those classes get the same text features and cannot be told apart",
                    path, len(repeated), " is" if len(repeated) == 1 else "s are", ", ".join(map(str, ids)),
                    " / ".join(repr(names[i]) for i in ids))
    out = ClassNames(names[i] for i in range(len(names)))
    out.source = path
    return out


def write_class_names(path: str | os.PathLike, names: list[str], *, overwrite: bool = True) -> Path:
    """Write an ``id,name`` CSV atomically."""
    import io

    from ..utils.io import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "name"])
    for i, n in enumerate(names):
        w.writerow([i, n])
    return atomic_write_text(path, buf.getvalue(), overwrite=overwrite)


def few_shot_subset(dataset_or_records: Any, *, shots: int, seed: int, repeat_to_full: bool = True) -> Any:
    """K-shot training subset: ``shots`` videos per class drawn with a generator seeded by ``seed``.

    The draw depends only on the records and ``seed``, so every DDP rank gets the same subset.
    With ``repeat_to_full`` the subset is repeated ``len(full) // len(subset)`` times, keeping an
    epoch about as long as on the full set (the paper's few-shot protocol, after Text4Vis).
    Takes a :class:`VideoDataset` (returns a copy over the subset) or a list of records (returns a list).
    A dataset's records whose label is outside its class names (tolerated under ``on_error`` skip or
    resample) are left out of the draw, with a warning.
    """
    import torch

    if shots <= 0:
        raise ValueError(f"shots must be positive, got {shots}")
    records = list(getattr(dataset_or_records, "records", dataset_or_records))
    if not records:
        raise ValueError("few_shot_subset: no records")
    class_names = getattr(dataset_or_records, "class_names", None)
    by_class: dict[int, list[int]] = {}
    stray = 0
    for i, r in enumerate(records):
        if class_names is not None and not 0 <= r.label < len(class_names):
            stray += 1  # a label past the class CSV (tolerated under on_error=skip/resample) is no class of its own
            continue
        by_class.setdefault(r.label, []).append(i)
    if stray:
        log.warning("few_shot_subset: %d video%s with a label outside the %d class names left out of the draw",
                    stray, "s" * (stray != 1), len(class_names))
    if not by_class:
        raise ValueError("few_shot_subset: no records with a label inside the class names")
    g = torch.Generator().manual_seed(int(seed))
    chosen: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < shots:
            raise ValueError(f"few_shot_subset: class {label} has {len(members)} video{'s' * (len(members) != 1)}, fewer than shots={shots}")
        pick = torch.randperm(len(members), generator=g)[:shots].tolist()
        chosen.extend(members[j] for j in sorted(pick))
    subset = [records[i] for i in chosen]
    if repeat_to_full:
        subset = subset * max(1, len(records) // len(subset))
    if hasattr(dataset_or_records, "with_records"):
        return dataset_or_records.with_records(subset)
    return subset
