"""Synthetic dataset, `data prepare` (GOP, short side, verification, resume, failures), CLI and bench plumbing."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
import signal

import numpy as np
import pytest
import torch
from data_helpers import (cut_file, frame_ids, tiny_synthetic, write_bad_files, write_frame_folder, write_good_variety,  # noqa: F401
                          write_level_video, write_noise_video, write_two_stream_video, zero_packet)

from mergekit_video.data import open_video, read_annotation_list, read_class_names, write_synthetic_dataset
from mergekit_video.data.encode import keyframe_indices, video_info
from mergekit_video.data.prepare import _prepare_one, prepare_dataset, target_size
from mergekit_video.data.readers import DecordReader, PyAVReader, decord_available
from mergekit_video.data.synthetic import COLOURS, class_catalogue, synthetic_layout


def test_synthetic_dataset_layout_and_classes(tiny_synthetic):
    ds = tiny_synthetic
    assert ds.class_names == ["red circle moving left", "red circle moving right", "green square moving up"]
    assert ds.novel_class_names == ["green square moving down", "blue triangle growing"]
    assert not set(ds.class_names) & set(ds.novel_class_names)
    assert read_class_names(ds.class_csv) == ds.class_names and read_class_names(ds.novel_class_csv) == ds.novel_class_names
    train, val, novel = (read_annotation_list(p) for p in (ds.train_list, ds.val_list, ds.novel_list))
    assert (len(train), len(val), len(novel)) == (9, 3, 2)
    assert [r.label for r in train] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and {r.label for r in novel} == {0, 1}
    info = video_info(ds.root / train[0].path)
    assert (info["width"], info["height"], info["frames"], info["codec"]) == (64, 48, 24, "h264")
    assert keyframe_indices(ds.root / train[0].path)[0] == [0]  # x264's default GOP (250) > 24 frames
    assert synthetic_layout(ds.root) == ds
    assert len({c for c in class_catalogue()}) == len(class_catalogue()) == 144


def test_synthetic_motion_is_what_the_class_name_says(tiny_synthetic):
    ds = tiny_synthetic
    red = torch.tensor(COLOURS["red"], dtype=torch.float32)
    for rec in read_annotation_list(ds.train_list)[:6:3]:  # one "moving left", one "moving right"
        frames = open_video(ds.root / rec.path, backend="pyav").get_frames([0, 23]).float()  # [2, H, W, 3]
        mask = ((frames - red).abs().sum(-1) < 90).float()  # red pixels
        xs = torch.arange(frames.shape[2], dtype=torch.float32)
        centre = [(m.sum(0) * xs).sum() / m.sum() for m in mask]
        moved = (centre[1] - centre[0]).item()
        assert (moved < -10) if "left" in ds.class_names[rec.label] else (moved > 10)


def test_synthetic_refuses_non_empty_root_and_is_seeded(tmp_path):
    root = tmp_path / "syn"
    root.mkdir()
    (root / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_dataset(root, num_classes=1, videos_per_class=1, val_per_class=0, num_novel_classes=0, frames=4, size=(16, 16))
    a = write_synthetic_dataset(tmp_path / "a", num_classes=1, videos_per_class=1, val_per_class=0, num_novel_classes=0, frames=6, size=(32, 32), seed=5)
    b = write_synthetic_dataset(tmp_path / "b", num_classes=1, videos_per_class=1, val_per_class=0, num_novel_classes=0, frames=6, size=(32, 32), seed=5)
    assert a.val_list is None and a.novel_list is None
    rel = read_annotation_list(a.train_list)[0].path
    fa = open_video(a.root / rel, backend="pyav").get_frames(range(6))
    assert torch.equal(fa, open_video(b.root / rel, backend="pyav").get_frames(range(6)))
    with pytest.raises(ValueError, match="even"):
        write_synthetic_dataset(tmp_path / "c", size=(31, 32))


@pytest.fixture()
def prepare_input(tmp_path, tiny_synthetic):
    """Three synthetic videos plus a missing and a zero-byte file, in one list."""
    bad = write_bad_files(tmp_path / "bad")
    good = read_annotation_list(tiny_synthetic.train_list)[:3]
    lst = tmp_path / "in.txt"
    lines = [f"{r.path} {r.label}" for r in good] + [f"{bad['missing']} 1", f"{bad['zero']} 2"]
    lst.write_text("\n".join(lines) + "\n")
    return lst, good


def test_prepare_sets_gop_and_short_side_verifies_and_resumes(tmp_path, tiny_synthetic, prepare_input):
    lst, good = prepare_input
    out = tmp_path / "prepared"
    rep = prepare_dataset(list_file=lst, root=tiny_synthetic.root, out_dir=out, short_side=32, gop=8, workers=2, progress=False)
    assert (rep.total, rep.encoded, rep.skipped, rep.failed) == (5, 3, 0, 2)
    report = json.loads(rep.report_path.read_text())
    assert {f["path"].rsplit("/", 1)[1] for f in report["failures"]} == {"missing.mp4", "zero.mp4"}
    new = read_annotation_list(rep.list_file)
    assert [(r.path, r.label) for r in new] == [(r.path, r.label) for r in good]  # failures left out, labels kept
    for r in new:
        path = out / r.path
        keys, n = keyframe_indices(path)  # packet keyframe flags
        assert n == 24 and keys == [0, 8, 16]
        info = video_info(path)
        assert (info["height"], info["width"]) == (32, 42)  # 48x64 -> short side 32, even width
        assert open_video(path, backend="pyav").get_frames([0, 23]).shape == (2, 32, 42, 3)
    mtimes = {r.path: (out / r.path).stat().st_mtime_ns for r in new}
    again = prepare_dataset(list_file=lst, root=tiny_synthetic.root, out_dir=out, short_side=32, gop=8, workers=1, progress=False)
    assert (again.encoded, again.skipped, again.failed) == (0, 3, 2)  # finished files skipped, failures retried and listed
    assert {r.path: (out / r.path).stat().st_mtime_ns for r in new} == mtimes
    with pytest.raises(ValueError, match="other settings"):
        prepare_dataset(list_file=lst, root=tiny_synthetic.root, out_dir=out, short_side=32, gop=4, progress=False)


def test_a_rerun_with_other_settings_names_what_changed_and_suggests_only_another_folder(tmp_path, tiny_synthetic, prepare_input):
    """Said "prepared with other settings {...}; ... or remove prepare_manifest.json": which setting changed was left to
    guess, and removing the manifest led to further refusals (the list and report "not written by" this command)."""
    lst, _ = prepare_input
    out = tmp_path / "prepared"
    prepare_dataset(list_file=lst, root=tiny_synthetic.root, out_dir=out, short_side=32, gop=8, workers=1, progress=False)
    with pytest.raises(ValueError) as info:
        prepare_dataset(list_file=lst, root=tiny_synthetic.root, out_dir=out, short_side=48, gop=8, workers=1, progress=False)
    assert str(info.value) == (f"{out} was prepared with other settings (short_side (--short-side) was 32, now 48); prepare into "
                               f"another output folder, or delete the folder {out} to prepare it again with these settings")
    with pytest.raises(ValueError, match=r"\(short_side \(--short-side\) was 32, now 48; gop \(--gop\) was 8, now 4; "
                                         r"fastdecode \(--fastdecode/--no-fastdecode\) was True, now False; crf was None, now 20\)"):
        prepare_dataset(list_file=lst, root=tiny_synthetic.root, out_dir=out, short_side=48, gop=4, fastdecode=False, crf=20,
                        progress=False)


def test_prepare_recovers_outputs_missing_from_the_manifest(tmp_path, tiny_synthetic, prepare_input):
    lst, good = prepare_input
    out = tmp_path / "prepared"
    prepare_dataset(list_file=lst, root=tiny_synthetic.root, out_dir=out, short_side=32, gop=8, workers=1, progress=False)
    manifest = json.loads((out / "prepare_manifest.json").read_text())
    first = good[0].path
    del manifest["files"][first]  # as if the run stopped before recording it
    (out / "prepare_manifest.json").write_text(json.dumps(manifest))
    rep = prepare_dataset(list_file=lst, root=tiny_synthetic.root, out_dir=out, short_side=32, gop=8, workers=1, progress=False)
    assert (rep.encoded, rep.skipped) == (0, 3)  # verified by decoding, not re-encoded


def test_cli_synth_and_prepare(tmp_path, capsys):
    from mergekit_video.cli.main import main

    root = tmp_path / "syn"
    assert main(["data", "synth", str(root), "--classes", "2", "--videos-per-class", "1", "--val-per-class", "0",
                 "--novel-classes", "0", "--frames", "8", "--size", "32x48"]) == 0
    assert read_class_names(root / "classes.csv") == ["red circle moving left", "red circle moving right"]
    assert main(["data", "synth", str(root), "--classes", "2"]) == 1  # refuses a non-empty folder
    assert "not empty" in capsys.readouterr().err
    with open(root / "train.txt", "a") as f:
        f.write("videos/missing.mp4 0\n")
    code = main(["data", "prepare", str(root / "train.txt"), str(tmp_path / "prep"), "--short-side", "16", "--gop", "4", "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 1 and "1 of 3 videos failed" in captured.err and "missing.mp4" in captured.err
    assert len(read_annotation_list(tmp_path / "prep" / "train.txt")) == 2
    # tune=fastdecode is on unless --no-fastdecode: the same folder again with it off is a change of settings
    args = [str(root / "train.txt"), str(tmp_path / "prep"), "--short-side", "16", "--gop", "4", "--workers", "1"]
    assert main(["data", "prepare", *args, "--no-fastdecode"]) == 1
    assert "fastdecode (--fastdecode/--no-fastdecode) was True, now False" in capsys.readouterr().err
    assert main(["data", "prepare", *args, "--fastdecode", "--no-fastdecode"]) != 0
    assert "--fastdecode and --no-fastdecode contradict each other" in capsys.readouterr().err


def test_bench_pipelines_decode_the_same_frames(tiny_synthetic):
    from mergekit_video.data.bench import _measure_set, _pipelines, _summarise, watchdog_overhead_us

    recs = read_annotation_list(tiny_synthetic.train_list)[:2]
    pipes = _pipelines(recs, tiny_synthetic.root, num_frames=4, input_size=32, seed=0)
    floor = pipes["floor_train"][0][1]  # [T, H, W, 3] uint8 at full size
    ours = pipes["ours_train"][0]
    import mergekit_video.data.datasets as dmod

    decoded = ours._decode(ours.records[1], dmod.item_generator(0, 0, 1, 0))
    assert torch.equal(decoded, floor)  # same indices from the same per-item generator
    assert pipes["naive_train"][0][1].shape == (4, 3, 32, 32) and pipes["naive_test"][0][0].shape == (4, 3, 32, 32)
    threads, seen = torch.get_num_threads(), []
    pipes["probe"] = (pipes["ours_train"][0], lambda batch: seen.append(torch.get_num_threads()) or pipes["ours_train"][1](batch))
    wall, cpu = _measure_set(pipes, num_videos=2, workers=0, batch_size=2, repeats=1, log=lambda s: None)
    assert all(len(v) == 1 and v[0] > 0 for v in wall.values())
    # in-process (workers=0) every pipeline gets one core, as the floor's decoder and each DataLoader worker have
    assert set(seen) == {1} and torch.get_num_threads() == threads
    summary = _summarise({k: [2.0] if k.startswith("ours") else [4.0] for k in wall}, 0)
    assert summary["fraction_of_decode_floor"] == 0.5 and summary["speedup_vs_naive"]["train"] == 0.5
    assert watchdog_overhead_us(calls=200) < 5000
    assert np.isfinite(list(cpu.values())[0][0])


def test_bench_floor_batches_clips_of_different_sizes(tmp_path, monkeypatch):
    """Raw datasets mix frame sizes: the decode floor copies them into one flat buffer instead of stacking."""
    import mergekit_video.data.bench as bench
    from mergekit_video.data.annotations import VideoRecord

    write_level_video(tmp_path / "a.mp4", 12, h=50, w=98)
    write_level_video(tmp_path / "b.mp4", 12, h=120, w=68)
    recs = [VideoRecord(path="a.mp4", label=0), VideoRecord(path="b.mp4", label=1)]
    pipes = {k: v for k, v in bench._pipelines(recs, tmp_path, num_frames=4, input_size=32, seed=0).items() if k.startswith("floor")}
    ds, collate = pipes["floor_test"]
    clips = [ds[0], ds[1]]
    batch = collate(clips)
    assert batch["shapes"].tolist() == [[4, 50, 98, 3], [4, 120, 68, 3]] and bench._batch_size(batch) == 2
    assert batch["frames"].dtype == torch.uint8 and torch.equal(batch["frames"], torch.cat([c.reshape(-1) for c in clips]))
    monkeypatch.setattr(bench, "get_worker_info", lambda: object())  # as in a DataLoader worker: written to shared memory
    assert batch["frames"].shape == (4 * (50 * 98 + 120 * 68) * 3,) and collate(clips)["frames"].is_shared()
    monkeypatch.undo()
    wall, _ = bench._measure_set(pipes, num_videos=2, workers=0, batch_size=2, repeats=1, log=lambda s: None)
    assert sorted(wall) == ["floor_test", "floor_train"] and all(len(v) == 1 and v[0] > 0 for v in wall.values())


class _WorkerPid(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        import os

        return torch.tensor(os.getpid())


def test_bench_passes_give_every_worker_a_batch(monkeypatch):
    import mergekit_video.data.bench as bench

    pids: list[int] = []

    def count(batch: torch.Tensor) -> int:
        pids.extend(batch.tolist())
        return len(batch)

    monkeypatch.setattr(bench, "_batch_size", count)
    bench._measure_set({"p": (_WorkerPid(), torch.stack)}, num_videos=8, workers=2, batch_size=2, repeats=1, log=lambda s: None)
    assert len(pids) == 16 and len(set(pids)) == 2  # warm-up and measured sweep; both workers decoded in each pass


def test_prepare_never_writes_outside_its_folder_or_over_foreign_files(tmp_path, tiny_synthetic):
    from mergekit_video.data.prepare import output_relpath

    root = tiny_synthetic.root
    assert output_relpath(str(root / "videos/a.avi"), root, folder=False) == "videos/a.mp4"
    assert output_relpath("/elsewhere/b.mp4", root, folder=False) == "elsewhere/b.mp4"
    assert output_relpath("frames/v1", root, folder=True) == "frames/v1.mp4"
    with pytest.raises(ValueError, match="leaves the output folder"):
        output_relpath("../up.mp4", root, folder=False)
    rec = read_annotation_list(tiny_synthetic.train_list)[0]
    src = root / rec.path
    lst = tmp_path / "abs.txt"
    lst.write_text(f"{src} {rec.label}\n../escape.mp4 0\n")
    out = tmp_path / "out"
    foreign = out / rec.path  # where the absolute path under root maps to
    foreign.parent.mkdir(parents=True)
    foreign.write_text("a user's file")
    before = src.read_bytes()
    rep = prepare_dataset(list_file=lst, root=root, out_dir=out, short_side=32, gop=8, workers=1, progress=False)
    assert rep.failed == 2 and rep.encoded == 0
    assert foreign.read_text() == "a user's file" and src.read_bytes() == before
    errors = " ".join(f["error"] for f in rep.failures)
    assert "not a finished output" in errors and "leaves the output folder" in errors


def test_prepare_refuses_to_replace_a_list_it_did_not_write(tmp_path, tiny_synthetic):
    out = tmp_path / "mine"
    out.mkdir()
    users = out / tiny_synthetic.train_list.name
    users.write_text("my own list\n")
    with pytest.raises(FileExistsError, match="not written by `mergevid data prepare`"):
        prepare_dataset(list_file=tiny_synthetic.train_list, root=tiny_synthetic.root, out_dir=out, short_side=32, gop=8, workers=1, progress=False)
    assert users.read_text() == "my own list\n" and sorted(p.name for p in out.iterdir()) == [users.name]


def test_synthetic_videos_decode_to_exactly_the_rendered_frames(tmp_path):
    # lossless encoding: the decoded data is a function of the seed alone, whatever x264 chose
    import av
    import numpy as np

    from mergekit_video.data.encode import rgb_to_yuv420p
    from mergekit_video.data.synthetic import class_catalogue, render_clip

    ds = write_synthetic_dataset(tmp_path / "s", num_classes=2, videos_per_class=1, val_per_class=0, num_novel_classes=0, frames=6, size=(32, 48), seed=3)
    for label, rec in enumerate(read_annotation_list(ds.train_list)):
        rendered = render_clip(class_catalogue()[label], frames=6, size=(32, 48), rng=np.random.default_rng([3, 0, label, 0]))
        with av.open(str(ds.root / rec.path)) as c:
            decoded = [f.to_ndarray(format="yuv420p") for f in c.decode(video=0)]
        assert len(decoded) == 6
        assert all(np.array_equal(d, rgb_to_yuv420p(r)) for d, r in zip(decoded, rendered))


def _level_sources(folder, names, n=12):
    """Tiny level-coded videos named ``names`` under ``folder``; returns prepare's keyword arguments."""
    src = folder / "src"
    src.mkdir(parents=True)
    for name in names:
        write_level_video(src / name, n=n)
    lst = src / "list.txt"
    lst.write_text("".join(f"{name} {i}\n" for i, name in enumerate(names)))
    return {"list_file": lst, "root": src, "out_dir": folder / "out", "short_side": 32, "gop": 4, "workers": 1, "progress": False}


