"""VideoDataset: items, multi-view protocols, determinism, annotation formats, few-shot, bad-data policies."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from data_helpers import (cut_file, frame_ids, tiny_synthetic, write_bad_files, write_frame_folder, write_level_video,  # noqa: F401
                          write_noise_video, write_textured_video)

from mergekit_video.data import (VideoDataset, VideoReadError, VideoRecord, build_loader, collate_videos, few_shot_subset,
                                 read_annotation_list, read_class_names, write_class_names)
from mergekit_video.data.datasets import LabelError
from mergekit_video.data.readers import decord_available
from mergekit_video.data.watchdog import ReadTimeoutError


def make(ds_info, **kw):
    kw.setdefault("list_file", ds_info.train_list)
    kw.setdefault("root", ds_info.root)
    kw.setdefault("class_names", ds_info.class_names)
    kw.setdefault("input_size", 32)
    kw.setdefault("num_frames", 4)
    return VideoDataset(**kw)


def test_train_and_test_items(tiny_synthetic):
    tr = make(tiny_synthetic, train=True)
    assert len(tr) == 9 and tr.on_error == "resample"
    item = tr[4]
    assert item["frames"].shape == (4, 3, 32, 32) and item["frames"].dtype == torch.float32
    assert item["label"] == tr.records[4].label and item["index"] == 4
    te = make(tiny_synthetic, list_file=tiny_synthetic.val_list, train=False, num_clips=4, num_crops=3, short_side=40)
    assert te.on_error == "raise" and te.num_views == 12
    assert te[0]["frames"].shape == (12, 4, 3, 32, 32)  # 4x3 close-set views
    zs = make(tiny_synthetic, list_file=tiny_synthetic.novel_list, class_names=tiny_synthetic.novel_class_names, train=False,
              num_clips=3, num_crops=1)
    assert zs[0]["frames"].shape == (3, 4, 3, 32, 32)  # 3x1 zero-shot views
    u8 = make(tiny_synthetic, train=True, normalize=False)[4]["frames"]
    assert u8.dtype == torch.uint8 and u8.shape == (4, 3, 32, 32)


def test_views_are_clip_major(tiny_synthetic):
    kw = {"list_file": tiny_synthetic.val_list, "train": False, "short_side": 40}
    v43 = make(tiny_synthetic, num_clips=4, num_crops=3, **kw)[1]["frames"]
    v41 = make(tiny_synthetic, num_clips=4, num_crops=1, **kw)[1]["frames"]
    v13 = make(tiny_synthetic, num_clips=1, num_crops=3, **kw)[1]["frames"]
    grid = v43.view(4, 3, *v43.shape[1:])  # [clip, crop, T, 3, H, W]
    assert torch.equal(grid[:, 1], v41)  # the centre crop of every clip
    assert not torch.equal(grid[0, 0], grid[0, 2])  # left and right crops differ (landscape 48x64 frames)
    assert v13.shape == (3, 4, 3, 32, 32)


def test_items_are_reproducible_from_seed_epoch_and_index(tiny_synthetic):
    a, b = make(tiny_synthetic, train=True, seed=3), make(tiny_synthetic, train=True, seed=3)
    assert torch.equal(a[(2, 5)]["frames"], b[(2, 5)]["frames"])
    assert torch.equal(a[2]["frames"], a[(2, 0)]["frames"])
    assert not torch.equal(a[(2, 5)]["frames"], a[(2, 6)]["frames"])  # another epoch, another view
    assert not torch.equal(a[(2, 5)]["frames"], make(tiny_synthetic, train=True, seed=4)[(2, 5)]["frames"])


def test_same_batches_whatever_the_worker_count(tiny_synthetic):
    ds = make(tiny_synthetic, train=True, seed=1)
    runs = []
    for workers in (0, 2):
        loader = build_loader(ds, batch_size=4, num_workers=workers, shuffle=True, seed=11, drop_last=False, persistent_workers=False)
        loader.sampler.set_epoch(2)
        runs.append(list(loader))
    assert len(runs[0]) == len(runs[1]) == 3
    for x, y in zip(*runs):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["frames"], y["frames"]) and x["failed"] == []
    assert runs[0][0]["frames"].shape == (4, 4, 3, 32, 32)


def test_resume_mid_epoch_reproduces_the_remaining_batches(tiny_synthetic):
    ds = make(tiny_synthetic, train=True, seed=2)
    full = build_loader(ds, batch_size=2, num_workers=0, shuffle=True, seed=5, drop_last=True)
    full.sampler.set_epoch(1)
    want = list(full)
    resumed = build_loader(ds, batch_size=2, num_workers=0, shuffle=True, seed=5, drop_last=True)
    resumed.sampler.set_epoch(1)
    resumed.sampler.set_start(4)  # two batches done
    got = list(resumed)
    assert len(got) == len(want) - 2
    for x, y in zip(got, want[2:]):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["frames"], y["frames"])


def test_annotation_lists_and_class_csv(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nclass a/my video.mp4 3\n\nb/x.mp4 0\n")
    recs = read_annotation_list(lst)
    assert recs == [VideoRecord("class a/my video.mp4", 3), VideoRecord("b/x.mp4", 0)]
    frames = tmp_path / "frames.txt"
    frames.write_text("vids/a 120 2\n")
    assert read_annotation_list(frames, "frames") == [VideoRecord("vids/a", 2, 120)]
    lst.write_text("a.mp4 zero\n")
    with pytest.raises(ValueError, match=r"list.txt:1"):
        read_annotation_list(lst)
    csv = tmp_path / "labels.csv"
    csv.write_text('id,name\n1,"Baby, Crawling"\n0,Archery\n')
    assert read_class_names(csv) == ["Archery", "Baby, Crawling"]
    csv.write_text("id,name\n0,a\n2,c\n")
    with pytest.raises(ValueError, match="missing"):
        read_class_names(csv)
    csv.write_text("id,name\n0,a\n0,b\n")
    with pytest.raises(ValueError, match="duplicate"):
        read_class_names(csv)


def test_labels_and_frame_counts_must_be_plain_decimal_numbers(tmp_path):
    """int() read '1_0' as label 10, and took '+1' and non-ASCII digits ('١', '５') as labels."""
    lst = tmp_path / "list.txt"
    for field in ("1_0", "+1", "\u0661", "\uff15", "1.5", "0x1", "1e2"):
        lst.write_text(f"a.mp4 0\nvideos/good.mp4 {field}\n")
        with pytest.raises(ValueError) as info:
            read_annotation_list(lst)
        assert str(info.value) == (f"{lst}:2: label {field!r} is not a whole number (digits 0-9 only); expected "
                                   f"'relative/path.mp4 label' with integer fields, got 'videos/good.mp4 {field}'")
    lst.write_text("a.mp4 -1\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(lst))}:1: negative label -1$"):
        read_annotation_list(lst)
    lst.write_text("a.mp4 007\nb c.mp4 12\n")
    assert read_annotation_list(lst) == [VideoRecord("a.mp4", 7), VideoRecord("b c.mp4", 12)]
    frames = tmp_path / "frames.txt"
    frames.write_text("vids/a 1_20 2\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(frames))}:1: frame count '1_20' is not a whole number"):
        read_annotation_list(frames, "frames")


@pytest.mark.parametrize("backend", ["pyav"] + (["decord"] if decord_available() else []))
def test_a_video_cut_short_follows_the_error_policy(tmp_path, tiny_synthetic, backend):
    """A truncated mkv (the first half of its bytes) was read as a shorter video by decord, without a word."""
    cut = cut_file(write_noise_video(tmp_path / "full.mkv", 48), tmp_path / "cut.mkv")
    good = tiny_synthetic.root / read_annotation_list(tiny_synthetic.train_list)[0].path
    lst = tmp_path / "list.txt"
    lst.write_text(f"{good} 0\n{cut} 1\n")
    ds = make(tiny_synthetic, list_file=lst, root=tmp_path, train=False, on_error="skip", backend=backend)
    assert ds[0] is not None and ds[1] is None
    assert ds.failures[-1].path == str(cut) and "truncated (the header gives the video 1.92 s" in ds.failures[-1].error
    with pytest.raises(VideoReadError, match=rf"^{re.escape(str(cut))}: truncated \(the header gives the video 1.92 s"):
        make(tiny_synthetic, list_file=lst, root=tmp_path, train=False, on_error="raise", backend=backend)[1]


def test_class_csv_empty_names_and_negative_ids_are_refused_and_repeated_names_warned(tmp_path, caplog):
    """An empty name became the bare templates' text; -1 was reported only as a missing 1; two classes of one
    name got the same text features, silently."""
    import logging

    csv = tmp_path / "c.csv"
    csv.write_text("id,name\n0,red circle\n1,\n2,green square\n")
    with pytest.raises(ValueError) as info:
        read_class_names(csv)
    assert str(info.value) == f"{csv}:3: class 1 has an empty name"
    csv.write_text("id,name\n-1,a\n0,b\n")
    with pytest.raises(ValueError) as info:
        read_class_names(csv)
    assert str(info.value) == f"{csv}:2: class id -1 is negative; ids are 0..C-1"
    for bad in ("1_0", "+1", "\u0661", "1.0"):  # int() takes the first three (10, 1, 1)
        csv.write_text(f"id,name\n0,a\n{bad},b\n", encoding="utf-8")
        with pytest.raises(ValueError) as info:
            read_class_names(csv)
        assert str(info.value) == f"{csv}:3: class id {bad!r} is not a whole number (digits 0-9 only)"
    csv.write_text("id,name\n 0,a\n1 ,b\n")  # spaces around an id are fine
    assert read_class_names(csv) == ["a", "b"]
    csv.write_text("id,name\n0,b\n1,a\n2,B\n3,a\n")  # case and spacing do not tell names apart (CLIP's tokenizer ignores them)
    with caplog.at_level(logging.WARNING, logger="mergekit_video.data.annotations"):
        assert read_class_names(csv) == ["b", "a", "B", "a"]
    assert [r.getMessage() for r in caplog.records] == [
        f"{csv}: 2 names are shared by several classes (the first: classes 0, 2, 'b' / 'B'): CLIP's tokenizer ignores "
        "case and spacing, so those classes get the same text features and cannot be told apart"]
    caplog.clear()
    csv.write_text("id,name\n0,red  circle\n1,Red Circle\n2,a\n")
    with caplog.at_level(logging.WARNING, logger="mergekit_video.data.annotations"):
        read_class_names(csv)
    assert [r.getMessage() for r in caplog.records] == [
        f"{csv}: 1 name is shared by several classes (the first: classes 0, 1, 'red  circle' / 'Red Circle'): CLIP's tokenizer "
        "ignores case and spacing, so those classes get the same text features and cannot be told apart"]


def test_class_csv_with_more_than_two_header_columns_is_refused(tmp_path):
    """``id,name,extra`` was read silently, the extra column ending up in every name ("red circle,x")."""
    csv = tmp_path / "c.csv"
    csv.write_text("id,name,extra\n0,red circle,x\n1,green square,x\n")
    with pytest.raises(ValueError) as info:
        read_class_names(csv)
    assert str(info.value) == (f"{csv}: expected a header 'id,name' (two columns: a class id and its name), got 'id,name,extra' "
                               "(3 columns); remove the other columns (a name that contains a comma is quoted: 1,\"Baby, Crawling\")")
    csv.write_text("id,name,\n0,red,\n")  # a trailing comma (spreadsheet export) is a third column too
    with pytest.raises(ValueError, match="3 columns"):
        read_class_names(csv)
    csv.write_text('idx,label\n1,"Baby, Crawling"\n0,Archery\n')  # any two-column header; quoted commas stay in the name
    assert read_class_names(csv) == ["Archery", "Baby, Crawling"]
    csv.write_text("id,name\n0,Baby, Crawling\n")  # an unquoted comma under a two-column header: still one name
    assert read_class_names(csv) == ["Baby, Crawling"]


def test_class_csv_without_header_and_lists_with_a_byte_order_mark(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text("0,red\n1,green\n2,blue\n")  # no header: the first row is data, not to be dropped
    with pytest.raises(ValueError) as info:
        read_class_names(csv)
    assert str(info.value) == f"{csv}: expected a header 'id,name', got '0,red'"
    csv.write_bytes(b"\xef\xbb\xbf0,red\n")
    with pytest.raises(ValueError, match="got '0,red'$"):
        read_class_names(csv)
    csv.write_bytes(b"\xef\xbb\xbfid,name\n1,green\n0,red\n")
    assert read_class_names(csv) == ["red", "green"]
    csv.write_text("")
    with pytest.raises(ValueError) as info:
        read_class_names(csv)
    assert str(info.value) == f"{csv}: expected a header 'id,name'"
    bom = b"\xef\xbb\xbf"
    lst = tmp_path / "l.txt"
    lst.write_bytes(bom + b"a/clip one.mp4 0\nb.mp4 1\n")
    assert read_annotation_list(lst) == [VideoRecord("a/clip one.mp4", 0), VideoRecord("b.mp4", 1)]
    lst.write_bytes(bom + b"vids/a 120 2\n")
    assert read_annotation_list(lst, "frames") == [VideoRecord("vids/a", 2, 120)]


def test_lists_and_class_csvs_that_are_not_utf8_are_named_with_the_failing_line_and_byte(tmp_path):
    lst = tmp_path / "latin1.txt"
    lst.write_bytes("a.mp4 0\nb.mp4 1\ncaf\u00e9.mp4 2\n".encode("latin-1"))  # 0xe9 at offset 19, line 3
    with pytest.raises(ValueError, match=rf"^{lst}:3: an annotation list must be UTF-8 text; byte 0xe9 at offset 19 \(line 3\)"):
        read_annotation_list(lst)
    wide = tmp_path / "utf16.txt"
    wide.write_text("a.mp4 0\n", encoding="utf-16")  # FF FE a \0 ...
    with pytest.raises(ValueError, match=rf"{wide}:1: .*byte 0xff at offset 0 .*looks like UTF-16 .*Re-save the file as UTF-8"):
        read_annotation_list(wide)
    csv_file = tmp_path / "classes.csv"
    csv_file.write_bytes("id,name\n0,red\n1,ni\u00f1o\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{csv_file}:3: a class-name CSV must be UTF-8 text; byte 0xf1 at offset 18"):
        read_class_names(csv_file)
    csv_file.write_bytes("\ufeffid,name\r\n0,red\r\n1,ni\u00f1o\r\n".encode("utf-8"))  # UTF-8 with a BOM and CRLF still reads
    assert read_class_names(csv_file) == ["red", "ni\u00f1o"]
    lst.write_bytes("a.mp4 0\r\nb.mp4 1\rcaf\u00e9.mp4 2".encode("utf-8"))
    assert [(r.path, r.label) for r in read_annotation_list(lst)] == [("a.mp4", 0), ("b.mp4", 1), ("caf\u00e9.mp4", 2)]


def test_frame_folder_dataset_and_short_videos_repeat_frames_in_order(tmp_path):
    write_frame_folder(tmp_path / "v0", 5)
    write_frame_folder(tmp_path / "v1", 20)
    lst = tmp_path / "frames.txt"
    lst.write_text("v0 5 0\nv1 20 1\n")
    ds = VideoDataset(list_file=lst, root=tmp_path, list_format="frames", num_frames=8, train=False, input_size=16, normalize=False)
    assert ds.backend == "frames"
    reader_frames = ds._decode(ds.records[0], torch.Generator())
    assert frame_ids(reader_frames) == [0, 0, 1, 2, 2, 3, 4, 4]  # 5 frames, T=8: floor(5 * (x + 0.5) / 8), in order
    assert frame_ids(ds._decode(ds.records[1], torch.Generator())) == [1, 3, 6, 8, 11, 13, 16, 18]  # segment centres
    assert ds[1]["frames"].shape == (1, 8, 3, 16, 16)
    # the official MoTE test frames: the start of each segment, int(2.5 * x); a short video repeats frames
    official = VideoDataset(list_file=lst, root=tmp_path, list_format="frames", num_frames=8, train=False, input_size=16,
                            normalize=False, test_offsets="start")
    assert frame_ids(official._decode(official.records[1], torch.Generator())) == [0, 2, 5, 7, 10, 12, 15, 17]
    assert frame_ids(official._decode(official.records[0], torch.Generator())) == [0, 0, 1, 1, 2, 3, 3, 4]


def test_few_shot_subset_is_seeded_and_repeats_to_full_size():
    recs = [VideoRecord(f"c{c}/{i}.mp4", c) for c in range(5) for i in range(20)]
    a = few_shot_subset(recs, shots=4, seed=7, repeat_to_full=False)
    assert len(a) == 20 and all(sum(r.label == c for r in a) == 4 for c in range(5))
    assert a == few_shot_subset(list(reversed(recs))[::-1], shots=4, seed=7, repeat_to_full=False)  # same on every rank
    assert a != few_shot_subset(recs, shots=4, seed=8, repeat_to_full=False)
    full = few_shot_subset(recs, shots=4, seed=7)
    assert len(full) == 100 and full[:20] == a and full[20:40] == a  # 100 // 20 = 5 copies
    with pytest.raises(ValueError, match="fewer than shots"):
        few_shot_subset(recs, shots=21, seed=0)


def test_few_shot_of_a_dataset_keeps_its_settings(tiny_synthetic):
    ds = make(tiny_synthetic, train=True)
    sub = few_shot_subset(ds, shots=2, seed=0)
    assert isinstance(sub, VideoDataset) and len(sub) == 6 and sub.num_frames == ds.num_frames
    assert sub[0]["frames"].shape == (4, 3, 32, 32)


def test_few_shot_leaves_labels_outside_the_class_names_out_of_the_draw(tiny_synthetic, caplog):
    """A stray label (tolerated under resample) was a class of its own: one such line failed with
    'class 7 has 1 video, fewer than shots', two made a fourth class of bad items."""
    ds = make(tiny_synthetic, train=True)
    strays = ds.with_records(list(ds.records) + [VideoRecord("stray.mp4", 7), VideoRecord("stray2.mp4", 7)])
    with caplog.at_level("WARNING", logger="mergekit_video.data.annotations"):
        sub = few_shot_subset(strays, shots=2, seed=0, repeat_to_full=False)
    assert sub.records == few_shot_subset(ds, shots=2, seed=0, repeat_to_full=False).records
    assert sorted(r.label for r in sub.records) == [0, 0, 1, 1, 2, 2]
    assert "2 videos with a label outside the 3 class names left out" in caplog.text


@pytest.fixture()
def bad_list(tmp_path, tiny_synthetic):
    """Two good videos then: truncated, zero-byte, text-as-mp4, missing, and a label out of range."""
    bad = write_bad_files(tmp_path / "bad")
    good = [r for r in read_annotation_list(tiny_synthetic.train_list)][:2]
    lines = [f"{tiny_synthetic.root / r.path} {r.label}" for r in good]
    lines += [f"{bad[k]} 0" for k in ("truncated", "zero", "text", "missing")]
    lines.append(f"{tiny_synthetic.root / good[0].path} 7")  # label 7 with 3 classes
    lst = tmp_path / "bad.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst, bad


def bad_dataset(bad_list, tiny_synthetic, **kw):
    """The bad list's dataset; its label-7 record comes in through ``with_records`` (a list with it is refused at
    construction, see test_a_list_whose_labels_go_past_the_class_csv_is_refused_at_construction), the per-item check's case."""
    records = read_annotation_list(bad_list[0])
    in_range = [VideoRecord(r.path, min(r.label, 2), r.num_frames) for r in records]
    ds = VideoDataset(list_file=bad_list[0], root="/", class_names=tiny_synthetic.class_names, num_frames=4, input_size=16,
                      records=in_range, **kw)
    return ds.with_records(records)


