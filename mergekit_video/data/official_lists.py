"""Annotation lists and class CSVs from the official annotation files of UCF-101, HMDB-51, Kinetics and SSv2.

Each converter reads the files a dataset ships with and returns an :class:`OfficialLists`: our lists
(``relative/path label``, labels ``0..C-1``) by file name, the class names, and the videos not found
when a video folder was given. Nothing is written here: ``mergevid data lists`` writes the result
with :func:`~mergekit_video.data.annotations.write_annotation_list` / ``write_class_names``.

- UCF-101 (``ucfTrainTestlist/``): ``classInd.txt`` (``1 ApplyEyeMakeup``, 1-based), ``trainlist0k.txt``
  (``Class/v_Class_g08_c01.avi 1``) and ``testlist0k.txt`` (no label: the class is the folder).
- HMDB-51 (``testTrainMulti_7030_splits/``): ``<class>_test_split{k}.txt``, lines ``<video>.avi <0|1|2>``
  (1 = train, 2 = test, 0 = unused in split k); classes are the folder names sorted, videos ``<class>/<video>.avi``.
- Kinetics-400/600/700: CSVs ``label,youtube_id,time_start,time_end,split[,is_cc]``; the videos are
  found under a folder by name, ``{youtube_id}_{time_start:06d}_{time_end:06d}.*`` or ``{youtube_id}.*``.
- Something-Something v2: ``something-something-v2-labels.json`` (name -> id) and the train/validation
  JSON (``{"id": "78687", "template": "Holding [something] next to [something]", ...}``); videos ``<id>.webm``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .annotations import VideoRecord, _read_utf8, quoted_excerpt, read_class_names

FORMATS = ("ucf101", "hmdb51", "kinetics", "ssv2")
NAME_STYLES = ("words", "raw")

#: Extensions of the files taken for videos when a video folder is searched (partial downloads such as
#: ``.part`` / ``.ytdl`` are not videos).
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp", ".ogv"})

#: UCF-101 class folders whose display name is not their CamelCase split, as in MoTE's ``ucf_labels.csv``.
UCF101_NAME_EXCEPTIONS = {"YoYo": "YoYo"}

#: The eval views of the recipes for each format's test lists (``recipes/*.yaml``): MoTE §4.1 tests zero-shot
#: UCF-101 / HMDB-51 (and K600) with 3 clips x 1 crop of 8 frames, close-set Kinetics-400 with 4 clips x 3 crops;
#: its only SSv2 protocol (few-shot) takes one view.
EVAL_VIEWS: dict[str, dict[str, int]] = {
    "ucf101": {"num_clips": 3, "num_crops": 1, "num_frames": 8},
    "hmdb51": {"num_clips": 3, "num_crops": 1, "num_frames": 8},
    "kinetics": {"num_clips": 4, "num_crops": 3},
    "ssv2": {"num_clips": 1, "num_crops": 1},
}


def eval_dataset_name(fmt: str, list_name: str, num_classes: int) -> str:
    """The ``eval.datasets`` name for a converted test list, the one the shipped recipes' ``eval.summary`` uses:
    ``ucf101`` / ``hmdb51`` (all splits in one dataset); Kinetics-400/600/700's ``val.txt`` -> ``k400`` / ``k600`` /
    ``k700`` (another list: ``k400_test``; another class count: ``kinetics_val``); SSv2's ``val.txt`` -> ``ssv2``
    (another list: ``ssv2_<stem>``)."""
    stem = Path(list_name).stem
    if fmt in ("ucf101", "hmdb51"):
        return fmt
    if fmt == "kinetics":
        if num_classes not in (400, 600, 700):
            return f"kinetics_{stem}"
        return f"k{num_classes}" if stem == "val" else f"k{num_classes}_{stem}"
    return fmt if stem == "val" else f"{fmt}_{stem}"


_UCF_SPLIT_FILE = re.compile(r"(train|test)list0([1-9])\.txt")
_HMDB_SPLIT_FILE = re.compile(r"(.+)_test_split([1-9])\.txt")


@dataclass(frozen=True)
class MissingVideos:
    """Videos of a list that were not found: written to ``file_name`` next to the list (``lines``, a header first for a CSV)."""

    file_name: str
    lines: list[str]
    count: int
    total: int


@dataclass
class OfficialLists:
    """What a converter returns: lists by file name (``train`` / ``test`` say which is which), the class names,
    the class CSV's default file name, and the videos not found (by list file name)."""

    lists: dict[str, list[VideoRecord]]
    class_names: list[str]
    class_csv: str
    train: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    missing: dict[str, MissingVideos] = field(default_factory=dict)


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    """``(line number, stripped line)`` of the non-blank lines of a UTF-8 text file (CRLF or LF).

    No ``#`` comments: HMDB-51 video names may start with ``#``."""
    text = _read_utf8(path, what)
    return [(n, s.strip()) for n, s in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1) if s.strip()]