def test_prepare_reports_output_name_collisions_and_encodes_a_file_listed_twice_once(tmp_path):
    kw = _level_sources(tmp_path, ["x.avi", "x.mp4", "y.mp4"])  # x.avi and x.mp4 both map to out/x.mp4
    with open(kw["list_file"], "a") as f:
        f.write(f"{kw['root'] / 'y.mp4'} 5\n")  # y.mp4 again, by its absolute path...
    (tmp_path / "link").symlink_to(kw["root"])
    kw["root"] = tmp_path / "link"  # ... which does not start with the root's name
    for run in range(2):  # the rerun sees the same failures (and accepts the folder: the manifest was written)
        rep = prepare_dataset(**kw)
        assert (rep.total, rep.encoded, rep.skipped, rep.failed) == (3, 1 - run, run, 2)
        assert sorted(f["path"].rsplit("/", 1)[1] for f in rep.failures) == ["x.avi", "x.mp4"]
        assert all("collision: x.avi and x.mp4" in f["error"] for f in rep.failures)
        assert not (kw["out_dir"] / "x.mp4").exists()  # neither source overwrote the other
        assert [(r.path, r.label) for r in read_annotation_list(rep.list_file)] == [("y.mp4", 2), ("y.mp4", 5)]


def test_prepare_drops_the_stale_output_of_a_source_that_no_longer_encodes(tmp_path):
    kw = _level_sources(tmp_path, ["v0.mp4", "v1.mp4"])
    assert prepare_dataset(**kw).encoded == 2
    (kw["root"] / "v0.mp4").write_text("replaced by a corrupt file\n")
    for run in range(2):  # the failure stays reported: the old output is never taken for a finished one
        rep = prepare_dataset(**kw)
        assert (rep.encoded, rep.skipped, rep.failed) == (0, 1, 1) and rep.failures[0]["path"].endswith("v0.mp4")
        assert not (kw["out_dir"] / "v0.mp4").exists()
        assert [r.path for r in read_annotation_list(rep.list_file)] == ["v1.mp4"]
    (kw["root"] / "v1.mp4").write_bytes(b"")
    rep = prepare_dataset(**kw)  # nothing left: the new list is empty rather than the previous run's
    assert rep.failed == 2 and rep.list_file.read_text() == "\n"