def test_a_list_whose_labels_go_past_the_class_csv_is_refused_at_construction(bad_list, tiny_synthetic, tmp_path):
    """A wrong class CSV (fewer classes than the list's labels) was met one video at a time: an eval failed at its first
    video, or under on_error=skip scored nothing (0% top-1, exit 0); training trained on with a warning per video."""
    with pytest.raises(ValueError) as info:
        VideoDataset(list_file=bad_list[0], root="/", class_names=list(tiny_synthetic.class_names), num_frames=4,
                     input_size=16, train=False, on_error="raise")  # a plain list: no CSV to name
    assert type(info.value) is ValueError  # not a bad-data error that on_error would skip past
    assert str(info.value).startswith(f"{bad_list[0]}: labels go up to 7, but there are only 3 class names (ids 0..2); "
                                      "1 of 7 videos has a label >= 3 (first: ")
    assert str(info.value).endswith("with label 7). Wrong class CSV for this list? Give the class CSV that belongs to bad.txt.")
    # under skip/resample a stray line (up to 1% of the list) is a bad item: logged at construction, then skipped or
    # resampled when drawn, as issue 4 asks of labels out of range
    lines = bad_list[0].read_text().splitlines()
    large = tmp_path / "large.txt"
    large.write_text("\n".join(lines[:1] * 99 + lines[-1:]) + "\n")  # 99 good lines, then label 7
    for train, on_error in ((False, "skip"), (True, "resample")):
        ds = VideoDataset(list_file=large, root="/", class_names=list(tiny_synthetic.class_names), num_frames=4,
                          input_size=16, train=train, on_error=on_error)
        assert len(ds) == 100
        if on_error == "skip":
            assert ds[99] is None and ds.failures[-1].path.endswith(read_annotation_list(large)[99].path)
    # more than that is a list and CSV that do not belong together, whatever the policy (1 of 7 here)
    with pytest.raises(ValueError, match=r"1 of 7 videos has a label >= 3 .* More than 1% of the list "
                                         r"is refused under on_error=resample too\.$"):
        VideoDataset(list_file=bad_list[0], root="/", class_names=list(tiny_synthetic.class_names), num_frames=4,
                     input_size=16, train=True, on_error="resample")
    two = tmp_path / "two.csv"
    write_class_names(two, ["a", "b"])
    with pytest.raises(ValueError, match=rf"labels go up to 2, but there are only 2 class names \(ids 0..1, from the class CSV "
                                         rf"{re.escape(str(two))}\); \d+ of \d+ videos have a label >= 2 .*Wrong class CSV"):
        make(tiny_synthetic, train=False, class_names=two)
    with pytest.raises(ValueError, match=re.escape(str(two))):  # names read by the caller still name their CSV
        make(tiny_synthetic, train=False, class_names=read_class_names(two))
    assert len(make(tiny_synthetic, train=False, class_names=tiny_synthetic.class_csv)) > 0  # the right CSV passes
    assert len(make(tiny_synthetic, train=False, class_names=None)) > 0  # no class names: nothing to check