def _folder(path: str | os.PathLike, what: str, example: str) -> Path:
    """``path`` as a folder; a file given in its place (one of the split files) is refused naming the folder to give."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}" if not path.exists() else
                                f"{path} is a file; give the official {what} itself ({example})")
    return path


# ------------------------------------------------------------------------------------------------ UCF-101
def ucf101_display_name(folder: str) -> str:
    """A UCF-101 class folder as words, as MoTE's ``ucf_labels.csv`` has it: ``ApplyEyeMakeup`` -> ``Apply Eye Makeup``,
    ``HandstandPushups`` -> ``Handstand Pushups``; ``YoYo`` stays one word (:data:`UCF101_NAME_EXCEPTIONS`)."""
    if folder in UCF101_NAME_EXCEPTIONS:
        return UCF101_NAME_EXCEPTIONS[folder]
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", folder)


def read_ucf101_class_index(path: str | os.PathLike) -> list[str]:
    """The class folders of UCF-101's ``classInd.txt`` (``1 ApplyEyeMakeup`` per line, ids ``1..C``) in id order."""
    path = Path(path)
    names: dict[int, str] = {}
    for lineno, line in _lines(path, "classInd.txt"):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'id ClassFolder' (such as '1 ApplyEyeMakeup'), got {line!r}")
        cid = int(parts[0])
        if cid in names:
            raise ValueError(f"{path}:{lineno}: class id {cid} given twice")
        names[cid] = parts[1]
    if sorted(names) != list(range(1, len(names) + 1)):
        raise ValueError(f"{path}: class ids must be 1..{len(names)} (UCF-101 counts from 1); got {sorted(names)[:5]}...")
    return [names[i] for i in range(1, len(names) + 1)]


def ucf101_lists(folder: str | os.PathLike, *, names: str = "words") -> OfficialLists:
    """Our lists from UCF-101's ``ucfTrainTestlist`` folder: ``trainlist0k.txt`` and ``testlist0k.txt`` with 0-based
    labels (the test lists' from their class folder), paths as given (relative to the ``UCF-101`` folder), and
    ``ucf_labels.csv``'s names (``names="words"``: :func:`ucf101_display_name`; ``"raw"``: the folder names)."""
    if names not in NAME_STYLES:
        raise ValueError(f"names must be one of {NAME_STYLES}, got {names!r}")
    folder = _folder(folder, "UCF-101 split folder", "ucfTrainTestlist/ with classInd.txt, trainlist01.txt, testlist01.txt")
    index_file = folder / "classInd.txt"
    if not index_file.is_file():
        inner = folder / "ucfTrainTestlist"
        raise FileNotFoundError(f"{index_file} not found; give the official ucfTrainTestlist/ folder"
                                + (f" itself: {inner}" if (inner / "classInd.txt").is_file() else ""))
    classes = read_ucf101_class_index(index_file)
    ids = {c: i for i, c in enumerate(classes)}
    folded = {c.casefold(): i for i, c in enumerate(classes)}
    split_files = sorted((int(m.group(2)), m.group(1) != "train", p.name) for p in folder.iterdir()
                         if (m := _UCF_SPLIT_FILE.fullmatch(p.name)))
    if not split_files:
        raise FileNotFoundError(f"{folder}: no trainlist0k.txt / testlist0k.txt next to classInd.txt")
    out = OfficialLists(lists={}, class_names=[ucf101_display_name(c) if names == "words" else c for c in classes],
                        class_csv="ucf_labels.csv")
    for _, is_test, name in split_files:
        path = folder / name
        records = []
        for lineno, line in _lines(path, "a UCF-101 split list"):
            video, _, given = line.partition(" ")
            given = given.strip()
            cls = video.split("/")[0] if "/" in video else ""
            label = ids.get(cls, folded.get(cls.casefold()))
            if label is None:
                raise ValueError(f"{path}:{lineno}: class folder {cls!r} of {video!r} is not in {index_file.name}")
            if given:
                if not given.isdigit():
                    raise ValueError(f"{path}:{lineno}: expected 'Class/video.avi [label]', got {line!r}")
                if int(given) != label + 1:
                    raise ValueError(f"{path}:{lineno}: label {given} of {video!r}, but {index_file.name} gives its "
                                     f"class {classes[label]} id {label + 1}")
            elif not is_test:
                raise ValueError(f"{path}:{lineno}: a train list line without its label: {line!r}")
            records.append(VideoRecord(path=video, label=label))
        if not records:
            raise ValueError(f"{path} has no entries")
        out.lists[name] = records
        (out.test if is_test else out.train).append(name)
    return out