def test_prepare_recovers_a_folder_whose_manifest_was_lost_and_checks_the_settings(tmp_path):
    kw = _level_sources(tmp_path, ["v0.mp4", "v1.mp4"])
    out = kw["out_dir"]
    prepare_dataset(**kw)
    for name in ("prepare_manifest.json", "prepare_report_list.json", "list.txt"):  # as if killed before writing them
        (out / name).unlink()
    rep = prepare_dataset(**{**kw, "short_side": 40})  # outputs of another short side are not adopted (32 < 40 < 48)
    assert rep.failed == 2 and all("size 42x32, expected 52x40" in f["error"] for f in rep.failures)
    for name in ("prepare_manifest.json", "prepare_report_list.json", "list.txt"):
        (out / name).unlink()
    rep = prepare_dataset(**kw)  # nothing to encode: every output recovered, and the manifest written
    assert (rep.encoded, rep.skipped, rep.failed) == (0, 2, 0)
    assert set(json.loads((out / "prepare_manifest.json").read_text())["files"]) == {"v0.mp4", "v1.mp4"}
    assert (prepare_dataset(**kw).skipped, prepare_dataset(**kw).failed) == (2, 0)  # and the next run accepts the folder


def test_prepare_writes_widths_decord_decodes_and_reads_the_stream_decord_reads(tmp_path, monkeypatch):
    """A 64x64 video prepared at short side 48 was written 48 px wide, which decord cannot decode (it fell back to
    PyAV on every read); a second video stream before the main one was encoded instead of the main video."""
    assert [target_size(*hw, 48) for hw in ((64, 64), (96, 72), (64, 48), (48, 64), (100, 16))] == \
        [(48, 50), (64, 50), (64, 46), (48, 64), (100, 14)]  # 48 px -> 50, or 46 where the source is only 48 wide
    assert [target_size(*hw, 72) for hw in ((96, 72), (54, 72), (64, 64))] == [(96, 70), (54, 70), (64, 64)]
    assert target_size(1080, 1920, 256) == (256, 454) and target_size(48, 64, 32) == (32, 42)  # most sizes: as before
    kw = _level_sources(tmp_path, [], n=20)
    write_level_video(kw["root"] / "square.mp4", 20, gop=8, h=64, w=64)
    write_two_stream_video(kw["root"] / "two.mp4")  # stream 0: a 32x32 thumbnail track of 30 frames
    kw["list_file"].write_text("square.mp4 0\ntwo.mp4 1\n")
    rep = prepare_dataset(**{**kw, "short_side": 48})
    assert (rep.encoded, rep.failed) == (2, 0)
    manifest = json.loads((kw["out_dir"] / "prepare_manifest.json").read_text())["files"]
    assert {k: (v["frames"], v["height"], v["width"]) for k, v in manifest.items()} == {"square.mp4": (20, 48, 50), "two.mp4": (24, 48, 64)}
    if decord_available():
        with DecordReader(path=kw["out_dir"] / "square.mp4", pyav_fallback=False) as r:
            assert r.num_frames == 20 and frame_ids(r.get_frames([0, 19, 7])) == [0, 19, 7]

    # an output the default reader cannot read fails, naming it, and is not left behind
    import mergekit_video.data.prepare as prepare_module

    job = {"src": str(kw["root"] / "square.mp4"), "out": str(tmp_path / "bad" / "square.mp4"), "rel": "square.mp4", "key": "k",
           "out_rel": "square.mp4", "short_side": 48, "gop": 8, "fastdecode": True, "preset": None, "crf": None, "threads": 1,
           "list_format": "video", "num_frames": None, "fps": 30.0, "stamp": {}, "read_timeout": None}
    if decord_available():
        monkeypatch.setattr(prepare_module, "target_size", lambda h, w, s: (48, 48))  # the size prepare used to write
        res = _prepare_one(job)
        assert not res["ok"] and res["error"] == (f"ValueError: the decord reader cannot read it: {job['out']}: decord cannot "
                                                  "decode frames 48 px wide (a decord bug for some widths)")
        assert not (tmp_path / "bad" / "square.mp4").exists()
        monkeypatch.undo()
    monkeypatch.setattr(DecordReader if decord_available() else PyAVReader, "num_frames", property(lambda self: 19))
    res = _prepare_one(job)
    backend = "decord" if decord_available() else "pyav"
    assert not res["ok"] and res["error"] == f"ValueError: {job['out']}: the {backend} reader counts 19 frames, 20 were encoded"
    assert not (tmp_path / "bad" / "square.mp4").exists()