def test_on_error_raise_names_the_file(bad_list, tiny_synthetic):
    ds = bad_dataset(bad_list, tiny_synthetic, train=False)
    assert ds.on_error == "raise"
    for i, kind in zip(range(2, 6), ("truncated", "zero", "text", "missing")):
        with pytest.raises(VideoReadError, match=str(bad_list[1][kind])):
            ds[i]
    with pytest.raises(LabelError, match="label 7 out of range for 3 classes"):
        ds[6]
    assert ds.error_count == 5 and [f.action for f in ds.failures] == ["raise"] * 5


def test_on_error_skip_drops_items_and_reports_their_paths(bad_list, tiny_synthetic):
    ds = bad_dataset(bad_list, tiny_synthetic, train=False, on_error="skip")
    assert ds[0] is not None and ds[3] is None
    loader = build_loader(ds, batch_size=4, num_workers=2, shuffle=False, seed=0, drop_last=False, persistent_workers=False)
    batches = list(loader)
    assert [b["frames"].shape[0] for b in batches] == [2, 0]
    failed = [p for b in batches for p in b["failed"]]
    bad = bad_list[1]
    assert sorted(failed[:2]) == sorted([str(bad["truncated"]), str(bad["zero"])])
    assert set(failed) == {str(bad[k]) for k in ("truncated", "zero", "text", "missing")} | {ds.records[6].path}
    assert len(failed) == 5 and batches[1]["label"].numel() == 0
    assert batches[1]["frames"].shape == (0, 1, 4, 3, 16, 16) == (0, *ds.item_shape)  # keeps its rank
    # in-process, the dataset keeps the records
    assert collate_videos([ds[2], ds[0]])["failed"] == [str(bad["truncated"])]
    assert ds.error_count == 2