# ------------------------------------------------------------------------------------------------ HMDB-51
def hmdb51_lists(folder: str | os.PathLike, *, names: str = "words") -> OfficialLists:
    """Our lists from HMDB-51's ``testTrainMulti_7030_splits`` folder: per split k, ``trainlist_split{k}.txt``
    (marker 1) and ``vallist_split{k}.txt`` (marker 2), paths ``<class>/<video>.avi``, class ids ``0..50`` in the
    sorted order of the class folders; ``hmdb51_labels.csv``'s names with ``_`` as spaces (``names="raw"``: as is)."""
    if names not in NAME_STYLES:
        raise ValueError(f"names must be one of {NAME_STYLES}, got {names!r}")
    folder = _folder(folder, "HMDB-51 split folder", "testTrainMulti_7030_splits/ with brush_hair_test_split1.txt, ...")
    files: dict[str, dict[int, Path]] = {}
    for p in folder.iterdir():
        if m := _HMDB_SPLIT_FILE.fullmatch(p.name):
            files.setdefault(m.group(1), {})[int(m.group(2))] = p
    if not files:
        raise FileNotFoundError(f"{folder}: no <class>_test_split<k>.txt files (the official testTrainMulti_7030_splits/)")
    classes = sorted(files)
    splits = sorted({k for per in files.values() for k in per})
    for c in classes:
        if sorted(files[c]) != splits:
            lacking = sorted(set(splits) - set(files[c]))
            raise ValueError(f"{folder}: {c}_test_split{lacking[0]}.txt is missing (other classes have splits {splits})")
    out = OfficialLists(lists={}, class_names=[c.replace("_", " ") if names == "words" else c for c in classes],
                        class_csv="hmdb51_labels.csv")
    for k in splits:
        train: list[VideoRecord] = []
        test: list[VideoRecord] = []
        for label, c in enumerate(classes):
            path = files[c][k]
            for lineno, line in _lines(path, "an HMDB-51 split file"):
                parts = line.rsplit(maxsplit=1)
                if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                    raise ValueError(f"{path}:{lineno}: expected '<video>.avi <0|1|2>' (1 = train, 2 = test, 0 = unused), got {line!r}")
                if parts[1] != "0":
                    (train if parts[1] == "1" else test).append(VideoRecord(path=f"{c}/{parts[0]}", label=label))
        for name, records, role in ((f"trainlist_split{k}.txt", train, out.train), (f"vallist_split{k}.txt", test, out.test)):
            if not records:
                raise ValueError(f"{folder}: split {k} has no {'train (1)' if role is out.train else 'test (2)'} videos")
            out.lists[name] = records
            role.append(name)
    return out


# ------------------------------------------------------------------------------------------------ video folders
def index_videos(root: str | os.PathLike) -> dict[str, list[str]]:
    """Every video file under ``root`` (one walk; links to folders followed) by file name without its extension:
    ``stem -> [path relative to root, ...]`` (``/``-separated, sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root}" if not root.exists() else f"{root} is a file; give the video folder")
    index: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        for f in filenames:
            stem, ext = os.path.splitext(f)
            if ext.lower() in VIDEO_EXTENSIONS and not f.startswith("."):
                index.setdefault(stem, []).append((rel / f).as_posix())
    for paths in index.values():
        paths.sort()
    return index


def drop_missing(lists: OfficialLists, root: str | os.PathLike) -> OfficialLists:
    """``lists`` without the videos that are not files under ``root``; those are kept in ``missing`` (their paths)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root}" if not root.exists() else f"{root} is a file; give the video folder")
    for name, records in lists.lists.items():
        kept = [r for r in records if (root / r.path).is_file()]
        if len(kept) != len(records):
            lost = [r.path for r in records if not (root / r.path).is_file()]
            lists.missing[name] = MissingVideos(f"{Path(name).stem}_missing.txt", lost, len(lost), len(records))
            if not kept:
                raise FileNotFoundError(f"none of the {len(records)} videos of {name} is under {root} (first: {root / records[0].path}); "
                                        "is that the folder the list's paths start from?")
        lists.lists[name] = kept
    return lists