def _die_on_crash_me(job):
    """Stands in for a decoder segfault or an out-of-memory kill on one file (pickled by reference into forked workers)."""
    if "crash_me" in job["rel"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return _prepare_one(job)


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the patched worker function reaches workers only when they fork")
def test_prepare_survives_a_worker_that_dies_and_names_its_file(tmp_path, monkeypatch):
    import mergekit_video.data.prepare as prepare_module

    kw = _level_sources(tmp_path, ["v0.mp4", "crash_me.mp4", "v2.mp4", "v3.mp4", "v4.mp4"], n=8)
    monkeypatch.setattr(prepare_module, "_prepare_one", _die_on_crash_me)
    for run, workers in enumerate((2, 1)):
        rep = prepare_dataset(**{**kw, "workers": workers})
        assert (rep.encoded, rep.skipped, rep.failed) == (4 - 4 * run, 4 * run, 1)  # the rest finish; the rerun retries it
        assert rep.failures[0]["path"].endswith("crash_me.mp4") and "worker process died" in rep.failures[0]["error"]
        assert [r.path for r in read_annotation_list(rep.list_file)] == ["v0.mp4", "v2.mp4", "v3.mp4", "v4.mp4"]
        assert "crash_me.mp4" not in json.loads((kw["out_dir"] / "prepare_manifest.json").read_text())["files"]


def test_an_output_folder_that_is_a_file_is_named(tmp_path):
    """``out_dir`` / ``work_dir`` naming a file (or lying under one) gave mkdir's bare "[Errno 17] File exists"."""
    from mergekit_video.data.bench import run_data_benchmark

    afile, lst = tmp_path / "afile", tmp_path / "list.txt"
    afile.write_text("mine")
    lst.write_text("a.mp4 0\n")
    with pytest.raises(ValueError) as info:
        prepare_dataset(list_file=lst, root=tmp_path, out_dir=afile)
    assert str(info.value) == f"out_dir {afile} is a file, not a folder"
    with pytest.raises(ValueError) as info:
        run_data_benchmark(work_dir=afile / "sub", log=lambda _: None)
    assert str(info.value) == f"work_dir {afile / 'sub'}: {afile} is a file, not a folder"
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "list.txt"]