def test_on_error_resample_logs_once_and_is_deterministic(bad_list, tiny_synthetic, caplog):
    ds = bad_dataset(bad_list, tiny_synthetic, train=True, seed=4)
    assert ds.on_error == "resample"
    with caplog.at_level(logging.WARNING, logger="mergekit_video.data"):
        items = [ds[(i, 0)] for i in range(7)] + [ds[(3, 0)]]
    assert all(it is not None and it["frames"].shape == (4, 3, 16, 16) for it in items)
    assert all(it["index"] in (0, 1) for it in items[2:])  # replaced by a good video
    assert torch.equal(items[3]["frames"], items[-1]["frames"])  # same key, same replacement
    paths = [f.path for f in ds.failures]
    assert ds.error_count == len(paths) >= 5
    logged = [r for r in caplog.records if "bad video" in r.getMessage()]
    assert len(logged) == len(set(paths))  # once per file
    batch = collate_videos([ds[(2, 1)], ds[(0, 1)]])
    assert batch["frames"].shape[0] == 2 and str(bad_list[1]["truncated"]) in batch["resampled"]


def test_skipped_items_carry_their_list_index_so_duplicate_lines_count_apart(bad_list, tiny_synthetic, tmp_path):
    bad, good = bad_list[1], tiny_synthetic.root / read_annotation_list(tiny_synthetic.train_list)[0].path
    lst = tmp_path / "dup.txt"
    lst.write_text(f"{good} 0\n{bad['zero']} 0\n{good} 1\n{bad['zero']} 0\n{bad['text']} 2\n")  # zero.mp4 on lines 1 and 3
    ds = VideoDataset(list_file=lst, root="/", num_frames=4, input_size=16, train=False, on_error="skip")
    batches = list(build_loader(ds, batch_size=2, num_workers=2, shuffle=False, seed=0, drop_last=False, persistent_workers=False))
    failed = [p for b in batches for p in b["failed"]]
    failed_index = [i for b in batches for i in b["failed_index"]]
    assert failed_index == [1, 3, 4] and failed == [str(bad["zero"]), str(bad["zero"]), str(bad["text"])]
    assert (len(set(failed)), len(set(failed_index))) == (2, 3)  # 3 videos of the list failed, 2 files
    assert [b["index"].tolist() for b in batches] == [[0], [2], []]