# ------------------------------------------------------------------------------------------------ Kinetics
def _seconds(text: str, path: Path, lineno: int, column: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value < 0:
        raise ValueError(f"{path}:{lineno}: {column} {text!r} is not a whole number of seconds")
    return int(value)


def _split_name(values: set[str], path: Path) -> str:
    """The list's file stem: ``train`` / ``val`` / ``test`` when the CSV's split column says one of them, else the CSV's
    stem (the official ``validate.csv`` / ``validation.csv``: ``val``, the name the recipes give its list)."""
    if len(values) == 1:
        v = values.pop().strip().lower()
        if v in ("train", "test"):
            return v
        if v in ("val", "validate", "validation"):
            return "val"
    return "val" if path.stem.lower() in ("validate", "validation") else path.stem


def kinetics_lists(csv_files: list[str | os.PathLike], *, root: str | os.PathLike,
                   classes: str | os.PathLike | None = None) -> OfficialLists:
    """Our lists from Kinetics CSVs (``label,youtube_id,time_start,time_end,split``, any column order, more columns
    ignored), one per CSV (``train.txt`` / ``val.txt`` / ``test.txt`` after its ``split`` column, else the CSV's name),
    with the paths of the videos found under ``root`` (``{youtube_id}_{start:06d}_{end:06d}.*``, else
    ``{youtube_id}.*``, in any subfolder). Videos not found are left out and kept in ``missing`` (their CSV rows).

    Class ids: the labels of all the CSVs sorted (``kinetics_<C>_labels.csv``), or those of ``classes`` (a class CSV,
    e.g. the one written for the train split, so that ``val`` gets the same ids)."""
    if not csv_files:
        raise ValueError("give at least one Kinetics CSV")
    index = index_videos(root)
    tables: list[tuple[Path, list[str], list[tuple[int, dict[str, str]]]]] = []
    for f in csv_files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"Kinetics CSV not found: {path}" if not path.exists() else f"{path} is a folder; give the CSV files")
        reader = csv.DictReader(io.StringIO(_read_utf8(path, "a Kinetics CSV"), newline=""))
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        need = {"youtube_id", "time_start", "time_end"} - set(header)
        if need:
            shown = ",".join(header)
            hint = "; this is JSON (Something-Something v2's?): convert it with mergevid data lists ssv2" if shown.lstrip().startswith(("[", "{")) else ""
            raise ValueError(f"{path}: expected the columns label,youtube_id,time_start,time_end,split of an official Kinetics CSV; "
                             f"no {', '.join(sorted(need))} in the header {quoted_excerpt(shown)}{hint}")
        if "label" not in header:
            raise ValueError(f"{path} has no label column (a test split whose labels were not released): there is no "
                             "annotation list to make from it")
        tables.append((path, header, list(enumerate(reader, 2))))
    if classes is not None:
        class_names = list(read_class_names(classes))
    else:
        class_names = sorted({row["label"].strip() for _, _, rows in tables for _, row in rows if row["label"].strip()})
    ids = {n: i for i, n in enumerate(class_names)}
    out = OfficialLists(lists={}, class_names=class_names, class_csv=f"kinetics_{len(class_names)}_labels.csv")
    for path, header, rows in tables:
        name = _split_name({row.get("split", "") or "" for _, row in rows}, path) + ".txt"
        if name in out.lists:
            raise ValueError(f"{path}: two CSVs make {name}; convert them in separate runs (--out)")
        records, lost = [], []
        for lineno, row in rows:
            label = row["label"].strip()
            if not label:
                raise ValueError(f"{path}:{lineno}: no label (a test split whose labels were not released?)")
            if label not in ids:
                raise ValueError(f"{path}:{lineno}: label {label!r} is not a class of {classes}")
            yid = row["youtube_id"].strip()
            start = _seconds(row["time_start"], path, lineno, "time_start")
            end = _seconds(row["time_end"], path, lineno, "time_end")
            found = index.get(f"{yid}_{start:06d}_{end:06d}") or index.get(yid)
            if not found:
                lost.append(row)
                continue
            if len(found) > 1:  # the same clip under several folders: the one in this label's folder
                folders = {label, label.replace(" ", "_")}
                found = [p for p in found if set(p.split("/")[:-1]) & folders] or found
            records.append(VideoRecord(path=found[0], label=ids[label]))
        if not rows:
            raise ValueError(f"{path} has no videos")
        if not records:
            first = lost[0]
            raise FileNotFoundError(f"none of the {len(rows)} videos of {path} is under {root} (the first would be "
                                    f"{first['youtube_id'].strip()}_{int(float(first['time_start'])):06d}_"
                                    f"{int(float(first['time_end'])):06d}.mp4 or {first['youtube_id'].strip()}.mp4, in any subfolder)")
        out.lists[name] = records
        (out.train if name == "train.txt" else out.test).append(name)
        if lost:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=header, lineterminator="\n", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(lost)
            out.missing[name] = MissingVideos(f"{Path(name).stem}_missing.csv", buf.getvalue().splitlines(), len(lost), len(rows))
    return out