def test_prepare_and_synth_argument_errors_name_the_command_line_option(tmp_path, prepare_input, tiny_synthetic):
    """`mergevid data prepare --short-side 0` said "short_side and gop must be positive", `data synth --classes 0`
    "need 1 <= num_classes and ...": Python argument names the user never typed."""
    lst, _ = prepare_input
    for kw, message in [({"short_side": 0}, "short_side (--short-side) must be positive, got 0"),
                        ({"gop": -1}, "gop (--gop) must be positive, got -1"),
                        ({"list_format": "x"}, "list_format (--list-format) must be one of video, frames, got 'x'"),
                        ({"list_format": "frames", "fps": 0.0}, "fps (--fps) must be positive for frame-folder lists, got 0.0"),
                        ({"read_timeout_s": 0}, "read_timeout_s (--read-timeout) must be positive, got 0")]:
        with pytest.raises(ValueError) as info:
            prepare_dataset(list_file=lst, root=tiny_synthetic.root, out_dir=tmp_path / "out", progress=False, **kw)
        assert str(info.value) == message
    assert not (tmp_path / "out").exists()
    small = {"videos_per_class": 1, "val_per_class": 0, "num_novel_classes": 0, "frames": 4, "size": (16, 16)}
    for kw, message in [({"num_classes": 0}, "num_classes (--classes) must be >= 1, got 0"),
                        ({"num_novel_classes": -1}, "num_novel_classes (--novel-classes) must be >= 0, got -1"),
                        ({"videos_per_class": 0}, "videos_per_class (--videos-per-class) must be >= 1, got 0"),
                        ({"val_per_class": -1}, "val_per_class (--val-per-class) must be >= 0, got -1"),
                        ({"frames": 0}, "frames (--frames) must be >= 1, got 0"),
                        ({"num_classes": 100, "num_novel_classes": 50},
                         "num_classes + num_novel_classes (--classes + --novel-classes) must be <= 144 (the classes the "
                         "synthetic catalogue has), got 100 + 50")]:
        with pytest.raises(ValueError) as info:
            write_synthetic_dataset(tmp_path / "syn", **{"num_classes": 1, **small, **kw})
        assert str(info.value) == message