def test_data_errors_cross_the_worker_boundary_as_themselves(bad_list, tiny_synthetic):
    import pickle

    for err in (LabelError("x.mp4: label 7 out of range", path="x.mp4"), VideoReadError("y.mp4: empty", path="y.mp4"),
                ReadTimeoutError("z.mp4: no result", path="z.mp4")):
        back = pickle.loads(pickle.dumps(err))
        assert (type(back), str(back), back.path) == (type(err), str(err), err.path)
        assert type(type(err)("message only")) is type(err)  # how torch rebuilds a worker's error
    ds = bad_dataset(bad_list, tiny_synthetic, train=False)  # on_error: raise
    label_only = ds.with_records([ds.records[6]])  # label 7 with 3 classes
    with pytest.raises(LabelError, match=r"(?s)in DataLoader worker process 0.*label 7 out of range for 3 classes"):  # was RuntimeError
        next(iter(build_loader(label_only, batch_size=1, num_workers=1, shuffle=False, seed=0, drop_last=False)))


def test_failures_of_direct_item_calls_do_not_leak_into_a_later_batch(bad_list, tiny_synthetic):
    bad = bad_list[1]
    resampling = bad_dataset(bad_list, tiny_synthetic, train=True, seed=4)
    skipping = bad_dataset(bad_list, tiny_synthetic, train=False, on_error="skip")
    item = resampling[(3, 0)]  # zero.mp4 replaced, never collated
    assert item["resampled"] == [str(bad["zero"]), str(bad["text"])] and item["index"] in (0, 1)  # zero -> text -> good
    assert skipping[2] is None  # truncated.mp4 skipped, never collated
    good = make(tiny_synthetic, train=False, on_error="skip")
    batches = list(build_loader(good, batch_size=3, num_workers=0, shuffle=False, seed=0, drop_last=False))
    assert [(len(b["index"]), b["failed"], b["resampled"], b["errors"]) for b in batches] == [(3, [], [], {})] * 3  # was: the leftovers in batch 1
    assert resampling[(0, 0)].keys() == {"frames", "label", "index"}  # a good item has no bookkeeping keys
    both = collate_videos([skipping[2], resampling[(3, 0)], skipping[4]])
    assert (both["failed"], both["resampled"], both["errors"]) == ([str(bad["truncated"]), str(bad["text"])], item["resampled"], {})