# ------------------------------------------------------------------------------------------------ SSv2
def _json(path: Path) -> object:
    try:
        return json.loads(_read_utf8(path, "a JSON file"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def ssv2_class_name(template: str) -> str:
    """The SSv2 class of a video's ``template``: the brackets removed (``Holding [something] next to [something]``
    -> ``Holding something next to something``), as ``something-something-v2-labels.json`` names it."""
    return template.replace("[", "").replace("]", "")


def ssv2_lists(json_files: list[str | os.PathLike]) -> OfficialLists:
    """Our lists from Something-Something v2's JSON: ``something-something-v2-labels.json`` (class name -> id) and
    the train / validation files (``train.txt`` / ``val.txt``, paths ``<id>.webm``); the class CSV ``ssv2_labels.csv``
    has labels.json's ids and names (so ``data.flip_label_pairs`` of the official ids hold)."""
    labels: dict[str, int] | None = None
    splits: list[tuple[Path, list]] = []
    for f in json_files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"SSv2 JSON not found: {path}" if not path.exists() else f"{path} is a folder; give the JSON files")
        data = _json(path)
        if isinstance(data, dict):
            if labels is not None:
                raise ValueError(f"{path}: a second labels file (a JSON object); give something-something-v2-labels.json once")
            try:
                labels = {str(k): int(v) for k, v in data.items()}
            except (TypeError, ValueError):
                raise ValueError(f"{path}: expected {{\"class name\": \"id\", ...}} (something-something-v2-labels.json)") from None
            if sorted(labels.values()) != list(range(len(labels))):
                raise ValueError(f"{path}: class ids must be 0..{len(labels) - 1}, each once")
        elif isinstance(data, list):
            splits.append((path, data))
        else:
            raise ValueError(f"{path}: expected the labels (a JSON object) or a split (a JSON list of videos)")
    if labels is None:
        raise ValueError("give something-something-v2-labels.json too: it has the class ids")
    if not splits:
        raise ValueError("give the train and/or validation JSON (something-something-v2-train.json, -validation.json)")
    by_id = {i: n for n, i in labels.items()}
    out = OfficialLists(lists={}, class_names=[by_id[i] for i in range(len(by_id))], class_csv="ssv2_labels.csv")
    for path, items in splits:
        stem = path.stem.removeprefix("something-something-v2-")
        name = {"validation": "val", "valid": "val"}.get(stem, stem) + ".txt"
        if name in out.lists:
            raise ValueError(f"{path}: two JSON files make {name}")
        records = []
        for n, item in enumerate(items):
            if not isinstance(item, dict) or "id" not in item:
                raise ValueError(f"{path}: video {n} is not an object with an 'id': {item!r}")
            if "template" not in item:
                raise ValueError(f"{path}: video {n} (id {item['id']}) has no 'template' (the test set's labels are not "
                                 "public): there is no annotation list to make from it")
            cls = ssv2_class_name(str(item["template"]))
            if cls not in labels:
                raise ValueError(f"{path}: video {n} (id {item['id']}): class {cls!r} (from the template "
                                 f"{item['template']!r}) is not in the labels file")
            records.append(VideoRecord(path=f"{item['id']}.webm", label=labels[cls]))
        if not records:
            raise ValueError(f"{path} has no videos")
        out.lists[name] = records
        (out.train if name == "train.txt" else out.test).append(name)
    return out