def test_prepare_refuses_outputs_that_lead_onto_their_sources_and_writes_nothing(tmp_path):
    """OUT/videos -> ../ds/videos made every output path a source: a source already at these settings was taken for a
    finished output, re-encoded in place once it was newer than its manifest entry, and unlinked when that failed."""
    import hashlib
    import time

    ds = tmp_path / "ds"
    (ds / "videos").mkdir(parents=True)
    for name in ("v0.mp4", "v1.mp4"):  # already at the settings below: it passes as a finished output
        write_level_video(ds / "videos" / name, n=12, gop=4, h=32, w=40)
    lst = ds / "list.txt"
    lst.write_text("videos/v0.mp4 0\nvideos/v1.mp4 1\n")
    digest = {name: hashlib.sha256((ds / "videos" / name).read_bytes()).hexdigest() for name in ("v0.mp4", "v1.mp4")}
    kw = {"list_file": lst, "root": ds, "short_side": 32, "gop": 4, "workers": 1, "progress": False}
    linked_folder = tmp_path / "out"
    linked_folder.mkdir()
    (linked_folder / "videos").symlink_to("../ds/videos")
    linked_file = tmp_path / "out2"
    (linked_file / "videos").mkdir(parents=True)
    (linked_file / "videos" / "v1.mp4").symlink_to(ds / "videos" / "v1.mp4")
    for out, name in ((linked_folder, "v0.mp4"), (linked_file, "v1.mp4")):
        for run in range(2):  # the second run after the sources changed: they would have been re-encoded in place
            with pytest.raises(ValueError) as info:
                prepare_dataset(**kw, out_dir=out)
            assert str(info.value).startswith(f"the output {out / 'videos' / name} is the source {ds / 'videos' / name} "
                                              f"(symlinks resolved: {(ds / 'videos' / name).resolve()}; a symbolic link on the way")
            assert "nothing was written" in str(info.value)
            assert sorted(p.name for p in out.iterdir()) == ["videos"]
            for src in (ds / "videos").iterdir():
                os.utime(src, ns=(time.time_ns() + 10**9,) * 2)
    assert sorted(p.name for p in (ds / "videos").iterdir()) == ["v0.mp4", "v1.mp4"]
    assert all(hashlib.sha256((ds / "videos" / n).read_bytes()).hexdigest() == d for n, d in digest.items())
    rep = prepare_dataset(**kw, out_dir=ds / "prepared")  # inside the root is fine where no output is a source
    assert (rep.encoded, rep.failed) == (2, 0)
    assert all(hashlib.sha256((ds / "videos" / n).read_bytes()).hexdigest() == d for n, d in digest.items())