def test_hung_reads_hit_the_time_limit(tmp_path, tiny_synthetic, monkeypatch):
    import time

    import mergekit_video.data.datasets as datasets_mod

    def stuck(*args, **kwargs):
        time.sleep(2)

    ds = make(tiny_synthetic, train=False, read_timeout_s=0.2)
    monkeypatch.setattr(datasets_mod, "open_video", stuck)
    monkeypatch.setattr(datasets_mod, "_TIMED_OUT", {})  # the files this test hangs stay readable for the others
    t0 = time.perf_counter()
    with pytest.raises(ReadTimeoutError, match=str(ds.path_of(0))):
        ds[0]
    ds.on_error = "skip"
    assert ds[1] is None
    assert time.perf_counter() - t0 < 1.5 and ds.error_count == 2


def test_a_file_that_timed_out_is_not_read_again_and_resampling_passes_over_it(tiny_synthetic, monkeypatch, caplog):
    import threading

    import mergekit_video.data.datasets as datasets_mod

    real_open = datasets_mod.open_video
    hung = threading.Event()
    reads = {"hung": 0}

    def open_or_hang(path, **kw):
        if path == hang_path:
            reads["hung"] += 1
            hung.wait(5)  # a decoder that never returns (until the test ends)
        return real_open(path, **kw)

    ds = make(tiny_synthetic, train=True, read_timeout_s=0.2, seed=1)
    hang_path = ds.path_of(2)
    monkeypatch.setattr(datasets_mod, "open_video", open_or_hang)
    monkeypatch.setattr(datasets_mod, "_TIMED_OUT", {})
    try:
        with caplog.at_level(logging.WARNING, logger="mergekit_video.data"):
            items = [ds[(2, e)] for e in range(20)]  # was: 20 reads of 0.2 s, each leaving a stuck thread (crash after 16)
        assert reads["hung"] == 1 and ds.error_count >= 20  # 20 keys, and resample draws that land on it again
        assert all(f.path == str(hang_path) for f in ds.failures)
        assert [f.error for f in ds.failures[1:]] == [f"{hang_path}: not read again, its read timed out earlier in this process "
                                                      f"({ds.failures[0].error})"] * (ds.error_count - 1)
        assert sum("bad video" in r.getMessage() for r in caplog.records) == 1  # logged once
        assert all(it["index"] != 2 for it in items)
        # the replacement of a known-bad item is the one a process that never met the file picks
        fresh = ds.with_records(ds.records)
        monkeypatch.setattr(datasets_mod, "_TIMED_OUT", {})
        monkeypatch.setattr(datasets_mod, "open_video", lambda path, **kw: (_ for _ in ()).throw(VideoReadError("bad", path=path))
                            if path == hang_path else real_open(path, **kw))
        assert [fresh[(2, e)]["index"] for e in range(20)] == [it["index"] for it in items]
        assert fresh.error_count == ds.error_count
        with pytest.raises(ReadTimeoutError, match="not read again"):
            datasets_mod._TIMED_OUT[str(hang_path)] = "earlier"
            make(tiny_synthetic, train=False, read_timeout_s=0.2)[2]  # another dataset of the process: fails at once
    finally:
        hung.set()


def test_dataset_validates_arguments(tiny_synthetic):
    with pytest.raises(ValueError, match=r"on_error='resample' is for training only: at test time it would score another video"):
        make(tiny_synthetic, train=False, on_error="resample")
    assert [make(tiny_synthetic, train=False, on_error=p).on_error for p in ("skip", "raise")] == ["skip", "raise"]
    with pytest.raises(ValueError, match="num_clips and num_crops must be 1"):
        make(tiny_synthetic, train=True, num_clips=2)
    with pytest.raises(ValueError, match="on_error"):
        make(tiny_synthetic, train=False, on_error="ignore")
    with pytest.raises(ValueError, match="list_format"):
        make(tiny_synthetic, train=False, list_format="csv")
    with pytest.raises(FileNotFoundError):
        make(tiny_synthetic, train=False, list_file=tiny_synthetic.root / "nope.txt")
    with pytest.raises(IndexError):
        make(tiny_synthetic, train=False)[99]
    assert make(tiny_synthetic, train=False, class_names=tiny_synthetic.class_csv).class_names == tiny_synthetic.class_names


def test_bad_videos_met_by_several_workers_are_logged_once_by_the_main_process(bad_list, tiny_synthetic, caplog):
    from mergekit_video.data.failures import note_batch_failures

    ds = bad_dataset(bad_list, tiny_synthetic, train=True, seed=1)  # on_error: resample
    loader = build_loader(ds, batch_size=2, num_workers=2, shuffle=True, seed=0, drop_last=False)
    seen: set[str] = set()
    met = 0
    with caplog.at_level(logging.WARNING, logger="mergekit_video.data"):
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            for batch in loader:
                assert set(batch["errors"]) == set(batch["resampled"])  # each bad path with its reason
                assert all(path in reason for path, reason in batch["errors"].items() if "label" not in reason)
                met += len(batch["resampled"])
                note_batch_failures(batch, seen)
    bad = {str(bad_list[1][k]) for k in ("truncated", "zero", "text", "missing")}
    assert bad <= seen and met >= 2 * len(bad)  # met in both epochs
    logged = [r.getMessage() for r in caplog.records if "bad video" in r.getMessage()]
    assert len(logged) == len(seen)  # once per file


def test_synthetic_overwrite_removes_the_lists_the_new_dataset_does_not_write(tmp_path):
    from mergekit_video.data import write_synthetic_dataset
    from mergekit_video.data.synthetic import synthetic_layout

    root = tmp_path / "syn"
    small = {"videos_per_class": 1, "frames": 4, "size": (32, 32)}
    first = write_synthetic_dataset(root, num_classes=2, val_per_class=1, num_novel_classes=1, **small)
    assert first.val_list is not None and first.novel_list is not None
    (root / "notes.txt").write_text("mine")
    again = write_synthetic_dataset(root, num_classes=1, val_per_class=0, num_novel_classes=0, overwrite=True, **small)
    assert (again.val_list, again.novel_list, again.novel_class_csv) == (None, None, None)
    assert synthetic_layout(root).val_list is None  # read back: no stale val.txt naming deleted videos
    assert sorted(p.name for p in root.iterdir()) == ["classes.csv", "notes.txt", "synthetic.json", "train.txt", "videos"]
    assert sorted(p.name for p in (root / "videos").iterdir()) == ["train"]
    for bad, needle in [({"fps": 0}, "fps must be > 0"), ({"noise": -1}, r"noise must be in \[0, 64\] pixel levels"),
                        ({"noise": 64.5}, r"noise must be in \[0, 64\] pixel levels .*0-255 scale\), got 64.5"),
                        ({"noise": float("nan")}, "noise must be"), ({"texture": 5}, r"texture must be in \[0, 1\]")]:
        with pytest.raises(ValueError, match=needle):
            write_synthetic_dataset(tmp_path / "bad", num_classes=1, **small, **bad)


def test_the_benchmarks_raw_clip_settings_pass_the_synthetic_checks(tmp_path):
    from mergekit_video.data import write_synthetic_dataset
    from mergekit_video.data.bench import RAW_CLIP

    assert RAW_CLIP["noise"] == 6.0  # pixel levels: refused by the old [0, 1] check, so `mergevid bench data` failed
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    # every argument check passes; only the root (checked last, before any rendering) is refused
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        write_synthetic_dataset(not_a_folder, num_classes=6, videos_per_class=2, val_per_class=0, num_novel_classes=0,
                                frames=RAW_CLIP["frames"], size=RAW_CLIP["size"], fps=RAW_CLIP["fps"], gop=None,
                                texture=RAW_CLIP["texture"], noise=RAW_CLIP["noise"], preset=None, crf=None, overwrite=True)


def test_counts_of_one_in_data_messages_are_singular(tmp_path, tiny_synthetic):
    from mergekit_video.data.readers import _plan

    one = make(tiny_synthetic, train=False, class_names=["only"], records=[VideoRecord("a.mp4", 0)])
    with pytest.raises(IndexError, match=r"index 3 out of range for 1 video in "):
        one[3]
    with pytest.raises(LabelError, match=r"label 1 out of range for 1 class$"):  # records given later: the per-item check
        one.with_records([VideoRecord("a.mp4", 1)])[0]
    with pytest.raises(ValueError, match=r"class 0 has 1 video, fewer than shots=2$"):
        few_shot_subset([VideoRecord("a.mp4", 0)], shots=2, seed=0)
    with pytest.raises(IndexError, match=r"out of range for 1 frame$"):
        _plan([0, 1], 1, "x.mp4")