def test_prepare_refuses_an_output_inside_a_source_frame_folder(tmp_path):
    from data_helpers import write_frame_folder

    ds = tmp_path / "ds"
    write_frame_folder(ds / "frames" / "v1", 6)
    lst = tmp_path / "list.txt"
    lst.write_text("frames/v1 6 0\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "frames").symlink_to(ds / "frames" / "v1")  # out/frames/v1.mp4 lands in the folder frames/v1
    with pytest.raises(ValueError, match="lies inside the source"):
        prepare_dataset(list_file=lst, root=ds, out_dir=out, list_format="frames", short_side=32, gop=4, workers=1, progress=False)
    assert sorted(p.name for p in (ds / "frames" / "v1").iterdir()) == [f"img_{i:05d}.jpg" for i in range(1, 7)]
    # no symlink: OUT itself inside the source folder is said so (no link is blamed)
    inside = ds / "frames" / "v1" / "prepared"
    with pytest.raises(ValueError) as info:
        prepare_dataset(list_file=lst, root=ds, out_dir=inside, list_format="frames", short_side=32, gop=4, workers=1, progress=False)
    assert str(info.value).startswith(f"the output {inside / 'frames' / 'v1.mp4'} lies inside the source {ds / 'frames' / 'v1'} "
                                      f"({inside} lies inside the source {ds / 'frames' / 'v1'}, which would be overwritten); nothing was written")
    assert "symbolic" not in str(info.value) and not inside.exists()


def test_prepare_reads_frame_folders_numbered_from_0_with_frame_index_base(tmp_path, capsys):
    import shutil

    from mergekit_video.cli.main import main

    one = write_frame_folder(tmp_path / "one" / "v1", 6)
    (tmp_path / "zero" / "v1").mkdir(parents=True)
    for i in range(6):
        shutil.copy(one / f"img_{i + 1:05d}.jpg", tmp_path / "zero" / "v1" / f"img_{i:05d}.jpg")
    for root in ("one", "zero"):
        (tmp_path / root / "list.txt").write_text("v1 6 0\n")
    args = ["--list-format", "frames", "--short-side", "32", "--gop", "4", "--workers", "1"]
    assert main(["data", "prepare", str(tmp_path / "one" / "list.txt"), str(tmp_path / "out1"), *args]) == 0
    # read from 1, the folder is refused (it came back one frame off) and the option is named
    assert main(["data", "prepare", str(tmp_path / "zero" / "list.txt"), str(tmp_path / "out0"), *args]) == 1
    assert "has img_00000.jpg: set frame_index_base=0" in capsys.readouterr().err.replace("\n", " ")
    assert main(["data", "prepare", str(tmp_path / "zero" / "list.txt"), str(tmp_path / "out0b"), *args, "--frame-index-base", "0"]) == 0
    with open_video(tmp_path / "out1" / "v1.mp4", backend="pyav") as a, open_video(tmp_path / "out0b" / "v1.mp4", backend="pyav") as b:
        assert a.num_frames == b.num_frames == 6 and torch.equal(a.get_frames(range(6)), b.get_frames(range(6)))


def _dead_pid() -> int:
    """A pid no process has: above the kernel's largest."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1000


def test_a_rerun_removes_the_partial_encodes_of_killed_runs_and_nothing_else(tmp_path, capsys):
    """A SIGKILLed prepare left `.v.mp4.<pid>-<host>.XXXXXXXX.tmp` partial encodes that no later run removed
    ("2 already done", the temps kept for ever)."""
    from mergekit_video.cli.main import main
    from mergekit_video.utils.io import temp_owner

    kw = _level_sources(tmp_path, ["v0.mp4", "sub/v1.mp4"], n=8)
    out = kw["out_dir"]
    assert prepare_dataset(**kw).encoded == 2
    dead = temp_owner().replace(str(os.getpid()), str(_dead_pid()), 1)
    stale = [out / f".v0.mp4.{dead}.abcd1234.tmp", out / "sub" / f".v1.mp4.{dead}.x_9z0q1w.tmp",
             out / "sub" / f".gone.mp4.{dead}.abcd1234.tmp",  # an output no longer listed
             out / f".prepare_manifest.json.{dead}.abcd1234.tmp"]
    kept = [out / f".v0.mp4.{temp_owner()}.abcd1234.tmp",  # its writer runs (this process)
            out / ".v0.mp4.mine.tmp", out / "sub" / f".notes.txt.{dead}.abcd1234.tmp", out / "mine.tmp"]  # not prepare's
    # a hidden file of the user's that happens to look like an older writer's temp (no pid/host), two hours old
    (out / "family").mkdir()
    kept.append(out / "family" / ".wedding.mp4.draft_01.tmp")
    for p in stale + kept:
        p.write_bytes(b"partial")
    os.utime(kept[-1], (time.time() - 7200, time.time() - 7200))
    rep = prepare_dataset(**kw)
    assert (rep.encoded, rep.skipped, rep.failed, rep.removed_temps) == (0, 2, 0, 4)
    assert not any(p.exists() for p in stale) and all(p.read_bytes() == b"partial" for p in kept)
    assert json.loads(rep.report_path.read_text())["removed_temps"] == 4
    stale[0].write_bytes(b"partial")
    assert main(["data", "prepare", str(kw["list_file"]), str(out), "--short-side", "32", "--gop", "4", "--workers", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 videos: 0 encoded, 2 already done, 0 failed (")
    assert lines[1] == "removed 1 partial encode left by an interrupted run"
    assert not stale[0].exists()


def test_a_listed_folder_named_like_a_video_is_said_to_be_a_folder(tmp_path):
    """`videos/broken/dir.mp4` being a folder was reported as "FileNotFoundError: no such file"."""
    kw = _level_sources(tmp_path, ["v0.mp4"], n=8)
    (kw["root"] / "broken" / "dir.mp4").mkdir(parents=True)
    with open(kw["list_file"], "a") as f:
        f.write("broken/dir.mp4 1\nbroken/missing.mp4 2\n")
    rep = prepare_dataset(**kw)
    assert (rep.encoded, rep.failed) == (1, 2)
    assert rep.failures == [{"path": str(kw["root"] / "broken" / "dir.mp4"), "error": "IsADirectoryError: a folder, not a file"},
                            {"path": str(kw["root"] / "broken" / "missing.mp4"), "error": "FileNotFoundError: no such file"}]


def test_a_second_prepare_into_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two concurrent `mergevid data prepare LIST OUT` both encoded everything ("24 encoded" twice)."""
    import fcntl

    from mergekit_video.cli.main import main

    kw = _level_sources(tmp_path, ["v0.mp4", "v1.mp4"], n=8)
    out = kw["out_dir"]
    out.mkdir()
    fd = os.open(out / ".prepare.lock", os.O_RDWR | os.O_CREAT)  # as a running prepare holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4321\n")
        message = (f"{out} is being written by another `mergevid data prepare` (pid 4321); "
                   "wait for it to end, or prepare into another folder")
        with pytest.raises(FileExistsError) as info:
            prepare_dataset(**kw)
        assert str(info.value) == message
        assert main(["data", "prepare", str(kw["list_file"]), str(out), "--short-side", "32", "--gop", "4", "--workers", "1"]) == 1
        assert capsys.readouterr().err.splitlines()[0] == f"error: {message}"
        assert sorted(p.name for p in out.iterdir()) == [".prepare.lock"]  # nothing written
    finally:
        os.close(fd)  # as when the holder ends or is killed: the lock file stays, and no longer blocks
    rep = prepare_dataset(**kw)
    assert (rep.encoded, rep.skipped, rep.failed) == (2, 0, 0)
    assert (out / ".prepare.lock").read_text() == f"{os.getpid()}\n"


def test_prepare_fails_sources_cut_short_or_corrupt_and_encodes_every_good_one(tmp_path):
    """A cut mkv/avi became a clean shorter mp4 (prepare checked only the count it encoded itself), and a corrupt
    frame was reported as "InvalidDataError: ... 'avcodec_send_packet()'"."""
    src = tmp_path / "src"
    good = write_good_variety(src)
    cut_file(write_noise_video(tmp_path / "full.mkv", 48), src / "cut_mkv.mkv")
    cut_file(write_noise_video(tmp_path / "full.avi", 48, codec="mpeg4"), src / "cut_avi.avi")
    zero_packet(write_level_video(tmp_path / "level.mp4", 24, gop=8), src / "corrupt.mp4", 8)
    (src / "text.mp4").write_text("this is not a video\n" * 20)
    lst = src / "list.txt"
    lst.write_text("".join(f"{name} {i}\n" for i, name in enumerate([*good, "cut_mkv.mkv", "cut_avi.avi", "corrupt.mp4", "text.mp4"])))
    rep = prepare_dataset(list_file=lst, root=src, out_dir=tmp_path / "out", short_side=32, gop=8, workers=2, progress=False)
    errors = {f["path"].rsplit("/", 1)[1]: f["error"] for f in rep.failures}
    assert (rep.encoded, sorted(errors)) == (len(good), ["corrupt.mp4", "cut_avi.avi", "cut_mkv.mkv", "text.mp4"]), errors
    # in the readers' words, not FFmpeg's ("InvalidDataError: [Errno 1094995529] Invalid data found when processing input")
    assert errors["text.mp4"].startswith("ValueError: cannot open it as a video: not a video file, or truncated or corrupt ("), errors
    for name in ("cut_mkv.mkv", "cut_avi.avi"):
        assert re.fullmatch(r"ValueError: truncated \(the header gives the video 1.92 s, the file holds 0\.\d\d s in \d+ frames\)",
                            errors[name]), errors[name]
    assert re.fullmatch(r"ValueError: truncated or corrupt: decoding stopped at frame \d+", errors["corrupt.mp4"]), errors["corrupt.mp4"]
    assert {r.path: video_info(tmp_path / "out" / r.path)["frames"] for r in read_annotation_list(rep.list_file)} == \
        {name.rsplit(".", 1)[0] + ".mp4": n for name, n in good.items()}


def test_prepare_gives_up_on_a_source_that_hangs_and_goes_on(tmp_path, capsys):
    """A frame folder whose img_00003.jpg is a FIFO hung `mergevid data prepare` forever."""
    import threading

    from mergekit_video.cli.main import main

    src = tmp_path / "src"
    write_frame_folder(src / "ok", 8)
    fifo = write_frame_folder(src / "hung", 8) / "img_00003.jpg"
    fifo.unlink()
    os.mkfifo(fifo)
    (src / "list.txt").write_text("ok 8 0\nhung 8 1\n")

    def unblock() -> None:  # should the limit not work: end the read rather than hang the test run
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    guard = threading.Timer(60.0, unblock)
    guard.start()
    try:
        t0 = time.monotonic()
        code = main(["data", "prepare", str(src / "list.txt"), str(tmp_path / "out"), "--list-format", "frames", "--short-side", "16",
                     "--gop", "4", "--workers", "1", "--read-timeout", "1"])
        took = time.monotonic() - t0
    finally:
        guard.cancel()
        unblock()
    err = capsys.readouterr().err
    assert code == 1 and took < 30
    assert f"failed: {src / 'hung'}: ReadTimeoutError: {src / 'hung'}: no result after 1 s (decoder hung)" in err, err
    assert [r.path for r in read_annotation_list(tmp_path / "out" / "list.txt")] == ["ok.mp4"]


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_bench_takes_from_a_list_only_the_videos_decord_reads_itself(tmp_path):
    """The floor and naive pipelines call decord directly: a 48-px-wide video crashed them (DECORDError in a worker),
    and an open-GOP file was timed reading other frames; they are left out, named, and the next ones taken."""
    from mergekit_video.data.annotations import VideoRecord
    from mergekit_video.data.bench import _decord_readable

    root = tmp_path / "raw"
    root.mkdir()
    write_level_video(root / "good1.mp4", 16)
    write_level_video(root / "narrow.mp4", 16, h=64, w=48)
    (root / "empty.mp4").write_bytes(b"")
    write_level_video(root / "good2.mp4", 16)
    write_level_video(root / "good3.mp4", 16)
    records = [VideoRecord(path=p, label=0) for p in ("good1.mp4", "narrow.mp4", "empty.mp4", "good2.mp4", "good3.mp4")]
    kept, left_out = _decord_readable(records, root, limit=2)
    assert [r.path for r in kept] == ["good1.mp4", "good2.mp4"]
    assert [p for p, _ in left_out] == ["narrow.mp4", "empty.mp4"]
    assert "decord cannot decode frames 48 px wide" in left_out[0][1]


def test_each_list_prepared_into_a_folder_keeps_its_own_report(tmp_path):
    """Preparing val after train into the same folder replaced train's prepare_report.json: its failures were gone."""
    kw = _level_sources(tmp_path, ["v0.mp4", "v1.mp4"])
    (kw["root"] / "v1.mp4").write_bytes(b"")  # one bad source in the training list
    val = kw["root"] / "val.txt"
    val.write_text("v0.mp4 0\n")
    train_rep = prepare_dataset(**kw)
    val_rep = prepare_dataset(**{**kw, "list_file": val})
    assert (train_rep.report_path.name, val_rep.report_path.name) == ("prepare_report_list.json", "prepare_report_val.json")
    assert [f["path"] for f in json.loads(train_rep.report_path.read_text())["failures"]] == [str(kw["root"] / "v1.mp4")]  # kept
    assert json.loads(val_rep.report_path.read_text())["failures"] == []