def test_flip_label_pairs_swap_the_label_of_exactly_the_flipped_clips(tmp_path):
    """SSv2-style flips (TSM, official MoTE): a flipped clip of class a is labelled b and back."""
    for k in range(3):
        write_textured_video(tmp_path / f"v{k}.mp4", 16, seed=k)  # random texture: no clip is its own mirror image
    (tmp_path / "list.txt").write_text("".join(f"v{k}.mp4 {k}\n" for k in range(3)))

    def make3(**kw):
        return VideoDataset(list_file=tmp_path / "list.txt", root=tmp_path, num_frames=4, train=True, class_names=["a", "b", "c"],
                            input_size=32, normalize=False, seed=5, **kw)

    swapped, unflipped = make3(flip_label_pairs=[[0, 1]]), make3(flip=False)  # the same draws, one never flips
    seen = set()
    for epoch in range(8):
        for i, record in enumerate(swapped.records):
            a, b = swapped[(i, epoch)], unflipped[(i, epoch)]
            flipped = not torch.equal(a["frames"], b["frames"])
            if flipped:
                assert torch.equal(a["frames"], b["frames"].flip(-1))
            expected = {0: 1, 1: 0}.get(record.label, record.label) if flipped else record.label
            assert (a["label"], b["label"]) == (expected, record.label)
            seen.add((record.label in (0, 1), flipped))
    assert seen == {(True, True), (True, False), (False, True), (False, False)}
    with pytest.raises(ValueError, match="class id 99, but there are only 3 classes"):
        make3(flip_label_pairs=[[0, 99]])
    with pytest.raises(ValueError, match="need train=True and flip=True"):
        make3(flip=False, flip_label_pairs=[[0, 1]])
    with pytest.raises(ValueError, match="class id 1 is in two pairs"):
        make3(flip_label_pairs=[[0, 1], [1, 2]])
    with pytest.raises(ValueError, match=r"flip_label_pairs\[0\] must be two distinct"):
        make3(flip_label_pairs=[[2, 2]])


def test_dense_sampling_at_test_spreads_clips_of_stride_spaced_frames(tmp_path):
    write_level_video(tmp_path / "v.mp4", 40)
    (tmp_path / "list.txt").write_text("v.mp4 0\n")
    ds = VideoDataset(list_file=tmp_path / "list.txt", root=tmp_path, num_frames=4, train=False, sampling="dense", stride=3,
                      num_clips=2, input_size=32, normalize=False)
    frames = ds[0]["frames"]  # [2, 4, 3, 32, 32]
    ids = [frame_ids(v.permute(0, 2, 3, 1)) for v in frames]
    assert all(b - a == 3 for v in ids for a, b in zip(v, v[1:]))  # 4 frames, 3 apart
    assert ids[0][0] == 0 and ids[1][-1] == 39  # the clips spread from the first frame to the last



def test_a_failed_synthetic_write_leaves_no_staging_folder(tmp_path, monkeypatch):
    """A failure (or Ctrl-C) while writing left a hidden .OUT.partial folder beside OUT; a bad gop failed only then."""
    from mergekit_video.data import synthetic

    with pytest.raises(ValueError, match=r"^gop must be an integer >= 1 \(frames between keyframes\), got 0$"):
        synthetic.write_synthetic_dataset(tmp_path / "syn", num_classes=2, videos_per_class=1, gop=0)
    assert not list(tmp_path.iterdir())  # refused before anything was written

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_synthetic_dataset(tmp_path / "syn", num_classes=2, videos_per_class=1, workers=1)
    assert not list(tmp_path.iterdir())


def test_hash_lines_are_comments_with_a_warning_when_they_read_as_entries(tmp_path, caplog):
    """HMDB-51 has videos named '#20_...avi': a '#' line stays a comment, but one that reads as an entry is named in a
    warning with the ./ spelling that lists it; write_annotation_list writes such paths that way."""
    from mergekit_video.data import write_annotation_list

    lst = tmp_path / "hmdb.txt"
    lst.write_text("# clap videos\n#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 3\nb/x.avi 0\n#2_Gum_chew_h_nm_np1_fr_med_0.avi 1\n# c.avi 2\n")
    with caplog.at_level(logging.WARNING, logger="mergekit_video.data.annotations"):
        assert read_annotation_list(lst) == [VideoRecord("b/x.avi", 0)]
    assert [r.getMessage() for r in caplog.records] == [
        f"{lst}:2: '#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 3' starts with '#', so it is a comment, not a video (and 1 more such "
        "line); to list a video whose name starts with '#', write its path as ./#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi "
        "(and a comment as '# ...')"]
    caplog.clear()
    lst.write_text("# a.avi 3\n#TODO: add 12 more\n#20 clips left\nb/x.avi 0\n")  # '# ' and non-entries: plain comments
    with caplog.at_level(logging.WARNING, logger="mergekit_video.data.annotations"):
        assert read_annotation_list(lst) == [VideoRecord("b/x.avi", 0)]
    assert not caplog.records
    frames = tmp_path / "frames.txt"
    frames.write_text("#20_clap 30 2\nb 10 0\n")
    with caplog.at_level(logging.WARNING, logger="mergekit_video.data.annotations"):
        assert read_annotation_list(frames, "frames") == [VideoRecord("b", 0, 10)]
    assert "write its path as ./#20_clap" in caplog.records[0].getMessage()
    caplog.clear()
    # the ./ spelling lists it; our writer uses it, so the list reads back whole, and the video loads
    write_annotation_list(lst, [VideoRecord("#20_clap.mp4", 1), VideoRecord("b.mp4", 0)])
    assert lst.read_text() == "./#20_clap.mp4 1\nb.mp4 0\n"
    assert read_annotation_list(lst) == [VideoRecord("./#20_clap.mp4", 1), VideoRecord("b.mp4", 0)] and not caplog.records
    write_level_video(tmp_path / "#20_clap.mp4", 16)
    write_level_video(tmp_path / "b.mp4", 16)
    ds = VideoDataset(list_file=lst, root=tmp_path, class_names=["a", "b"], train=False, num_frames=4, input_size=32)
    assert [ds[i]["label"] for i in range(2)] == [1, 0]
